"""Packed documents: several documents in one row, each computed as if it were alone.

Every document gets its own copy of the meta tokens in front (so a packed row equals the documents run separately,
meta tokens included), and every mixer restarts at each document boundary (``cu_seqlens``). RoPE positions restart
at each document too (megatron's "thd" format), with the meta tokens at positions 0..m-1 as in an unpacked row.

Layout of one packed row of N documents with text lengths L_i and m meta tokens::

    [meta (m) | doc 0 (L_0) | meta (m) | doc 1 (L_1) | ...]      cu_seqlens = cumsum([0, m + L_0, m + L_1, ...])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_flash.ops.packed import document_index


@dataclass
class PackedLayout:
    """Where text and meta tokens sit in the expanded (meta-prefixed) row."""

    text_positions: torch.Tensor  # [T] index of each text token in the expanded row
    meta_positions: torch.Tensor  # [N * m]
    params: PackedSeqParams       # document boundaries of the expanded row
    length: int                   # T + N * m


def document_boundaries_from_eod(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """cu_seqlens of a [batch, seq] micro-batch flattened into one row: rows and EOD tokens end documents.

    A document ends after its EOD token (the EOD belongs to the document it closes), as in Megatron-LM's
    ``reset_attention_mask``.
    """
    batch, seq = tokens.shape
    ends = set(range(seq, batch * seq + 1, seq))
    ends.update((torch.nonzero(tokens.reshape(-1) == eod).flatten() + 1).tolist())
    return torch.tensor([0] + sorted(ends), dtype=torch.int32, device=tokens.device)


def layout(cu_seqlens: torch.Tensor, num_meta_tokens: int) -> PackedLayout:
    """The expanded row's layout for documents with text boundaries ``cu_seqlens``."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    if (lengths <= 0).any():
        raise ValueError(f"cu_seqlens {cu.tolist()} has an empty document")
    n, m = len(lengths), num_meta_tokens
    doc_of_token = document_index(cu, int(cu[-1]))
    text_positions = torch.arange(int(cu[-1]), device=cu.device) + (doc_of_token + 1) * m
    starts = cu[:-1] + torch.arange(n, device=cu.device) * m
    meta_positions = (starts[:, None] + torch.arange(m, device=cu.device)[None, :]).reshape(-1)
    expanded = torch.cat([cu.new_zeros(1), torch.cumsum(lengths + m, 0)]).to(torch.int32)
    max_len = int((lengths + m).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=expanded, cu_seqlens_kv=expanded,
                             max_seqlen_q=max_len, max_seqlen_kv=max_len)
    return PackedLayout(text_positions, meta_positions, params, int(expanded[-1]))


def expand(tokens: torch.Tensor, meta: torch.Tensor, packed: PackedLayout) -> torch.Tensor:
    """[T, 1, h] text embeddings + [m, h] meta tokens -> [T + N*m, 1, h] expanded row (differentiable)."""
    n_docs = packed.meta_positions.numel() // meta.shape[0]
    hidden = tokens.new_zeros(packed.length, 1, tokens.shape[-1])
    hidden = hidden.index_put((packed.text_positions,), tokens)
    return hidden.index_put((packed.meta_positions,), meta.to(tokens.dtype).repeat(n_docs, 1).unsqueeze(1))


def text_only(hidden: torch.Tensor, packed: PackedLayout) -> torch.Tensor:
    """The expanded row's hidden states at the text positions: [T, 1, h]."""
    return hidden.index_select(0, packed.text_positions)
