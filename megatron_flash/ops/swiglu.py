"""SwiGLU ``silu(y1) * y2`` of y = [y1 | y2], split in two halves of F along the last dimension: the FFN's fc1
output, where each TP rank holds [gate_r | up_r], so the split is local. Math in fp32 (fp64 stays fp64 on the torch
backend), results in y's dtype.

Why not megatron's ``bias_swiglu_impl``: its backward returns ``torch.cat((dy1, dy2), -1)``, which torch.compile
turns into one pointwise kernel over the 2F-wide output whose every element loads y1, y2 and g under masks, so y and g
are read twice: 1.82 ms per layer at the 1B step's fc1 output ([69632, 12288] bf16) on an H200, where one pass would
take about 1 ms (this backward: 1.02 ms, against 1.49 for megatron's alone: docs/performance.md). Here the
backward's program for (row, a block of columns j < F) loads y1[j], y2[j] and g[j] once and writes both dy[j] and
dy[F + j]. Like megatron's, the autograd function saves only y.

Backends: ``triton`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and ``torch`` (the same math eagerly,
any device); ``auto`` takes triton for CUDA tensors where it is installed, else torch. :func:`swiglu_reference` is the
definition both are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_flash.ops.precision import at_least_fp32

try:  # the kernels need triton, an optional (gpu) dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch backend runs without it
    triton = None

BACKENDS = ("auto", "triton", "torch")

# columns of one half per program: 16 elements (two 16-byte bf16 vectors) per thread of the default 4 warps, and a
# divisor of the 1B model's F = 6144; not swept on a GPU
COLUMN_BLOCK = 2048


def swiglu_reference(y: torch.Tensor) -> torch.Tensor:
    """The definition: silu(y1) * y2 with y = [y1 | y2] along the last dimension, in y's dtype."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(gate, up, out, half_width, stride_in, BLOCK: tl.constexpr):
        """out[row, j] = silu(gate[row, j]) * up[row, j]; ``gate`` and ``up`` point into the same rows (their own
        pointers, so an F that keeps up 16-byte aligned lets its loads vectorize)."""
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = j < half_width
        a = tl.load(gate + row * stride_in + j, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(up + row * stride_in + j, mask=valid, other=0.0).to(tl.float32)
        tl.store(out + row * half_width + j, (a * tl.sigmoid(a) * b).to(out.dtype.element_ty), mask=valid)

    @triton.jit
    def _swiglu_bwd_kernel(gate, up, grad, d_gate, d_up, half_width, stride_in, stride_grad, stride_d,
                           BLOCK: tl.constexpr):
        """d_gate = g * up * silu'(gate) and d_up = g * silu(gate) from one load of gate, up and g each;
        silu'(a) = s * (1 + a * (1 - s)) with s = sigmoid(a)."""
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = j < half_width
        a = tl.load(gate + row * stride_in + j, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(up + row * stride_in + j, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(grad + row * stride_grad + j, mask=valid, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        tl.store(d_gate + row * stride_d + j, (g * b * s * (1.0 + a * (1.0 - s))).to(d_gate.dtype.element_ty),
                 mask=valid)
        tl.store(d_up + row * stride_d + j, (g * a * s).to(d_up.dtype.element_ty), mask=valid)


def _grid(rows: int, half_width: int) -> tuple:
    return rows, triton.cdiv(half_width, COLUMN_BLOCK)


class OnePassSwiGLUFunction(torch.autograd.Function):
    """y [rows, 2F] (unit column stride, any row stride) -> [rows, F] contiguous; the gradient is [rows, 2F]
    contiguous."""

    @staticmethod
    def forward(ctx, y, use_triton):
        rows, half_width = y.shape[0], y.shape[1] // 2
        if use_triton:
            out = torch.empty(rows, half_width, dtype=y.dtype, device=y.device)
            if out.numel():
                _swiglu_fwd_kernel[_grid(rows, half_width)](y, y[:, half_width:], out, half_width, y.stride(0),
                                                            BLOCK=COLUMN_BLOCK)
        else:
            gate, up = at_least_fp32(y).chunk(2, dim=-1)
            out = (F.silu(gate) * up).to(y.dtype)
        ctx.save_for_backward(y)
        ctx.use_triton = use_triton
        return out

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        rows, half_width = y.shape[0], y.shape[1] // 2
        if ctx.use_triton:
            grad = grad if grad.stride(-1) == 1 else grad.contiguous()
            dy = torch.empty(rows, 2 * half_width, dtype=y.dtype, device=y.device)
            if dy.numel():
                _swiglu_bwd_kernel[_grid(rows, half_width)](
                    y, y[:, half_width:], grad, dy, dy[:, half_width:], half_width, y.stride(0), grad.stride(0),
                    dy.stride(0), BLOCK=COLUMN_BLOCK)
        else:
            gate, up = at_least_fp32(y).chunk(2, dim=-1)
            g = at_least_fp32(grad)
            s = torch.sigmoid(gate)
            dy = torch.cat((g * up * s * (1 + gate * (1 - s)), g * gate * s), dim=-1).to(y.dtype)
        return dy, None


def swiglu(y: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(y1) * y2 for y [..., 2F] with unit stride in the last dimension; returns [..., F] in y's dtype.

    Leading dimensions are flattened: a view where their strides allow (the row stride may exceed 2F, e.g. a slice
    of a wider tensor), else a copy."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown swiglu backend {backend!r}; expected one of {BACKENDS}")
    if y.dim() == 0 or y.shape[-1] % 2:
        raise ValueError(f"swiglu splits the last dimension in two halves, so it must be even; got shape "
                         f"{tuple(y.shape)}")
    if y.stride(-1) != 1:
        raise ValueError(f"swiglu needs unit stride in the last dimension, got strides {y.stride()}")
    if backend == "auto":
        backend = "triton" if y.is_cuda and triton is not None else "torch"
    if backend == "triton" and triton is None:
        raise ValueError("swiglu backend 'triton' needs the triton package")
    out = OnePassSwiGLUFunction.apply(y.reshape(-1, y.shape[-1]), backend == "triton")
    return out.view(*y.shape[:-1], y.shape[-1] // 2)
