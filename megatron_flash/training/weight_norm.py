"""Weight normalization after every optimizer step (Nemotron-Flash, after nGPT).

Each matrix that reads the residual stream gets unit-L2 rows; each that writes into it gets unit-L2 columns. The
mixers declare which is which with the ``weight_norm`` attribute (layers/base.py), so this module only needs the
optimizer to find them.

Where the numbers live:

* TP: a reading matrix is a ColumnParallelLinear (its rows are whole on each rank) or replicated; a writing
  matrix is a RowParallelLinear (its columns are whole on each rank). So TP needs no communication: the norm of
  each local row/column is the norm over the full logical matrix.
* PP: every stage normalizes its own layers.
* Distributed optimizer: the fp32 main params are flat shards over DP ranks, cut anywhere, mid-row included.
  Each rank sums squares of the pieces of rows/columns it holds; one all-reduce over the optimizer's DP group
  completes the sums; each rank then rescales its piece.
* bf16: the fp32 main params are normalized inside the optimizer's inner step, before megatron copies main params
  to the model params, so the bf16 weights are the rounded normalized fp32 weights.
* A skipped step (megatron skips the inner step on inf/NaN grads) normalizes nothing: the hook is the inner step.

Other parameters are left alone by default; see docs/training.md for why (embeddings, output layer, convolutions,
SSM scalars) and the ``--weight-norm-embeddings`` option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_flash.training.optimizer_params import leaf_optimizers, main_params

EPS = 1e-12


@dataclass
class _Entry:
    """One normalized matrix: its model param (shape, kind) and the main param the optimizer updates."""

    model_param: torch.nn.Parameter
    main_param: Optional[torch.Tensor]  # None: the distributed optimizer gave this rank no piece of it
    kind: str  # "rows" | "cols"
    flat_start: Optional[int] = None  # distributed optimizer: this rank's range in the flattened model param

    @property
    def shape(self):
        return self.model_param.shape

    def count(self) -> int:
        return self.shape[0] if self.kind == "rows" else self.shape[1]


# --- sums of squares and rescaling over a flat piece of a matrix -------------------------------------------------

def _pieces(flat: torch.Tensor, start: int, ncols: int):
    """Split a flat piece [start, start + n) of a row-major matrix with ``ncols`` columns into three parts.

    Returns (head, head_row, head_col, body, body_row, tail): ``head`` continues row ``head_row`` from column
    ``head_col`` (empty if the piece starts on a row boundary); ``body`` holds whole rows [k, ncols] from
    ``body_row``; ``tail`` starts the row after the body at column 0.
    """
    n = flat.numel()
    head_row, head_col = divmod(start, ncols)
    head_len = min(ncols - head_col, n) if head_col else 0
    body_row = head_row + (1 if head_col else 0)
    body_rows = (n - head_len) // ncols
    body_end = head_len + body_rows * ncols
    return (flat[:head_len], head_row, head_col, flat[head_len:body_end].view(body_rows, ncols), body_row,
            flat[body_end:])


def _flat_sums(entry: _Entry, flat: torch.Tensor) -> torch.Tensor:
    """Partial sums of squares of each row (or column) over this rank's piece."""
    sums = torch.zeros(entry.count(), dtype=torch.float32, device=flat.device)
    head, hr, hc, body, br, tail = _pieces(flat.float(), entry.flat_start, entry.shape[1])
    tail_row = br + body.shape[0]
    if entry.kind == "rows":
        sums[hr] += head.square().sum()
        sums[br:tail_row] += body.square().sum(dim=1)
        if tail.numel():
            sums[tail_row] += tail.square().sum()
    else:
        sums[hc:hc + head.numel()] += head.square()
        sums += body.square().sum(dim=0)
        sums[:tail.numel()] += tail.square()
    return sums


def _flat_rescale(entry: _Entry, flat: torch.Tensor, inv: torch.Tensor) -> None:
    """Multiply this rank's piece by the inverse norm of the row (or column) each element belongs to."""
    head, hr, hc, body, br, tail = _pieces(flat, entry.flat_start, entry.shape[1])
    tail_row = br + body.shape[0]
    inv = inv.to(flat.dtype)
    if entry.kind == "rows":
        head.mul_(inv[hr])
        body.mul_(inv[br:tail_row].unsqueeze(1))
        if tail.numel():
            tail.mul_(inv[tail_row])
    else:
        head.mul_(inv[hc:hc + head.numel()])
        body.mul_(inv.unsqueeze(0))
        tail.mul_(inv[:tail.numel()])


