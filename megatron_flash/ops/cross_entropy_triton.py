"""Triton kernels of the softmax passes over each chunk's logits in ``ops.linear_cross_entropy``.

Why not torch.compile: inductor made three kernels of a chunk's [tokens, 131072] bf16 logits, the peak with the
label's logit, the sum of exps and ``softmax - onehot``, and read the logits at 1.1 to 2.5 TB/s where an H200's
memory does ~4.8 (37 ms per step of the 1B at 65536 tokens). Here the first two are one pass, an online
log-sum-exp (a running peak, and the sum rescaled whenever the peak rises) that also loads the label's logit, and
the gradient pass reads each logit once and writes each gradient once, straight into the caller's buffer (a slice
of the kept [tokens, rows] gradient, or the logits themselves) with no copy after it.

Columns from ``valid`` on are padding (the weight's rows past the real vocabulary): they count as -inf in the
log-sum-exp and get a zero gradient. Loads are masked at the row's width (a multiple of 16 elements in practice,
which Triton specializes on: the mask then stays whole 16-byte vectors), not at ``valid``, which can be any number:
the padding columns below the width are loaded and then set to -inf. Under tensor parallelism each rank passes its
own columns; the caller combines the ranks' log-sum-exps. Tested against the eager functions of
``ops.linear_cross_entropy`` on CPU under Triton's interpreter and on GPUs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton runs the kernels on CPU tensors under its interpreter (read by triton at import), on CUDA tensors otherwise.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Columns per block and warps per program: the fastest of five pairs each on a 2048 x 131200 bf16 chunk on an H200
# (3.0 and 3.95 TB/s; the others within 20% and 3%: docs/performance.md). The wrappers take the block as a parameter.
LSE_BLOCK, LSE_WARPS = 4096, 4
GRAD_BLOCK, GRAD_WARPS = 1024, 4


@triton.jit
def _lse_and_target_kernel(logits, stride_row, width, valid, local, here, lse, target, BLOCK: tl.constexpr):
    """One row per program: its log-sum-exp over columns [0, valid) and the logit at column ``local[row]`` (0
    where ``here[row]`` is false), in fp32."""
    row = tl.program_id(0)
    row_logits = logits + row.to(tl.int64) * stride_row
    peak = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, valid, BLOCK):  # no block at all where valid is 0: the log-sum-exp is then -inf
        columns = start + tl.arange(0, BLOCK)
        block = tl.load(row_logits + columns, mask=columns < width, other=0.0).to(tl.float32)
        block = tl.where(columns < valid, block, float("-inf"))
        # column ``start`` is real: the new peak is finite (for finite logits), so exp(peak - new_peak) is 0, not
        # NaN, on the first block, where peak is -inf
        new_peak = tl.maximum(peak, tl.max(block, axis=0))
        total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(block - new_peak), axis=0)
        peak = new_peak
    tl.store(lse + row, peak + tl.log(total))
    label_here = tl.load(here + row)
    label_logit = tl.load(row_logits + tl.load(local + row), mask=label_here, other=0.0)
    tl.store(target + row, label_logit.to(tl.float32))


@triton.jit
def _grad_logits_kernel(logits, stride_row, out, stride_out, width, valid, lse, local, here, BLOCK: tl.constexpr):
    """``exp(logit - lse[row]) - onehot(local[row])`` (onehot only where ``here[row]``) for a block of one row's
    columns, zero at the padding columns, into ``out`` in its dtype. ``out`` may be ``logits``: each element is
    read before it is written, by the same program."""
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = columns < width
    block = tl.load(logits + row.to(tl.int64) * stride_row + columns, mask=in_row, other=0.0).to(tl.float32)
    # where(), not a -inf logit: padding columns get 0 even if lse is -inf (no real column on any rank)
    probs = tl.where(columns < valid, tl.exp(block - tl.load(lse + row)), 0.0)
    is_label = (columns == tl.load(local + row)) & tl.load(here + row)
    grad = tl.where(is_label, probs - 1.0, probs)
    tl.store(out + row.to(tl.int64) * stride_out + columns, grad.to(out.dtype.element_ty), mask=in_row)


def _check_arguments(logits: torch.Tensor, valid: int, *per_row: torch.Tensor):
    """The kernels index each row's columns and the per-row tensors (labels' columns, here, log-sum-exps) with
    unit stride, and mask columns at the row's width, then at ``valid``."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-d with contiguous rows; got shape {tuple(logits.shape)}, strides "
                         f"{logits.stride()}")
    if not 0 <= valid <= logits.shape[1]:
        raise ValueError(f"valid must be within the logits' {logits.shape[1]} columns; got {valid}")
    for tensor in per_row:
        if tensor.shape != logits.shape[:1] or not tensor.is_contiguous():
            raise ValueError(f"per-row tensors must be contiguous [{logits.shape[0]}]; got {tuple(tensor.shape)}, "
                             f"strides {tensor.stride()}")


def local_lse_and_target(logits: torch.Tensor, local: torch.Tensor, here: torch.Tensor, valid: int,
                         block: int = LSE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-sum-exp over ``logits[:, :valid]`` (-inf where ``valid`` is 0) and its logit at column
    ``local`` (0 where ``here`` is false), both fp32 [rows]. ``logits`` [rows, width]: any row stride."""
    _check_arguments(logits, valid, local, here)
    rows, width = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _lse_and_target_kernel[(rows,)](logits, logits.stride(0), width, valid, local, here, lse, target,
                                        BLOCK=block, num_warps=LSE_WARPS)
    return lse, target


def grad_logits(logits: torch.Tensor, lse: torch.Tensor, local: torch.Tensor, here: torch.Tensor, valid: int,
                out: torch.Tensor, block: int = GRAD_BLOCK) -> torch.Tensor:
    """``softmax - onehot(local)`` of ``logits`` [rows, width] given each row's (global) ``lse``, zero in the columns
    from ``valid`` on, written into ``out`` (same shape, any row stride, may be ``logits`` itself); returns it."""
    _check_arguments(logits, valid, lse, local, here)
    if out.shape != logits.shape or out.stride(1) != 1:
        raise ValueError(f"out must be shaped as logits {tuple(logits.shape)} with contiguous rows; got shape "
                         f"{tuple(out.shape)}, strides {out.stride()}")
    rows, width = logits.shape
    if rows and width:
        grid = (rows, triton.cdiv(width, block))
        _grad_logits_kernel[grid](logits, logits.stride(0), out, out.stride(0), width, valid, lse, local, here,
                                  BLOCK=block, num_warps=GRAD_WARPS)
    return out
