"""RMSNorm, Mamba2's gated RMSNorm and unit-L2 rows, computed in fp32 whatever the input dtype, fused on GPUs: by
torch.compile (ops/compile.py), the gated norm by our Triton kernels (ops/gated_rms_norm_triton.py).

``rms_norm(x, w) = x * rsqrt(mean(x^2) + eps) * w`` over the last dimension; ``add_rms_norm(x, d, w)`` is
``(x + d, rms_norm(x + d, w))``, the residual add fused into the norm that reads its result;
``gated_rms_norm(y, z, w) = rms_norm(y * silu(z)) * w`` with y, z [..., heads, head_dim] (any strides: the kernels
read views in place) flattened to [..., heads * head_dim] (contiguous) and normalized over groups of ``group_size``
of those channels (mamba_ssm's ``RMSNormGated`` with ``norm_before_gate=False``); :func:`gated_rms_norm_reference`
is its definition, what runs on the CPU and in fp64. Results are in x's (y's) dtype; fp64 stays fp64.
``unit_rows(w) = w / max(||w||_row, 1e-12)`` (``F.normalize(w, dim=1)``), the output layer's weight: eager, its
backward is 6 passes over the 131072 x h matrix; fused, one each way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_flash.ops.compile import compiled_on_cuda
from megatron_flash.ops.precision import at_least_fp32

try:  # our Triton kernels for the gated norm: need triton
    from megatron_flash.ops.gated_rms_norm_triton import gated_rms_norm_triton as _triton_gated_rms_norm
except ImportError:  # pragma: no cover - triton is an optional (gpu) dependency
    _triton_gated_rms_norm = None

# the dtypes the gated norm's Triton kernels take (fp64 runs the reference)
GATED_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = at_least_fp32(x)
    # contiguous whatever x's layout (a no-op for the residual stream's norms): compiled, the kernel writes that
    # layout itself, so DeltaNet's norm of a [s, b] view of its [b, s] output needs no transposing copy
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * at_least_fp32(weight)).to(x.dtype).contiguous()


rms_norm = compiled_on_cuda(_rms_norm)


@compiled_on_cuda
def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, rms_norm(x + delta, weight))``: a pre-norm residual stream's add and the next layer's norm.
    Compiled, one kernel each way in place of an add and a norm: forward reads x and delta once and writes both
    results; backward sums the sum's gradient with the norm's in the norm's kernel (autograd would add them in a
    separate pass). The sum is rounded to x's dtype before the norm reads it, as with the separate add."""
    total = x + delta
    return total, _rms_norm(total, weight, eps)


def gated_rms_norm_reference(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                             eps: float) -> torch.Tensor:
    """The definition of :func:`gated_rms_norm`, eager."""
    gated = (at_least_fp32(y) * F.silu(at_least_fp32(z))).flatten(-2)
    grouped = gated.unflatten(-1, (-1, group_size))
    normed = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)
    # contiguous, as the Triton kernels write it: the out-projection's input, where a pointwise result would follow
    # y's strides (the Mamba2 scan's [b, s] order)
    return (normed.flatten(-2) * at_least_fp32(weight)).to(y.dtype).contiguous()


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    """rms_norm(y * silu(z)) * weight over groups of ``group_size`` channels: y, z [..., heads, head_dim] -> [...,
    heads * head_dim] contiguous in y's dtype. The Triton kernels for CUDA tensors in fp32/bf16/fp16 (they need
    exactly two leading dimensions, the layer's [s, b]), else the eager reference."""
    if _triton_gated_rms_norm is not None and y.is_cuda and y.dtype in GATED_TRITON_DTYPES:
        return _triton_gated_rms_norm(y, z, weight, group_size, eps)
    return gated_rms_norm_reference(y, z, weight, group_size, eps)


@compiled_on_cuda
def unit_rows(weight: torch.Tensor) -> torch.Tensor:
    wide = at_least_fp32(weight)
    return (wide / torch.linalg.vector_norm(wide, dim=1, keepdim=True).clamp_min(1e-12)).to(weight.dtype)