class WeightNormalizer:
    """Hooks megatron optimizers so that every successful step ends with normalized matrices."""

    def __init__(self, optimizer, include_embeddings: bool = False):
        self.include_embeddings = include_embeddings
        # Per leaf optimizer, (sum of |norm - 1|, number of rows/columns) before its last normalization: device
        # tensors, since reading them here would make every step wait for the GPU (see mean_deviation).
        self._deviations: dict[int, tuple[torch.Tensor, int]] = {}
        for index, opt in enumerate(leaf_optimizers(optimizer)):
            entries = []
            for mp, sp, start in main_params(opt):
                kind = self.kind_of(mp)
                if kind is not None:
                    entries.append(_Entry(mp, sp, kind, start))
            group = opt.data_parallel_group if isinstance(opt, DistributedOptimizer) else None
            self._wrap_inner_step(opt.optimizer, index, entries, group)

    @property
    def mean_deviation(self) -> Optional[torch.Tensor]:
        """Mean |norm - 1| over every normalized row/column of this rank's stage before the last normalization (all
        leaf optimizers, full matrices under the distributed optimizer), a TensorBoard scalar; None before the first
        step. A device tensor: the progress log reads it when it writes."""
        if not self._deviations:
            return None
        return sum(total for total, _ in self._deviations.values()) / sum(n for _, n in self._deviations.values())

    def kind_of(self, param) -> Optional[str]:
        kind = getattr(param, "weight_norm", None)
        if kind is None and self.include_embeddings and getattr(param, "is_embedding_or_output_parameter", False):
            kind = "rows"
        return kind if param.dim() == 2 or kind is None else None

    def _wrap_inner_step(self, inner, index, entries, group):
        original_step = inner.step

        def step_then_normalize(*args, **kwargs):
            result = original_step(*args, **kwargs)
            deviation = self.normalize(entries, group)
            if deviation is not None:
                self._deviations[index] = deviation
            return result

        inner.step = step_then_normalize

    @torch.no_grad()
    def normalize(self, entries, group) -> Optional[tuple[torch.Tensor, int]]:
        """Normalizes ``entries``; returns (sum of |norm - 1| on the device, number of rows/columns), None if none."""
        if not entries:
            return None
        if group is None:
            deviations = []
            for e in entries:
                norms = e.main_param.float().norm(dim=1 if e.kind == "rows" else 0, keepdim=True)
                deviations.append((norms - 1).abs().sum())
                e.main_param.div_(norms.clamp_min(EPS).to(e.main_param.dtype))
            return torch.stack(deviations).sum(), sum(e.count() for e in entries)
        # A matrix this rank holds no piece of contributes zeros, on the device the collective runs on.
        sums = torch.cat([_flat_sums(e, e.main_param.view(-1)) if e.main_param is not None
                          else torch.zeros(e.count(), dtype=torch.float32, device=e.model_param.device)
                          for e in entries])
        dist.all_reduce(sums, group=group)
        norms = sums.sqrt()
        inv = 1.0 / norms.clamp_min(EPS)
        offset = 0
        for e in entries:
            if e.main_param is not None:
                _flat_rescale(e, e.main_param.view(-1), inv[offset:offset + e.count()])
            offset += e.count()
        return (norms - 1).abs().sum(), norms.numel()


@torch.no_grad()
def normalize_model_params(model_chunks, include_embeddings: bool = False) -> int:
    """Normalize the model's matrices in place (before the optimizer copies them): training starts on the sphere.

    Returns how many matrices were normalized.
    """
    count = 0
    for chunk in model_chunks:
        for param in chunk.parameters():
            kind = getattr(param, "weight_norm", None)
            if kind is None and include_embeddings and getattr(param, "is_embedding_or_output_parameter", False):
                kind = "rows"
            if kind is None or param.dim() != 2:
                continue
            norms = param.float().norm(dim=1 if kind == "rows" else 0, keepdim=True).clamp_min(EPS)
            param.copy_((param.float() / norms).to(param.dtype))
            count += 1
    return count
