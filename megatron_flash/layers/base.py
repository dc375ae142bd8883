"""The residual block every layer shares, and the interface a mixer implements.

A layer is ``x + mixer(norm(x))``, computed as ``(x, mixer(norm(x)))``: the next layer's norm does the add in its
kernel (HybridLayer.forward). A mixer (DeltaNet, Mamba2, attention, FFN) is a MegatronModule built from a
ModuleSpec with ``(config, layer_number, submodules=...)`` and called as ``mixer(hidden_states, inputs)``:

* ``hidden_states``: [sequence, batch, hidden], sequence-sharded over TP ranks when ``config.sequence_parallel``;
* ``inputs``: :class:`MixerInputs`, what some mixers need beyond the hidden states;
* returns a tensor of the same shape and sharding (the TP reduction of the output projection already done).

Weight normalization (megatron_flash.training.weight_norm) finds the matrices to normalize through the
``weight_norm`` attribute a mixer sets on them: ``"rows"`` for a matrix that reads the residual stream, ``"cols"``
for one that writes into it. Setting it where the matrix is created keeps that fact in one place.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_flash.layers.norm import add_and_norm
from megatron_flash.layers.shared_prefix import MetaPrefix

READS_RESIDUAL = "rows"
WRITES_RESIDUAL = "cols"


def mark_weight_norm(param: torch.nn.Parameter, kind: str) -> None:
    """Declare that ``param`` gets unit-norm rows (``"rows"``) or columns (``"cols"``) after each step."""
    if kind not in (READS_RESIDUAL, WRITES_RESIDUAL):
        raise ValueError(f"weight_norm kind must be 'rows' or 'cols', got {kind!r}")
    param.weight_norm = kind


class _DenseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def dense_grad(piece: torch.Tensor) -> torch.Tensor:
    """``piece`` itself; its gradient made contiguous in backward.

    For the pieces of a projection's output split along the last dimension (the split's backward is one ``cat``)
    that are used transposed: their gradients arrive as transposed views, and one non-contiguous input sends the
    whole ``cat`` down PyTorch's element-by-element kernel instead of its vectorized one."""
    return _DenseGrad.apply(piece)


class _RowsFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, first):
        ctx.first, ctx.shape = first, tensor.shape
        return tensor[first:]

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_empty(ctx.shape)
        full[:ctx.first].zero_()
        full[ctx.first:] = grad
        return full, None


def rows_from(tensor: torch.Tensor, first: int) -> torch.Tensor:
    """``tensor[first:]`` along dim 0, whose backward zero-fills only the ``first`` rows it drops (a slice's
    zero-fills the whole gradient, then copies into it; a full slice ``t[0:]`` still does): ``tensor`` itself for 0."""
    return _RowsFrom.apply(tensor, first) if first else tensor


@dataclass
class MixerInputs:
    """Per-forward inputs shared by all layers of the stack."""

    # [1, 1, s, s] boolean, True = masked; None means causal (attention builds its own mask from the config)
    attention_mask: Optional[torch.Tensor] = None
    # RoPE frequencies for the attention layers, [s, 1, 1, head_dim]
    rotary_pos_emb: Optional[torch.Tensor] = None
    # Document boundaries for packed sequences (cu_seqlens over the full sequence, meta tokens included)
    packed_seq_params: Optional[PackedSeqParams] = None
    # The first ``shared_prefix`` positions hold the same values in every column of the batch (the meta tokens);
    # the FFN, DeltaNet and Mamba2 may compute them once (layers/shared_prefix.py). 0: nothing shared.
    shared_prefix: int = 0
    # Those layers' results on the meta rows, computed once per optimizer step (shared_prefix.MetaPrefix; recorded
    # in its own pass over the meta tokens, then read by every micro-batch); None: each micro-batch computes them.
    meta_prefix: Optional[MetaPrefix] = None

    def shared_rows(self, layer_shares: bool) -> tuple[int, Optional[MetaPrefix]]:
        """(shared prefix, meta prefix) for a layer that shares the meta rows if ``layer_shares``, else (0, None)."""
        return (self.shared_prefix, self.meta_prefix) if layer_shares else (0, None)


@dataclass
class HybridLayerSubmodules:
    norm: Union[ModuleSpec, type]
    mixer: Union[ModuleSpec, type]


LAYER_RANGE_PREFIX = "megatron_flash.layer."


class HybridLayer(MegatronModule):
    """Pre-norm residual block around one mixer."""

    def __init__(self, config, submodules: HybridLayerSubmodules, layer_number: int, pg_collection=None):
        super().__init__(config=config)
        self.layer_number = layer_number  # global, 1-based, as in megatron's TransformerLayer
        self.norm = build_module(submodules.norm, config=config, hidden_size=config.hidden_size,
                                 eps=config.layernorm_epsilon)
        self.mixer = build_module(submodules.mixer, config=config, layer_number=layer_number)
        self.profiler_range = f"{LAYER_RANGE_PREFIX}{type(self.mixer).__name__}"

    def forward(self, residual: torch.Tensor, pending: Optional[torch.Tensor],
                inputs: MixerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The block with its residual add left to the next norm: returns ``(residual, mixer_out)``, whose sum is
        the block's output. ``pending`` is the previous block's ``mixer_out`` (None for a stage's first layer); it
        is added to ``residual`` in this block's norm kernel (layers.norm.add_and_norm), which saves the residual
        stream a separate add each way."""
        # A named range per layer type, so --profile can report forward time by layer type; only while profiling,
        # since a range costs ~5-15 us of host time even when nothing records it.
        profiling = torch.autograd.profiler._is_profiler_enabled
        with torch.profiler.record_function(self.profiler_range) if profiling else contextlib.nullcontext():
            residual, normed = add_and_norm(self.norm, residual, pending)
            return residual, self.mixer(normed, inputs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron's default, except that plain parameters the mixers shard over TP themselves (convolutions, SSM
        scalars) are saved as TP-sharded by their ``partition_dim``: megatron would save them as replicated."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for name, param in self.named_parameters():
            key = prefix + name
            entry = sharded.get(key)
            if (getattr(param, "tensor_model_parallel", False) and isinstance(entry, ShardedTensor)
                    and all(f == 1 for f in entry.axis_fragmentations)):
                sharded[key] = make_tp_sharded_tensor_for_checkpoint(
                    param, key, tp_axis=param.partition_dim, prepend_offsets=sharded_offsets)
        return sharded
