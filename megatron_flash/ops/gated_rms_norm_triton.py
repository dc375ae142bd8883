"""Triton kernels of Mamba2's gated RMSNorm (``ops.rms_norm.gated_rms_norm`` on GPUs), forward and backward.

``out = rmsnorm(y * silu(z)) * weight`` over groups of ``group_size`` channels of the flattened [heads * head_dim],
math in fp32, results in y's dtype: the definition is ``ops.rms_norm.gated_rms_norm_reference``.

Why not torch.compile: at the 1B step's [69632 rows, 4096 channels] bf16 on an H200, inductor's backward was two
kernels per layer (a per-row reduction, 1.1 ms, then a pointwise recompute, 0.8 ms) against a ~0.7 ms bandwidth
floor, its forward 0.67 ms against 0.36. Here the forward reads y and z once and writes out; the backward's program
for (a block of rows, a group) holds the whole group in one block, so it recomputes the gated input and its rms from
one load of y, z and the output gradient and writes dy and dz in the same pass. The weight gradient is summed over
the program's rows in registers and written as per-program fp32 partials [row programs, C], reduced by one
deterministic ``sum`` (no atomics).

Layouts: y and z are [d0, d1, heads, head_dim] (the layer's [s, b]) with any strides on the two leading dimensions,
read in place: y is the transposed scan output ([b, s] in memory), z a slice of the projection's output. Only the
channels must be flat (unit stride on head_dim, stride head_dim on heads), else they are copied first. out is
contiguous [d0, d1, C] (the out-projection's input); dy takes y's strides (``empty_like``: the scan's backward gets
its own layout back), dz is contiguous.
Tested against the fp64 formula on CPU under Triton's interpreter and on GPUs (tests/test_rms_norm.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# rows per backward program: the weight-gradient partials are [rows / ROWS_PER_PROGRAM, C] fp32, at 32 a sixteenth
# of the bf16 output gradient's bytes, and the 1B step's 69632 rows still make 2176 programs; not swept on a GPU
ROWS_PER_PROGRAM = 32


@triton.jit
def _gated_group(y, z, y_row, z_row, cols, valid):
    """y, z and the gated input y * silu(z) of one row's group, in fp32 (zero where not ``valid``)."""
    a = tl.load(y + y_row + cols, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(z + z_row + cols, mask=valid, other=0.0).to(tl.float32)
    sig = tl.sigmoid(b)
    return a, b, sig, a * b * sig


@triton.jit
def _gated_rms_norm_fwd_kernel(y, z, weight, out, lead1, channels, y_stride0, y_stride1, z_stride0, z_stride1,
                               group_size, eps, BLOCK: tl.constexpr):
    """One row's group per program: out = gated * rsqrt(mean(gated^2) + eps) * weight."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    valid = tl.arange(0, BLOCK) < group_size
    i0, i1 = (row // lead1).to(tl.int64), (row % lead1).to(tl.int64)
    _, _, _, gated = _gated_group(y, z, i0 * y_stride0 + i1 * y_stride1, i0 * z_stride0 + i1 * z_stride1, cols,
                                  valid)
    rstd = tl.rsqrt(tl.sum(gated * gated, axis=0) / group_size + eps)
    w = tl.load(weight + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out + row.to(tl.int64) * channels + cols, (gated * rstd * w).to(out.dtype.element_ty), mask=valid)


@triton.jit
def _gated_rms_norm_bwd_kernel(y, z, weight, grad, dy, dz, dweight_partial, rows, rows_per_program, lead1, channels,
                               y_stride0, y_stride1, z_stride0, z_stride1, grad_stride0, grad_stride1, dy_stride0,
                               dy_stride1, group_size, eps, BLOCK: tl.constexpr):
    """For each row of the program's block, with n = gated * rstd and dn = grad * weight:
    d_gated = rstd * (dn - n * mean(dn * n)), dy = d_gated * silu(z), dz = d_gated * y * silu'(z) with
    silu'(b) = s * (1 + b * (1 - s)), s = sigmoid(b); and the program's partial sum of grad * n for the weight."""
    block = tl.program_id(0)
    cols = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    valid = tl.arange(0, BLOCK) < group_size
    w = tl.load(weight + cols, mask=valid, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK], dtype=tl.float32)
    first = block.to(tl.int64) * rows_per_program  # an int64 loop index: row offsets may pass 2^31 elements
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        i0, i1 = row // lead1, row % lead1
        a, b, sig, gated = _gated_group(y, z, i0 * y_stride0 + i1 * y_stride1, i0 * z_stride0 + i1 * z_stride1,
                                        cols, valid)
        g = tl.load(grad + i0 * grad_stride0 + i1 * grad_stride1 + cols, mask=valid, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(gated * gated, axis=0) / group_size + eps)
        normed = gated * rstd
        dnormed = g * w
        dgated = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / group_size))
        tl.store(dy + i0 * dy_stride0 + i1 * dy_stride1 + cols, (dgated * b * sig).to(dy.dtype.element_ty),
                 mask=valid)
        tl.store(dz + row * channels + cols,
                 (dgated * a * sig * (1.0 + b * (1.0 - sig))).to(dz.dtype.element_ty), mask=valid)
        dweight += g * normed
    tl.store(dweight_partial + block.to(tl.int64) * channels + cols, dweight, mask=valid)


def _launch_shape(group_size: int) -> tuple:
    """The group's block (a power of two) and warps for it: 16 elements of each tensor per thread for groups of 1025
    to 8192 channels (the 1B model's 4096, the 3B's 6144; the backward holds ~8 such tensors in registers); not swept
    on a GPU."""
    block = triton.next_power_of_2(group_size)
    return block, min(max(block // 512, 4), 16)


class GatedRMSNormFunction(torch.autograd.Function):
    """y, z [d0, d1, H, P] with flat channels (see :func:`gated_rms_norm_triton`), weight [H * P] -> out
    [d0, d1, H * P] contiguous; saves y, z and weight."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):
        lead0, lead1 = y.shape[:2]
        channels = y.shape[2] * y.shape[3]
        out = torch.empty(lead0, lead1, channels, dtype=y.dtype, device=y.device)
        if out.numel():
            block, warps = _launch_shape(group_size)
            _gated_rms_norm_fwd_kernel[(lead0 * lead1, channels // group_size)](
                y, z, weight, out, lead1, channels, *y.stride()[:2], *z.stride()[:2], group_size, eps, BLOCK=block,
                num_warps=warps)
        ctx.save_for_backward(y, z, weight)
        ctx.group_size, ctx.eps = group_size, eps
        return out

    @staticmethod
    def backward(ctx, grad):
        y, z, weight = ctx.saved_tensors
        lead0, lead1 = y.shape[:2]
        rows, channels = lead0 * lead1, weight.shape[0]
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        dy = torch.empty_like(y)
        dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        row_programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
        dweight_partial = torch.zeros(row_programs, channels, dtype=torch.float32, device=y.device)
        if rows and channels:
            block, warps = _launch_shape(ctx.group_size)
            _gated_rms_norm_bwd_kernel[(row_programs, channels // ctx.group_size)](
                y, z, weight, grad, dy, dz, dweight_partial, rows, ROWS_PER_PROGRAM, lead1, channels, *y.stride()[:2],
                *z.stride()[:2], *grad.stride()[:2], *dy.stride()[:2], ctx.group_size, ctx.eps, BLOCK=block,
                num_warps=warps)
        return dy, dz, dweight_partial.sum(0).to(weight.dtype), None, None


def _flat_channels(t: torch.Tensor) -> torch.Tensor:
    """t [..., H, P] if channel h * P + p lies h * P + p elements from its row's start, else a contiguous copy."""
    heads, head_dim = t.shape[-2:]
    flat = (head_dim == 1 or t.stride(-1) == 1) and (heads == 1 or t.stride(-2) == head_dim)
    return t if flat else t.contiguous()


def gated_rms_norm_triton(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                          eps: float) -> torch.Tensor:
    """rmsnorm(y * silu(z)) * weight over groups of ``group_size`` channels, for y, z [d0, d1, H, P] (any strides on
    d0 and d1; channels not flat are copied) and weight [H * P]; returns [d0, d1, H * P] contiguous in y's dtype."""
    if y.dim() != 4 or z.shape != y.shape:
        raise ValueError(f"gated_rms_norm's triton kernels need y and z of one shape [d0, d1, heads, head_dim], got "
                         f"{tuple(y.shape)} and {tuple(z.shape)}")
    channels = y.shape[2] * y.shape[3]
    if weight.shape != (channels,) or group_size <= 0 or channels % group_size:
        raise ValueError(f"gated_rms_norm needs a weight of shape ({channels},) and a group size dividing "
                         f"{channels}, got {tuple(weight.shape)} and {group_size}")
    return GatedRMSNormFunction.apply(_flat_channels(y), _flat_channels(z), weight.contiguous(), group_size, eps)
