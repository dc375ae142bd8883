"""RMSNorm that works with sequence parallelism on the local (non-TE) path.

megatron's WrappedTorchNorm refuses sequence parallelism. This one marks its weight ``sequence_parallel`` so that
megatron's finalize_model_grads sums its gradient over TP ranks (each sees a different slice of the sequence).
"""

from __future__ import annotations

import torch

from megatron_flash.ops.rms_norm import rms_norm


class RMSNorm(torch.nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 (one fused kernel on GPUs: ops/rms_norm.py)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
