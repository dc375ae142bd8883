"""DeltaNet mixer: fla's ``DeltaNet`` layer (its defaults) as a tensor-parallel megatron module.

Math (H = config.num_attention_heads heads of dim d = config.deltanet_head_dim):

    q, k, v = silu(causal_conv(x W_q)), silu(causal_conv(x W_k)), silu(causal_conv(x W_v))   per channel, kernel K
    q, k    = l2norm(q), l2norm(k)                                                             per head
    beta    = sigmoid(x W_b)                                                                   one per head
    o       = delta_rule(q, k, v, beta)                                                        (ops.delta_rule)
    o       = rmsnorm(o) * w_norm                    over the head dim, one weight [d] shared by all heads
    out     = merge_heads(o) W_o

Megatron form. TP shards heads; the layout is the same at every TP size, so a contiguous split of each full tensor
is its TP shard (checkpoints reshard by plain splits):

* ``in_proj`` (column-parallel, [H*(3d+1), hidden]): rows per head, [q_h (d), k_h (d), v_h (d), b_h (1)];
* ``conv_weight`` ([H*3d, K], TP-sharded on dim 0): channels per head, [q_h, k_h, v_h] (the q/k/v convs fused);
* ``o_norm_weight`` ([d]): replicated on every TP rank; its gradient is summed over the TP group in backward;
* ``out_proj`` (row-parallel, [hidden, H*d]): columns per head.

:func:`fla_to_fused_state` / :func:`fused_to_fla_state` convert full (unsharded) weights from / to fla's layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_flash.layers.base import READS_RESIDUAL, WRITES_RESIDUAL, MixerInputs, mark_weight_norm
from megatron_flash.ops.delta_rule import delta_rule
from megatron_flash.ops.rms_norm import rms_norm
from megatron_flash.ops.short_conv import causal_conv1d, conv_init_


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
        mark_weight_norm(self.in_proj.weight, READS_RESIDUAL)

        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.conv_weight = torch.nn.Parameter(
            torch.empty(self.heads_local * 3 * d, self.conv_kernel, device=device, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.conv_weight, is_parallel=True, dim=0, stride=1)
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
        """Conv like nn.Conv1d, norm weight ones. The conv is drawn whole and sharded under use_cpu_initialization
        (the same numbers at every TP size), else per rank under the model-parallel RNG, as megatron's linears do."""
        if not self.config.perform_initialization:
            return
        with torch.no_grad():
            self.o_norm_weight.fill_(1.0)
            if self.config.use_cpu_initialization:
                full_channels = self.heads * 3 * self.head_dim
                _initialize_affine_weight_cpu(
                    self.conv_weight, full_channels, self.conv_kernel, self.conv_weight.shape[0], 0, self._conv_init,
                    params_dtype=self.config.params_dtype, rank=self.tp_group.rank(), world_size=self.tp_group.size(),
                    skip_set_tensor_parallel_attributes=True)
            else:
                with get_cuda_rng_tracker().fork():
                    self._conv_init(self.conv_weight)

    def _conv_init(self, weight: torch.Tensor) -> None:
        conv_init_(weight, self.conv_kernel)

    def forward(self, hidden_states: torch.Tensor, inputs: Optional[MixerInputs] = None) -> torch.Tensor:
        d, heads = self.head_dim, self.heads_local
        projected, _ = self.in_proj(hidden_states)  # [s, b, heads*(3d+1)]: full sequence, this rank's heads
        seq, batch = projected.shape[:2]
        per_head = projected.view(seq, batch, heads, 3 * d + 1)
        qkv = per_head[..., :3 * d].transpose(0, 1)  # [b, s, heads, 3d]: conv channel order, read in place on GPUs
        beta = per_head[..., 3 * d].transpose(0, 1).sigmoid()  # [b, s, heads]
        cu_seqlens = self._cu_seqlens(inputs, batch)

        qkv, _ = causal_conv1d(qkv, self.conv_weight, activation="silu", cu_seqlens=cu_seqlens,
                               backend=self.config.short_conv_backend)
        q, k, v = qkv.view(batch, seq, heads, 3, d).unbind(dim=3)
        o, _ = delta_rule(q, k, v, beta, cu_seqlens=cu_seqlens, use_qk_l2norm=True,
                          backend=self.config.delta_rule_backend)
        o = self._o_norm(o).reshape(batch, seq, heads * d).transpose(0, 1).contiguous()
        out, _ = self.out_proj(o)
        return out

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
        as replicated)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(own, prefix, {"conv_weight": 0}, sharded_offsets,
                                                      tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
        return sharded


# --------------------------------------------------------------------------------------------------------------
# fla's DeltaNet weights <-> the fused layout (full tensors, TP = 1)
# --------------------------------------------------------------------------------------------------------------


def fla_to_fused_state(fla_state: dict, heads: int) -> dict:
    """fla ``DeltaNet`` state dict (use_beta, short convs without bias, no gate) -> DeltaNetMixer's full weights."""
    q, k, v, b = (fla_state[f"{n}_proj.weight"] for n in "qkvb")
    hidden = q.shape[1]
    per_head = [w.reshape(heads, -1, hidden) for w in (q, k, v, b)]  # [H, d, hidden] x3, [H, 1, hidden]
    convs = [fla_state[f"{n}_conv1d.weight"] for n in "qkv"]  # nn.Conv1d weights [H*d, 1, K]
    conv_per_head = [w.reshape(heads, -1, w.shape[-1]) for w in convs]
    return {
        "in_proj.weight": torch.cat(per_head, dim=1).reshape(-1, hidden),
        "conv_weight": torch.cat(conv_per_head, dim=1).reshape(-1, convs[0].shape[-1]),
        "o_norm_weight": fla_state["o_norm.weight"],
        "out_proj.weight": fla_state["o_proj.weight"],
    }


def fused_to_fla_state(state: dict, heads: int) -> dict:
    """The inverse of :func:`fla_to_fused_state`."""
    in_proj, conv = state["in_proj.weight"], state["conv_weight"]
    hidden, kernel = in_proj.shape[1], conv.shape[1]
    d = (in_proj.shape[0] // heads - 1) // 3
    q, k, v, b = in_proj.reshape(heads, 3 * d + 1, hidden).split([d, d, d, 1], dim=1)
    qc, kc, vc = conv.reshape(heads, 3 * d, kernel).split([d, d, d], dim=1)
    out = {f"{n}_proj.weight": w.reshape(-1, hidden) for n, w in zip("qkvb", (q, k, v, b))}
    out.update({f"{n}_conv1d.weight": w.reshape(heads * d, 1, kernel) for n, w in zip("qkv", (qc, kc, vc))})
    out["o_norm.weight"] = state["o_norm_weight"]
    out["o_proj.weight"] = state["out_proj.weight"]
    return out
