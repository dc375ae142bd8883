"""DeltaNet mixer: fla's ``DeltaNet`` layer (its defaults) as a tensor-parallel megatron module.

Math (H = config.num_attention_heads heads of dim d = config.deltanet_head_dim):

    q, k, v = silu(causal_conv(x W_q)), silu(causal_conv(x W_k)), silu(causal_conv(x W_v))   per channel, kernel K
    q, k    = l2norm(q), l2norm(k)                                                             per head
    beta    = sigmoid(x W_b)                                                                   one per head
    o       = delta_rule(q, k, v, beta)                                                        (ops.delta_rule)
    o       = rmsnorm(o) * w_norm                    over the head dim, one weight [d] shared by all heads
    out     = merge_heads(o) W_o

Megatron form. TP shards heads. The fused tensors are stacked from sections (models/layout.py), as in megatron's
GatedDeltaNet: each TP rank holds its heads' part of every section, and checkpoints store each section as a tensor
of its own (``in_proj.weight.q`` ...), so they load under any TP size:

* ``in_proj`` (column-parallel, [H*(3d+1), hidden]): sections [q (H*d), k (H*d), v (H*d), beta (H)], head-major
  within each; one rank's projection output is then [q | k | v | beta] of its heads, whose q/k/v part the conv
  reads in place with aligned, vectorized loads;
* ``conv_weight`` ([H*3d, K], TP-sharded on dim 0): sections [q, k, v] (the q/k/v convs fused);
* ``o_norm_weight`` ([d]): replicated on every TP rank; its gradient is summed over the TP group in backward;
* ``out_proj`` (row-parallel, [hidden, H*d]): columns per head.

:func:`fla_to_fused_state` / :func:`fused_to_fla_state` convert full (unsharded) weights from / to fla's layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_flash.layers.base import (READS_RESIDUAL, WRITES_RESIDUAL, MixerInputs, dense_grad, mark_weight_norm,
                                        rows_from)
from megatron_flash.layers.shared_prefix import run_prefix_once
from megatron_flash.models.layout import initialize_as_full, split_sharded_sections, stack_sections
from megatron_flash.ops.delta_rule import delta_rule
from megatron_flash.ops.rms_norm import rms_norm
from megatron_flash.ops.short_conv import causal_conv1d, conv_init_


# names of the sections of in_proj and conv_weight (checkpoint keys ``<param>.<name>``)
IN_PROJ_SECTIONS = ("q", "k", "v", "beta")
CONV_SECTIONS = ("q", "k", "v")


@dataclass
class DeltaNetSubmodules:
    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


class DeltaNetMixer(MegatronModule):
    """``mixer(hidden_states [s, b, hidden], inputs) -> [s, b, hidden]`` (see the module docstring)."""

    def __init__(self, config, layer_number: int, submodules: DeltaNetSubmodules, pg_collection=None):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.tp_group = (pg_collection.tp if pg_collection is not None
                         else parallel_state.get_tensor_model_parallel_group())
        tp_size = self.tp_group.size()
        self.heads, self.head_dim = config.deltanet_heads, config.deltanet_head_dim
        if self.heads % tp_size != 0:
            raise ValueError(f"DeltaNet heads ({self.heads}) must be divisible by tensor-parallel size {tp_size}")
        self.heads_local = self.heads // tp_size
        self.conv_kernel = config.deltanet_conv_kernel
        d = self.head_dim

        self.in_proj = build_module(
            submodules.in_proj, config.hidden_size, self.heads * (3 * d + 1), config=config,
            init_method=config.init_method, gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="fc1", tp_group=self.tp_group)
        stack_sections(self.in_proj.weight, [self.heads_local * d] * 3 + [self.heads_local])
        mark_weight_norm(self.in_proj.weight, READS_RESIDUAL)

        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.conv_weight = torch.nn.Parameter(
            torch.empty(self.heads_local * 3 * d, self.conv_kernel, device=device, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.conv_weight, is_parallel=True, dim=0, stride=1)
        stack_sections(self.conv_weight, [self.heads_local * d] * 3)
        # Not sequence_parallel: each rank normalizes its own heads over the full sequence, and the TP all-reduce of
        # the gradient happens in forward (copy_to_tensor_model_parallel_region); marking it would reduce twice.
        self.o_norm_weight = torch.nn.Parameter(torch.ones(d, device=device, dtype=config.params_dtype))

        self.out_proj = build_module(
            submodules.out_proj, self.heads * d, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name="fc2", tp_group=self.tp_group)
        mark_weight_norm(self.out_proj.weight, WRITES_RESIDUAL)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv like nn.Conv1d, norm weight ones. Under use_cpu_initialization the stacked tensors are drawn whole
        and sharded by section (the same numbers at every TP size: megatron's linear would shard its draw
        contiguously), else per rank under the model-parallel RNG, as megatron's linears do."""
        if not self.config.perform_initialization:
            return
        with torch.no_grad():
            self.o_norm_weight.fill_(1.0)
            if self.config.use_cpu_initialization:
                tp = (self.tp_group.size(), self.tp_group.rank())
                initialize_as_full(self.in_proj.weight, self.config.init_method, *tp)
                initialize_as_full(self.conv_weight, self._conv_init, *tp)
            else:
                with get_cuda_rng_tracker().fork():
                    self._conv_init(self.conv_weight)

    def _conv_init(self, weight: torch.Tensor) -> None:
        conv_init_(weight, self.conv_kernel)

    def forward(self, hidden_states: torch.Tensor, inputs: Optional[MixerInputs] = None) -> torch.Tensor:
        # (unless --no-share-meta-prefix) the meta prefix once per micro-batch, or its state recorded once per
        # step (MetaPrefix), then every sequence's text from that state
        prefix, meta_prefix = inputs.shared_rows(self.config.share_meta_prefix_in_mixers) if inputs else (0, None)
        return run_prefix_once(functools.partial(self._mix, inputs=inputs), hidden_states, prefix,
                               self.conv_kernel - 1, meta_prefix, self.layer_number)

    def _mix(self, hidden_states, inputs=None, history=0, initial_state=None, output_final_state=False):
        """The mixer over [s, b, h] whose first ``history`` rows are only the short conv's window (no output for
        them), from ``initial_state``: (output [s - history, b, h], final state or None)."""
        d, heads = self.head_dim, self.heads_local
        projected, _ = self.in_proj(hidden_states)  # [s, b, 3*heads*d + heads]: full sequence, this rank's heads
        batch = projected.shape[1]
        seq = projected.shape[0] - history
        # split, not slices: backward writes the projection's gradient in one pass (one cat of two aligned pieces,
        # both dense: the conv writes qkv's so)
        qkv, beta = projected.split([3 * heads * d, heads], dim=-1)
        beta = dense_grad(rows_from(beta, history)).transpose(0, 1).sigmoid()  # [b, s, heads]
        cu_seqlens = self._cu_seqlens(inputs, batch)

        # read in place on GPUs; out [b, s, 3, heads*d], stored section-major by the triton backend so that q, k
        # and v are each contiguous (fla's delta-rule kernels copy non-contiguous inputs)
        qkv, _ = causal_conv1d(qkv.transpose(0, 1), self.conv_weight, activation="silu", cu_seqlens=cu_seqlens,
                               backend=self.config.short_conv_backend, sections=3, history=history)
        q, k, v = qkv.view(batch, seq, 3, heads, d).unbind(dim=2)
        o, final = delta_rule(q, k, v, beta, cu_seqlens=cu_seqlens, use_qk_l2norm=True,
                              initial_state=initial_state, output_final_state=output_final_state,
                              backend=self.config.delta_rule_backend)
        # normalized in [s, b] order: the norm writes the out-projection's layout itself (no transposing copy)
        o = self._o_norm(o.transpose(0, 1)).view(seq, batch, heads * d)
        out, _ = self.out_proj(o)
        return out, final

    def _o_norm(self, o: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the head dim in fp32 (fla's o_norm), result in o's dtype."""
        # identity forward; backward all-reduces the grad over TP, so every rank gets the sum over all heads
        weight = tensor_parallel.copy_to_tensor_model_parallel_region(self.o_norm_weight, group=self.tp_group)
        return rms_norm(o, weight, self.config.deltanet_norm_eps)

    @staticmethod
    def _cu_seqlens(inputs: Optional[MixerInputs], batch: int) -> Optional[torch.Tensor]:
        params = inputs.packed_seq_params if inputs is not None else None
        if params is None:
            return None
        if params.qkv_format != "thd":
            raise ValueError(f"DeltaNet needs packed_seq_params in 'thd' format, got {params.qkv_format!r}")
        if batch != 1:
            raise ValueError(f"packed sequences need micro-batch size 1, got {batch}")
        return params.cu_seqlens_q

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """As MegatronModule's, with conv_weight declared TP-sharded on dim 0 (the default treats own parameters
        as replicated) and the stacked tensors stored section by section."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(own, prefix, {"conv_weight": 0}, sharded_offsets,
                                                      tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
        for key, param, names in ((f"{prefix}in_proj.weight", self.in_proj.weight, IN_PROJ_SECTIONS),
                                  (f"{prefix}conv_weight", self.conv_weight, CONV_SECTIONS)):
            sharded[key] = split_sharded_sections(sharded[key], param, names)
        return sharded


# --------------------------------------------------------------------------------------------------------------
# fla's DeltaNet weights <-> the fused layout (full tensors, TP = 1)
# --------------------------------------------------------------------------------------------------------------


def fla_to_fused_state(fla_state: dict) -> dict:
    """fla ``DeltaNet`` state dict (use_beta, short convs without bias, no gate) -> DeltaNetMixer's full weights."""
    return {
        "in_proj.weight": torch.cat([fla_state[f"{n}_proj.weight"] for n in "qkvb"]),
        "conv_weight": torch.cat([fla_state[f"{n}_conv1d.weight"].squeeze(1) for n in "qkv"]),  # [H*d, 1, K] each
        "o_norm_weight": fla_state["o_norm.weight"],
        "out_proj.weight": fla_state["o_proj.weight"],
    }


def fused_to_fla_state(state: dict, heads: int) -> dict:
    """The inverse of :func:`fla_to_fused_state`."""
    in_proj, conv = state["in_proj.weight"], state["conv_weight"]
    d = (in_proj.shape[0] // heads - 1) // 3
    out = {f"{n}_proj.weight": w for n, w in zip("qkvb", in_proj.split([heads * d] * 3 + [heads]))}
    out.update({f"{n}_conv1d.weight": w.unsqueeze(1) for n, w in zip("qkv", conv.split(heads * d))})
    out["o_norm.weight"] = state["o_norm_weight"]
    out["o_proj.weight"] = state["out_proj.weight"]
    return out
