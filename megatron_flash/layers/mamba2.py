"""Mamba2 mixer: the released Nemotron-Flash Mamba2 layer (mamba_ssm's ``Mamba2``, ngroups = 1,
norm_before_gate = False) as a tensor-parallel megatron module.

Math (d_inner = config.mamba_expand * hidden, H = d_inner / P heads of P = config.mamba_head_dim channels,
G = config.mamba_num_groups groups of N = config.mamba_state_dim):

    z, x, dt = x W_z, x W_x, x W_dt               [d_inner], [d_inner], [H]
    B, C     = x W_B, x W_C                       [G*N] each
    x, B, C  = silu(causal_conv(x, B, C) + bias)  depthwise, kernel config.mamba_conv_kernel
    dt       = softplus(dt + dt_bias);  A = -exp(A_log)
    y        = SSD(x, dt, A, B, C) + D x           (ops.ssd; head h reads group h // (H/G))
    y        = rmsnorm(y * silu(z)) * norm_weight  RMS over groups of d_inner/G channels, fp32
    out      = y W_out

Megatron form. TP shards heads; a contiguous split of each full tensor is its TP shard, except for ``in_proj``,
which is stacked from sections as in megatron's MambaMixer (models/layout.py: each rank holds its heads' part of
every section; checkpoints store each section as a tensor of its own, ``in_proj.weight.z`` ..., so they load under
any TP size):

* ``in_proj.weight`` (column-parallel, [H*(2P+1), hidden]): sections [z (d_inner), x (d_inner), dt (H)], head-major
  within each; one rank's projection output is then [z | x | dt] of its heads, read in place with aligned loads;
* ``bc_proj_weight`` ([2GN, hidden], B rows then C rows): replicated on every TP rank (one group cannot be split);
* ``conv_x_weight`` / ``conv_x_bias`` ([d_inner, K] / [d_inner], TP-sharded): the conv channels of x, per head;
* ``conv_bc_weight`` / ``conv_bc_bias`` ([2GN, K] / [2GN]): the conv channels of B then C, replicated;
* ``dt_bias``, ``A_log``, ``D`` ([H]) and ``norm_weight`` ([d_inner]): TP-sharded by head;
* ``out_proj.weight`` (row-parallel, [hidden, d_inner]): columns per head.

The released checkpoint's ``in_proj`` is [z, x, B, C, dt] and its ``conv1d`` covers [x, B, C]: inserting B and C
is all an exporter needs.

Replicated parameters: each rank uses B and C only for its own heads, so the gradient a rank computes for
``bc_proj_weight`` / ``conv_bc_*`` (and for the input through B/C) is its heads' share. They are used through
``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), which sums the shares, leaving
the full gradient on every rank. They carry no ``sequence_parallel`` attribute: megatron would all-reduce those
gradients over TP a second time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
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
from megatron_flash.ops.precision import at_least_fp32
from megatron_flash.ops.rms_norm import gated_rms_norm
from megatron_flash.ops.short_conv import causal_conv1d, conv_init_
from megatron_flash.ops.ssd import ssd_scan

# mamba_ssm / megatron MambaMixer initialization constants
A_INIT_RANGE = (1.0, 16.0)
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4

# Own parameters split over TP along dim 0 (by head); the others are replicated.
TP_SHARDED_PARAMS = ("conv_x_weight", "conv_x_bias", "dt_bias", "A_log", "D", "norm_weight")
REPLICATED_PARAMS = ("bc_proj_weight", "conv_bc_weight", "conv_bc_bias")
# names of in_proj's sections (checkpoint keys ``in_proj.weight.<name>``)
IN_PROJ_SECTIONS = ("z", "x", "dt")


@dataclass
class Mamba2Submodules:
    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


# --------------------------------------------------------------------------------------------------------------
# Initializers (mamba_ssm's), each applied to a whole tensor
# --------------------------------------------------------------------------------------------------------------


def dt_bias_init_(t: torch.Tensor) -> None:
    """softplus^{-1}(dt), dt = exp(U(log DT_MIN, log DT_MAX)) clamped at DT_INIT_FLOOR: softplus(dt_bias) in range."""
    dt = torch.exp(torch.rand_like(t) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
    dt = dt.clamp(min=DT_INIT_FLOOR)
    t.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


def a_log_init_(t: torch.Tensor) -> None:
    t.copy_(torch.log(torch.empty_like(t).uniform_(*A_INIT_RANGE)))


# --------------------------------------------------------------------------------------------------------------
# TP helpers
# --------------------------------------------------------------------------------------------------------------


class _AllReduceSumBothWays(torch.autograd.Function):
    """All-reduce SUM over the TP group in forward AND in backward.

    The gated RMSNorm normalizes each rank's channels by a mean square taken over all ranks' channels. So every
    rank's part of the loss depends on every rank's contribution to that sum, and the gradient reaching one
    contribution is the SUM over ranks of the gradients of the shared total: an all-reduce in backward too.
    megatron's reduce_from_tensor_model_parallel_region has an identity backward, which is right only when what
    follows the reduction is the same on every rank (then each rank's gradient is already the full one); here each
    rank normalizes different channels, so identity would drop the other ranks' terms.
    """

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = partial.clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _summed_grad(param: torch.Tensor, group) -> torch.Tensor:
    """A replicated parameter as used by one rank: identity forward; backward sums the ranks' partial gradients."""
    return tensor_parallel.copy_to_tensor_model_parallel_region(param, group=group)


# --------------------------------------------------------------------------------------------------------------
# The mixer
# --------------------------------------------------------------------------------------------------------------


class Mamba2Mixer(MegatronModule):
    """``mixer(hidden_states [s, b, hidden], inputs) -> [s, b, hidden]`` (see the module docstring)."""

    def __init__(self, config, layer_number: int, submodules: Mamba2Submodules, pg_collection=None):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.tp_group = (pg_collection.tp if pg_collection is not None
                         else parallel_state.get_tensor_model_parallel_group())
        self.tp_size, self.tp_rank = self.tp_group.size(), self.tp_group.rank()
        self._set_shapes(config)
        P, N, G, K = self.head_dim, self.state_dim, self.groups, self.conv_kernel

        self.in_proj = build_module(
            submodules.in_proj, config.hidden_size, self.heads * (2 * P + 1), config=config,
            init_method=config.init_method, gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="fc1", tp_group=self.tp_group)
        stack_sections(self.in_proj.weight, [self.inner_local, self.inner_local, self.heads_local])
        mark_weight_norm(self.in_proj.weight, READS_RESIDUAL)

        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        dtype = config.params_dtype
        new = lambda *shape: torch.nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))  # noqa: E731
        self.bc_proj_weight = new(2 * G * N, config.hidden_size)
        mark_weight_norm(self.bc_proj_weight, READS_RESIDUAL)
        self.conv_x_weight = new(self.inner_local, K)
        self.conv_x_bias = new(self.inner_local)
        self.conv_bc_weight = new(2 * G * N, K)
        self.conv_bc_bias = new(2 * G * N)
        self.dt_bias = new(self.heads_local)
        self.A_log = new(self.heads_local)
        self.D = new(self.heads_local)
        self.norm_weight = new(self.inner_local)
        for name in TP_SHARDED_PARAMS:
            set_tensor_model_parallel_attributes(getattr(self, name), is_parallel=True, dim=0, stride=1)

        self.out_proj = build_module(
            submodules.out_proj, self.inner, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name="fc2", tp_group=self.tp_group)
        mark_weight_norm(self.out_proj.weight, WRITES_RESIDUAL)
        self.reset_parameters()

    def _set_shapes(self, config) -> None:
        self.hidden = config.hidden_size
        self.head_dim, self.state_dim = config.mamba_head_dim, config.mamba_state_dim
        self.groups, self.conv_kernel = config.mamba_num_groups, config.mamba_conv_kernel
        self.inner = config.mamba_inner_size
        if self.inner % self.head_dim != 0:
            raise ValueError(f"mamba inner size {self.inner} must be a multiple of mamba_head_dim {self.head_dim}")
        self.heads = self.inner // self.head_dim
        if self.heads % self.tp_size != 0:
            raise ValueError(f"Mamba2 heads ({self.heads}) must be divisible by tensor-parallel size {self.tp_size}")
        if self.heads % self.groups != 0:
            raise ValueError(f"Mamba2 heads ({self.heads}) must be a multiple of mamba_num_groups ({self.groups})")
        # Either each rank holds whole groups or each rank's heads lie inside one group. Then a rank's heads read a
        # contiguous slice of the groups, with the same heads-per-group as the full layer, which is what ssd_scan's
        # head -> group mapping (h // (H/G)) expects of the local heads and groups.
        if self.groups % self.tp_size != 0 and self.tp_size % self.groups != 0:
            raise ValueError(f"mamba_num_groups ({self.groups}) and tensor-parallel size ({self.tp_size}) must "
                             f"divide one another")
        self.heads_local = self.heads // self.tp_size
        self.inner_local = self.heads_local * self.head_dim
        heads_per_group = self.heads // self.groups
        first_head = self.tp_rank * self.heads_local
        self.group_range = (first_head // heads_per_group, (first_head + self.heads_local - 1) // heads_per_group + 1)

    # ----------------------------------------------------------------------------------------------------------
    # Initialization
    # ----------------------------------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """mamba_ssm's init. Under use_cpu_initialization every TP-sharded tensor is drawn whole from the default
        generator (seeded alike on all TP ranks) and this rank keeps its rows: the same numbers at every TP size.
        Otherwise each rank draws its own rows under megatron's model-parallel RNG, as megatron's layers do.
        Replicated tensors are drawn whole from the default generator on every rank (identical across TP)."""
        if not self.config.perform_initialization:
            return
        conv_ = functools.partial(conv_init_, kernel=self.conv_kernel)
        with torch.no_grad():
            if self.config.use_cpu_initialization:  # megatron's linear would shard its full draw contiguously
                initialize_as_full(self.in_proj.weight, self.config.init_method, self.tp_size, self.tp_rank)
            self.config.init_method(self.bc_proj_weight)
            self._init_sharded(self.conv_x_weight, conv_)
            self._init_sharded(self.conv_x_bias, conv_)
            conv_(self.conv_bc_weight)
            conv_(self.conv_bc_bias)
            self._init_sharded(self.dt_bias, dt_bias_init_)
            self._init_sharded(self.A_log, a_log_init_)
            self.D.fill_(1.0)
            self.norm_weight.fill_(1.0)

    def _init_sharded(self, param: torch.Tensor, init_: Callable[[torch.Tensor], None]) -> None:
        if not self.config.use_cpu_initialization:
            with get_cuda_rng_tracker().fork():
                init_(param)
            return
        initialize_as_full(param, init_, self.tp_size, self.tp_rank)

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, inputs: Optional[MixerInputs] = None) -> torch.Tensor:
        # (unless --no-share-meta-prefix) the meta prefix once per micro-batch, or its scan state recorded once per
        # step (MetaPrefix), then every sequence's text from that scan state
        prefix, meta_prefix = inputs.shared_rows(self.config.share_meta_prefix_in_mixers) if inputs else (0, None)
        return run_prefix_once(functools.partial(self._mix, inputs=inputs), hidden_states, prefix,
                               self.conv_kernel - 1, meta_prefix, self.layer_number)

    def _mix(self, hidden_states, inputs=None, history=0, initial_state=None, output_final_state=False):
        """The mixer over [s, b, h] whose first ``history`` rows are only the short convs' window (no output for
        them), from the scan's ``initial_state``: (output [s - history, b, h], final scan state or None)."""
        P, N = self.head_dim, self.state_dim
        projected, _ = self.in_proj(hidden_states)  # [s, b, 2*inner_local + H_local]: full sequence, local heads
        batch = projected.shape[1]
        seq = projected.shape[0] - history
        # split, not three slices: backward then writes the projection's gradient in one pass (one cat), where
        # slices would each zero-fill and add a full-size tensor; z is read in place by the norm, x by the conv
        z, x, dt = projected.split([self.inner_local, self.inner_local, self.heads_local], dim=-1)
        # dt is used transposed: its gradient made dense keeps the split's cat vectorized (the conv writes x's and
        # the gated norm z's dense already)
        dt = dense_grad(rows_from(dt, history)).transpose(0, 1)
        bc = self._project_bc(hidden_states).transpose(0, 1)  # [b, s, 2GN]
        cu_seqlens = self._cu_seqlens(inputs, seq, batch)

        x, _ = causal_conv1d(x.transpose(0, 1), self.conv_x_weight, self.conv_x_bias, activation="silu",
                             cu_seqlens=cu_seqlens, backend=self.config.short_conv_backend, history=history)
        bc, _ = causal_conv1d(bc, _summed_grad(self.conv_bc_weight, self.tp_group),
                              _summed_grad(self.conv_bc_bias, self.tp_group), activation="silu",
                              cu_seqlens=cu_seqlens, backend=self.config.short_conv_backend, history=history)
        first_group, end_group = self.group_range  # the groups this rank's heads read
        Bm, Cm = bc.view(batch, seq, 2, self.groups, N)[:, :, :, first_group:end_group].unbind(dim=2)

        y, final = ssd_scan(
            x.view(batch, seq, self.heads_local, P), F.softplus(at_least_fp32(dt) + at_least_fp32(self.dt_bias)),
            -torch.exp(at_least_fp32(self.A_log)), Bm, Cm, at_least_fp32(self.D),
            chunk_size=self.config.mamba_chunk_size, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=self.config.ssd_backend)
        z = rows_from(z, history).view(seq, batch, self.heads_local, P)
        out, _ = self.out_proj(self._gated_rms_norm(y.transpose(0, 1), z).contiguous())
        return out, final

    def _project_bc(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """B and C for the full sequence from the replicated ``bc_proj_weight``, prepared as ColumnParallelLinear
        prepares its input: all-gathered over the sequence under sequence parallelism (backward reduce-scatters
        the partial input gradient), else used as is with an all-reduce of the partial input gradient."""
        if self.config.sequence_parallel and self.tp_size > 1:
            full = tensor_parallel.gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)
        else:
            full = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        return F.linear(full, _summed_grad(self.bc_proj_weight, self.tp_group))

    def _gated_rms_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """rmsnorm(y * silu(z)) * norm_weight in fp32 over groups of d_inner/G channels; result in y's dtype.
        y, z: [s, b, H_local, P] in any layout (views of the scan output and the projection); result [s, b,
        inner_local]."""
        group_size = self.inner // self.groups
        if self.groups % self.tp_size == 0:  # this rank holds whole groups: a local norm (fused on GPUs)
            return gated_rms_norm(y, z, self.norm_weight, group_size, self.config.mamba_norm_eps)
        # this rank's channels are part of one group spread over several ranks
        gated = (at_least_fp32(y) * F.silu(at_least_fp32(z))).flatten(-2)  # [s, b, inner_local]
        square_sum = gated.square().sum(-1, keepdim=True)
        if self.groups > 1:  # place it in its group's slot so one all-reduce serves every group
            slot = F.one_hot(torch.tensor(self.group_range[0]), self.groups).to(square_sum)
            square_sum = _AllReduceSumBothWays.apply(square_sum * slot, self.tp_group)
            square_sum = square_sum[..., self.group_range[0]:self.group_range[0] + 1]
        else:
            square_sum = _AllReduceSumBothWays.apply(square_sum, self.tp_group)
        normed = gated * torch.rsqrt(square_sum / group_size + self.config.mamba_norm_eps)
        return (normed * at_least_fp32(self.norm_weight)).to(y.dtype)

    @staticmethod
    def _cu_seqlens(inputs: Optional[MixerInputs], seq: int, batch: int) -> Optional[torch.Tensor]:
        """Document bounds over the full sequence, or None. Tokens past the last bound (trailing padding) form one
        more document, as in megatron's MambaMixer."""
        params = inputs.packed_seq_params if inputs is not None else None
        if params is None:
            return None
        if params.qkv_format not in (None, "thd"):
            raise ValueError(f"Mamba2 needs packed_seq_params in 'thd' format, got {params.qkv_format!r}")
        if batch != 1:
            raise ValueError(f"packed sequences need micro-batch size 1, got {batch}")
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu = cu.to(torch.long)
        if int(cu[-1]) < seq:
            cu = torch.cat([cu, cu.new_tensor([seq])])
        return cu

    # ----------------------------------------------------------------------------------------------------------
    # Checkpointing
    # ----------------------------------------------------------------------------------------------------------

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """As MegatronModule's, with the TP-sharded own parameters declared split on dim 0 (the default treats
        own parameters as replicated, which is right for bc_proj_weight and conv_bc_*) and in_proj stored section
        by section."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(own, prefix, {name: 0 for name in TP_SHARDED_PARAMS},
                                                      sharded_offsets, tp_group=self.tp_group,
                                                      dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
        key = f"{prefix}in_proj.weight"
        sharded[key] = split_sharded_sections(sharded[key], self.in_proj.weight, IN_PROJ_SECTIONS)
        return sharded
