"""Rotary position embedding (RoPE) of q and k, computed in fp32 and fused on GPUs (ops/compile.py).

``apply_rope(t, angles) = t * cos(angles) + rotate_half(t) * sin(angles)``, ``rotate_half([a, b]) = [-b, a]`` over
the head dim (pairs (i, i + d/2), megatron's non-interleaved form), with t [s, b, heads, d] and the angles [s, 1, 1, d]
that megatron's ``RotaryEmbedding`` returns. Without Transformer Engine megatron applies RoPE unfused: a neg, a cat,
two muls and an add per tensor, and as many passes back (9 ms of the 1B's step for its two attention layers in an
H200 profile); compiled, it is one pass each way. The result is megatron's ``apply_rotary_pos_emb`` up to rounding
(megatron rounds cos and sin to t's dtype first).

:func:`rope_angles` gives each position its angles: position p for a plain sequence, the position within its
document for packed documents (as megatron's RoPE for the "thd" format, when the angles cover the longest document).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_flash.ops.compile import compiled_on_cuda
from megatron_flash.ops.packed import document_index
from megatron_flash.ops.precision import at_least_fp32


@compiled_on_cuda
def apply_rope(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    tw = at_least_fp32(t)
    aw = angles.to(tw.dtype)
    first, second = tw.chunk(2, dim=-1)
    return (tw * aw.cos() + torch.cat((-second, first), dim=-1) * aw.sin()).to(t.dtype)


def rope_angles(angles: torch.Tensor, length: int, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The angles [length, 1, 1, d] of each position of a sequence of ``length``, from the table ``angles`` [n, 1, 1, d]
    of positions 0..n-1; with ``cu_seqlens``, positions count from each document's start (no host sync)."""
    if cu_seqlens is None:
        if angles.shape[0] < length:
            raise ValueError(f"RoPE angles cover {angles.shape[0]} positions, the sequence has {length}")
        return angles[:length]
    bounds = cu_seqlens.to(device=angles.device, dtype=torch.int64)
    position = torch.arange(length, device=angles.device) - bounds[document_index(bounds, length)]
    return angles[position]
