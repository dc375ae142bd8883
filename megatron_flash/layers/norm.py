"""RMSNorm that works with sequence parallelism on the local (non-TE) path.

megatron's WrappedTorchNorm refuses sequence parallelism. This one marks its weight ``sequence_parallel`` so that
megatron's finalize_model_grads sums its gradient over TP ranks (each sees a different slice of the sequence).

:func:`add_and_norm` is how the residual stream's norms are applied: the previous layer's residual add is done in
the norm's kernel (ops.rms_norm.add_rms_norm).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_flash.ops.rms_norm import add_rms_norm, rms_norm


class RMSNorm(torch.nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 (one fused kernel on GPUs: ops/rms_norm.py)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None):
        """The norm of ``x``; with ``add``, ``(x + add, norm(x + add))`` in one kernel (ops.rms_norm.add_rms_norm).
        Both go through the module call, so module hooks (megatron's parameter all-gather waits) see the weight
        read."""
        if add is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, add, self.weight, self.eps)


def add_and_norm(norm: torch.nn.Module, residual: torch.Tensor,
                 pending: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual + pending, norm(residual + pending))``; ``pending`` None stands for zero (a stage's first layer).

    With :class:`RMSNorm` the add runs in the norm's fused kernel, forward and backward; another norm (Transformer
    Engine's, from the TE specs) gets the plain add first."""
    if pending is None:
        return residual, norm(residual)
    if isinstance(norm, RMSNorm):
        return norm(residual, add=pending)
    residual = residual + pending
    return residual, norm(residual)
