"""Triton kernels of the depthwise causal short conv (``ops.short_conv``'s ``triton`` backend), forward and backward.

Why not fla's kernel: the layers' conv inputs are slices of a projection's output in megatron's [s, b] layout
(DeltaNet's q/k/v, Mamba2's x) seen as [B, T, C], or its transpose (Mamba2's B/C). fla's kernel wants a contiguous
[B, T, C], so each call of it copied its input first. These kernels read x in place through its three strides and
write y contiguous [B, T, C] and dx in x's order of batch and time (so that the layers' concatenation of the
projection's gradient copies dense pieces). With a unit channel stride and 16-byte aligned rows (the layers' projections
are laid out so: models/layout.py), Triton's specialization of such arguments gives vectorized loads. (The
earlier per-head rows of 385 and 129 elements allowed only 2-byte loads: ~1 TB/s in a profile of the 1B step.)
The backward recomputes the pre-activation and writes the gradient g at it (one kernel), then reads x once and g at
the K shifted positions for dx, and for the weight and bias gradients as per-tile partial sums (fla's pairing: tap
K-1-j sums g[t+j] * x[t]), reduced by one deterministic ``sum`` (no atomics). (One kernel recomputing the
pre-activation at the K outputs reading each x[t] was 1.4-3x slower on an H200: docs/performance.md.)

Packed documents: ``starts[t]`` is the first position of t's document (B is 1); taps before it read zero.
Sections: with ``sections`` S, y is [B, T, S, C/S] stored section-major (the strides of a contiguous
[S, B, T, C/S] permuted), so that each section ``y[:, :, i]`` is contiguous: DeltaNet's q, k and v, which fla's
delta-rule kernels would otherwise copy.
Tested against ``short_conv.causal_conv1d_reference`` on CPU under Triton's interpreter and on GPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_flash.ops.packed import document_index

# (tokens, channels, warps) per program: of five tiles, the fastest on DeltaNet's q/k/v and Mamba2's x at the 1B
# shapes on an H200, at Triton's default of 4 warps (benchmarks/gpu_short_conv.py --tiles; docs/performance.md)
FWD_TILE = (64, 64, 4)
BWD_TILE = (64, 128, 4)


@triton.jit
def _tap_tile(x_b, src, first, valid_t, x_c, valid_c, stride_t):
    """x at positions ``src`` [BT] (zero before the document's ``first`` position or past the end) as fp32."""
    ok = valid_t & (src >= first)
    ptrs = x_b + src.to(tl.int64)[:, None] * stride_t + x_c[None, :]
    return tl.load(ptrs, mask=ok[:, None] & valid_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x_b, w, b, u, first, valid_u, x_c, c, valid_c, stride_t,
                    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """bias + sum_i w[c, i] * x[u - K + 1 + i] for a tile of output positions ``u``."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b + c, mask=valid_c, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(K):
        tap = tl.load(w + c * K + i, mask=valid_c, other=0.0).to(tl.float32)
        acc += _tap_tile(x_b, u - (K - 1 - i), first, valid_u, x_c, valid_c, stride_t) * tap[None, :]
    return acc


@triton.jit
def _document_starts(starts, t, valid_t, BT: tl.constexpr, HAS_STARTS: tl.constexpr, HISTORY: tl.constexpr):
    """The first position each of ``t`` may read: its document's start, else -HISTORY (the history rows)."""
    if HAS_STARTS:
        first = tl.load(starts + t, mask=valid_t, other=0)
    else:
        first = tl.zeros([BT], dtype=tl.int32) - HISTORY
    return first


@triton.jit
def _conv_pre_activation_kernel(x, w, b, starts, dy, out, T, C, stride_xb, stride_xt, stride_xc,
                                stride_db, stride_dt, stride_dc, K: tl.constexpr, BT: tl.constexpr,
                                BC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STARTS: tl.constexpr,
                                SILU: tl.constexpr, GRAD: tl.constexpr, SECTION: tl.constexpr,
                                HISTORY: tl.constexpr):
    """The pre-activation a of a tile of outputs, then into ``out``, laid out as a contiguous
    [C / SECTION, B, T, SECTION] (with SECTION = C: [B, T, C]): forward, act(a); with GRAD (backward),
    dy * silu'(a), the gradient at the pre-activation. A tile's channels may straddle two sections. Taps may read
    the HISTORY rows before x's position 0."""
    pid_t, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    valid_t, valid_c = t < T, c < C
    valid = valid_t[:, None] & valid_c[None, :]
    x_b = x + pid_b.to(tl.int64) * stride_xb
    x_c = c.to(tl.int64) * stride_xc
    first = _document_starts(starts, t, valid_t, BT, HAS_STARTS, HISTORY)
    a = _pre_activation(x_b, w, b, t, first, valid_t, x_c, c, valid_c, stride_xt, K, BT, BC, HAS_BIAS)
    if GRAD:
        grad = tl.load(dy + pid_b.to(tl.int64) * stride_db + t.to(tl.int64)[:, None] * stride_dt
                       + c[None, :] * stride_dc, mask=valid, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        result = grad * s * (1.0 + a * (1.0 - s))
    elif SILU:
        result = a * tl.sigmoid(a)
    else:
        result = a
    section_size = tl.num_programs(2).to(tl.int64) * T * SECTION  # the grid's third axis is the batch
    section_start = (c // SECTION).to(tl.int64) * section_size
    row = pid_b.to(tl.int64) * T + t.to(tl.int64)
    ptrs = out + section_start[None, :] + row[:, None] * SECTION + (c % SECTION)[None, :]
    tl.store(ptrs, result.to(out.dtype.element_ty), mask=valid)


@triton.jit
def _conv_bwd_kernel(x, w, starts, g, dx, dw_part, db_part, T, C, n_t_tiles,
                     stride_xb, stride_xt, stride_xc, stride_gb, stride_gt, stride_gc, stride_dxb, stride_dxt,
                     K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_STARTS: tl.constexpr, HISTORY: tl.constexpr):
    """With g the gradient of the pre-activation: dx[t] = sum_j w[K-1-j] * g[t+j] and the partial sums
    dw[K-1-j] = sum_t g[t+j] * x[t] over this tile's t (each pair (t, t+j) counted by the tile holding t), over
    outputs t+j in t's document; bias partial sums from j = 0. Partials go to row ``pid_b * n_t_tiles + pid_t``.
    The tiles cover x's positions from -HISTORY (the history rows, which have no outputs of their own)."""
    pid_t, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT) - HISTORY
    c = pid_c * BC + tl.arange(0, BC)
    valid_t, valid_c = t < T, c < C
    x_c = c.to(tl.int64) * stride_xc
    x_own = tl.load(x + pid_b.to(tl.int64) * stride_xb + t.to(tl.int64)[:, None] * stride_xt + x_c[None, :],
                    mask=valid_t[:, None] & valid_c[None, :], other=0.0).to(tl.float32)
    g_b = g + pid_b.to(tl.int64) * stride_gb
    part = (pid_b * n_t_tiles + pid_t).to(tl.int64)
    dx_acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        u = t + j  # the outputs that read x[t], through tap K-1-j
        valid_u = u < T
        if HISTORY:  # x's history rows reach back past the first output
            valid_u = valid_u & (u >= 0)
        first = _document_starts(starts, u, valid_u, BT, HAS_STARTS, HISTORY)
        same_document = valid_u & (t >= first)
        g_u = tl.load(g_b + u.to(tl.int64)[:, None] * stride_gt + c[None, :] * stride_gc,
                      mask=same_document[:, None] & valid_c[None, :], other=0.0).to(tl.float32)
        tap = tl.load(w + c * K + (K - 1 - j), mask=valid_c, other=0.0).to(tl.float32)
        dx_acc += g_u * tap[None, :]
        tl.store(dw_part + (part * K + (K - 1 - j)) * C + c, tl.sum(g_u * x_own, axis=0), mask=valid_c)
        if HAS_BIAS and j == 0:
            tl.store(db_part + part * C + c, tl.sum(g_u, axis=0), mask=valid_c)
    out = dx + pid_b.to(tl.int64) * stride_dxb + t.to(tl.int64)[:, None] * stride_dxt + c[None, :]
    tl.store(out, dx_acc.to(dx.dtype.element_ty), mask=valid_t[:, None] & valid_c[None, :])


class ShortConvFunction(torch.autograd.Function):
    """y = act(causal depthwise conv of x [B, T, C]); x any strides. y is contiguous [B, T, C] for one section,
    else [B, T, S, C/S] stored section-major. With ``history`` H, x's first H rows are only read: y has T - H
    rows (the kernels see x from row H on, reading back to -H)."""

    @staticmethod
    def forward(ctx, x_in, weight, bias, silu, starts, sections, history):
        x = x_in[:, history:]
        batch, length, channels = x.shape
        section = channels // sections
        if sections == 1:
            y = torch.empty(batch, length, channels, dtype=x.dtype, device=x.device)
        else:  # the strides of a contiguous [S, B, T, C/S] permuted, without being a view of it: a view made
            # inside a custom Function could not be modified in place
            y = torch.empty_strided((batch, length, sections, section), (length * section, section,
                                    batch * length * section, 1), dtype=x.dtype, device=x.device)
        bt, bc, warps = FWD_TILE
        grid = (triton.cdiv(length, bt), triton.cdiv(channels, bc), batch)
        _conv_pre_activation_kernel[grid](x, weight, bias, starts, None, y, length, channels, *x.stride(),
                                          0, 0, 0, K=weight.shape[1], BT=bt, BC=bc, HAS_BIAS=bias is not None,
                                          HAS_STARTS=starts is not None, SILU=silu, GRAD=False, SECTION=section,
                                          HISTORY=history, num_warps=warps)
        ctx.save_for_backward(x_in, weight, bias, starts)
        ctx.silu, ctx.history = silu, history
        return y

    @staticmethod
    def backward(ctx, dy):
        x_in, weight, bias, starts = ctx.saved_tensors
        history = ctx.history
        x = x_in[:, history:]
        batch, length, channels = x.shape
        dy = dy.reshape(batch, length, channels)  # [B, T, S, C/S] with sections: a view when its layout allows
        k = weight.shape[1]
        bt, bc, warps = BWD_TILE
        n_t_tiles = triton.cdiv(length, bt)
        grid = (n_t_tiles, triton.cdiv(channels, bc), batch)
        meta = dict(K=k, BT=bt, BC=bc, HAS_BIAS=bias is not None, HAS_STARTS=starts is not None, HISTORY=history,
                    num_warps=warps)
        g = dy
        if ctx.silu:  # the gradient of the pre-activation, from its recomputation
            g = torch.empty(batch, length, channels, dtype=dy.dtype, device=dy.device)
            _conv_pre_activation_kernel[grid](x, weight, bias, starts, dy, g, length, channels, *x.stride(),
                                              *dy.stride(), SILU=True, GRAD=True, SECTION=channels, **meta)
        # dx dense in x's order of batch and time (x may be a [T, B, ...] tensor seen as [B, T, C])
        rows = length + history
        dx_in = (torch.empty(rows, batch, channels, dtype=x.dtype, device=x.device).transpose(0, 1)
                 if x.stride(0) < x.stride(1) else torch.empty(batch, rows, channels, dtype=x.dtype, device=x.device))
        dx = dx_in[:, history:]  # the kernel writes the history rows' gradient before it
        n_t_tiles = triton.cdiv(rows, bt)
        grid = (n_t_tiles, triton.cdiv(channels, bc), batch)
        dw_part = torch.empty(batch * n_t_tiles, k, channels, dtype=torch.float32, device=x.device)
        db_part = (torch.empty(batch * n_t_tiles, channels, dtype=torch.float32, device=x.device)
                   if bias is not None else None)
        _conv_bwd_kernel[grid](x, weight, starts, g, dx, dw_part, db_part, length, channels, n_t_tiles,
                               *x.stride(), *g.stride(), *dx.stride()[:2], **meta)
        dw = dw_part.sum(0).t().to(weight.dtype)
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx_in, dw, db, None, None, None, None


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias, silu: bool, cu_seqlens,
                         sections: int = 1, history: int = 0) -> torch.Tensor:
    """x [B, T, C] (any strides), weight [C, K], bias [C] or None; returns y [B, T, C], or with ``sections``
    S > 1 (dividing C) y [B, T, S, C/S] with each ``y[:, :, i]`` contiguous. With ``history`` H, x's first H rows
    are only the window of the others: y has T - H rows."""
    starts = None
    if cu_seqlens is not None:  # each position's document start, computed on the device without a sync
        bounds = cu_seqlens.to(device=x.device, dtype=torch.int32)
        starts = bounds[document_index(bounds, x.shape[1])]
    # the kernels index weight [C, K] and bias [C] as contiguous
    return ShortConvFunction.apply(x, weight.contiguous(), bias if bias is None else bias.contiguous(), silu, starts,
                                   sections, history)
