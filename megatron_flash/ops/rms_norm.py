"""RMSNorm, Mamba2's gated RMSNorm and unit-L2 rows, computed in fp32 whatever the input dtype, fused on GPUs
(ops/compile.py).

``rms_norm(x, w) = x * rsqrt(mean(x^2) + eps) * w`` over the last dimension;
``gated_rms_norm(y, z, w) = rms_norm(y * silu(z)) * w`` with y, z [..., heads, head_dim] (any strides: the fused
kernel reads views in place) flattened to [..., heads * head_dim] (contiguous) and normalized over groups of
``group_size`` of those channels (mamba_ssm's ``RMSNormGated`` with ``norm_before_gate=False``). Results are in x's
(y's) dtype; fp64 stays fp64. ``unit_rows(w) = w / max(||w||_row, 1e-12)`` (``F.normalize(w, dim=1)``), the output
layer's weight: eager, its backward is 6 passes over the 131072 x h matrix; fused, one each way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_flash.ops.compile import compiled_on_cuda


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@compiled_on_cuda
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = _wide(x)
    # contiguous whatever x's layout (a no-op for the residual stream's norms): compiled, the kernel writes that
    # layout itself, so DeltaNet's norm of a [s, b] view of its [b, s] output needs no transposing copy
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * _wide(weight)).to(x.dtype).contiguous()


@compiled_on_cuda
def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    gated = (_wide(y) * F.silu(_wide(z))).flatten(-2)
    grouped = gated.unflatten(-1, (-1, group_size))
    normed = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)
    # contiguous inside: compiled, the fused kernel writes that layout itself, where it would otherwise follow y's
    # strides (the Mamba2 scan's [b, s] order) and the out-projection's input would take a copy
    return (normed.flatten(-2) * _wide(weight)).to(y.dtype).contiguous()


@compiled_on_cuda
def unit_rows(weight: torch.Tensor) -> torch.Tensor:
    wide = _wide(weight)
    return (wide / torch.linalg.vector_norm(wide, dim=1, keepdim=True).clamp_min(1e-12)).to(weight.dtype)
