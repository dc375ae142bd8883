"""Packed documents (``cu_seqlens``: document bounds over one row) as per-position indices, for the kernels that
take them that way (mamba_ssm's ``seq_idx``, the short conv's document starts) and for the packing of meta tokens."""

from __future__ import annotations

import torch


def document_index(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """int32 [length]: the document of each position, on cu_seqlens' device without reading it on the host
    (``length`` is the last bound, given so that the output size needs no sync)."""
    bounds = cu_seqlens.to(torch.int64)
    documents = torch.arange(len(bounds) - 1, device=bounds.device, dtype=torch.int32)
    return torch.repeat_interleave(documents, bounds.diff(), output_size=length)
