"""RMSNorm that works with sequence parallelism on the local (non-TE) path.

megatron's WrappedTorchNorm refuses sequence parallelism. This one marks its weight ``sequence_parallel`` so that
megatron's finalize_model_grads sums its gradient over TP ranks (each sees a different slice of the sequence).

:func:`add_and_norm` is how the residual stream's norms are applied: the previous layer's residual add is done in
the norm's kernel (ops.rms_norm.add_rms_norm).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_flash.layers.shared_prefix import PrefixSplit, joined, split_shared_prefix
from megatron_flash.ops.rms_norm import add_rms_norm, add_rms_norm_split, rms_norm


class RMSNorm(torch.nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 (one fused kernel on GPUs: ops/rms_norm.py)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor, add=None, split: Optional[tuple[int, int]] = None):
        """The norm of ``x``; with ``add``, ``(x + add, norm(x + add))`` in one kernel (ops.rms_norm.add_rms_norm).
        ``add`` may be a :class:`PrefixSplit` and ``split`` = (prefix, history) asks for the norm as one
        (ops.rms_norm.add_rms_norm_split); with either, the result is a pair. Every form goes through the module
        call, so module hooks (megatron's parameter all-gather waits) see the weight read."""
        if split is None and not isinstance(add, PrefixSplit):
            if add is None:
                return rms_norm(x, self.weight, self.eps)
            return add_rms_norm(x, add, self.weight, self.eps)
        delta = (None, None) if add is None else (add.shared, add.rest) if isinstance(add, PrefixSplit) else None
        if delta is None:  # a plain delta with a split norm: the plain add's kernel, then the split
            total, normed = add_rms_norm(x, add, self.weight, self.eps)
            return total, PrefixSplit(*split_shared_prefix(normed, *split), split[1])
        prefix, history = split if split is not None else (0, 0)
        total, normed = add_rms_norm_split(x, *delta, self.weight, self.eps, prefix, history)
        return total, (PrefixSplit(*normed, history) if prefix else normed)


def add_and_norm(norm: torch.nn.Module, residual: torch.Tensor, pending,
                 split: Optional[tuple[int, int]] = None):
    """``(residual + pending, norm(residual + pending))``; ``pending`` None stands for zero (a stage's first layer).
    ``pending`` may be a :class:`PrefixSplit` (a mixer's output, unjoined), and ``split`` = (prefix, history) asks
    for the norm as one (a mixer's input: layers/shared_prefix.py).

    With :class:`RMSNorm` the add, the join and the split run in the norm's fused kernel, forward and backward;
    another norm (Transformer Engine's, from the TE specs) gets them as separate steps."""
    if isinstance(norm, RMSNorm):
        if pending is None and split is None:
            return residual, norm(residual)
        return norm(residual, add=pending, split=split)
    if pending is not None:
        residual = residual + joined(pending)
    normed = norm(residual)
    return residual, (normed if split is None else PrefixSplit(*split_shared_prefix(normed, *split), split[1]))
