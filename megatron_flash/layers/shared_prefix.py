"""Work on the rows that every sequence of a micro-batch shares, done once.

Every sequence starts with the same meta tokens and every mixer is causal (and dropout-free), so the first ``m``
positions of a [s, b, h] micro-batch hold the same values in every column at every layer. A position-wise mixer
(the FFN: :func:`apply_once_to_shared_prefix`) may compute them from column 0 alone and broadcast the result. That
is exact: the broadcast's backward sums the columns' gradients into column 0, which is what the columns' separate,
identical paths would have summed upstream (at the meta-token parameter). A sequence mixer (DeltaNet, Mamba2 with
``config.share_meta_prefix_in_mixers``) runs the shared rows once with its final state, and every column's rest
from that state; the rest starts ``history`` rows early, the shared rows' last ones, which its short conv reads
(:func:`split_shared_prefix`), and :func:`join_shared_prefix` puts the outputs back together.

The split and the join are two autograd Functions that each copy the other rows once (the join in forward, the
split in backward). Plain slicing and ``torch.cat`` cost about what the shared rows save: a slice's backward
zero-fills a full-size gradient (two slices: two of them, then an add), and a ``cat`` with the broadcast (stride-0)
piece runs PyTorch's element-by-element kernel (session 16 measured that version at -0.2..+0.1%;
docs/performance.md).
"""

from __future__ import annotations

from typing import Callable

import torch


class _SplitSharedPrefix(torch.autograd.Function):
    """x [s, b, h] -> (x[:m, :1], x[m - history:]), views: the rest starts ``history`` rows early (the shared rows'
    last ones, which a causal conv of the rest reads); backward adds both gradients into one for x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: int, history: int):
        ctx.m, ctx.history, ctx.shape = m, history, x.shape
        return x[:m, :1], x[m - history:]

    @staticmethod
    def backward(ctx, grad_shared, grad_rest):  # an unused output's gradient arrives as zeros (materialized)
        m, history = ctx.m, ctx.history
        grad = grad_rest.new_empty(ctx.shape)
        grad[:m - history].zero_()
        grad[m - history:] = grad_rest
        grad[:m, :1] += grad_shared
        return grad, None, None


class _JoinSharedPrefix(torch.autograd.Function):
    """(shared [m, 1, h], rest [s - m, b, h]) -> [s, b, h] with the shared rows in every column; backward sums the
    columns' gradients of the shared rows and hands the rest's gradient on as a view."""

    @staticmethod
    def forward(ctx, shared: torch.Tensor, rest: torch.Tensor):
        m = shared.shape[0]
        ctx.m = m
        out = rest.new_empty(m + rest.shape[0], *rest.shape[1:])
        out[:m] = shared
        out[m:] = rest
        return out

    @staticmethod
    def backward(ctx, grad):
        m = ctx.m
        return grad[:m].sum(1, keepdim=True), grad[m:]


def meta_rows_shareable(config, batch: int, packed: bool, training: bool) -> bool:
    """Whether a micro-batch of ``batch`` rows has meta rows that layers may compute once. Not where there is
    nothing to share (one row; packed documents, which are one row), where the rows differ (dropout in training),
    or where a TP rank holds a slice of the sequence (sequence parallelism: the meta rows are on the first rank)."""
    return (config.num_meta_tokens > 0 and batch > 1 and not packed and not config.sequence_parallel
            and not (training and (config.hidden_dropout or config.attention_dropout)))


def shares_meta_rows(config, batch: int, packed: bool, training: bool) -> bool:
    """Whether some layer computes the meta rows once: the FFN (``config.share_meta_rows``), DeltaNet and Mamba2
    (``config.share_meta_prefix_in_mixers``: the prefix once, then the text from its states)."""
    return ((config.share_meta_rows or config.share_meta_prefix_in_mixers)
            and meta_rows_shareable(config, batch, packed, training))


def apply_once_to_shared_prefix(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                                prefix: int) -> torch.Tensor:
    """``fn(x)`` for a position-wise ``fn`` whose input's first ``prefix`` rows are the same in every column:
    those rows go through ``fn`` once, from column 0. ``prefix`` 0 (or one column) is plain ``fn(x)``."""
    if not prefix or x.shape[1] == 1:
        return fn(x)
    shared, rest = split_shared_prefix(x, prefix)
    return join_shared_prefix(fn(shared), fn(rest))


def split_shared_prefix(x: torch.Tensor, prefix: int, history: int = 0):
    """``(x[:prefix, :1], x[prefix - history:])`` for a mixer that runs the rows every column shares once and the
    rest from the state they leave; the rest keeps ``history`` of the shared rows in front (a short conv's
    window). Join the outputs with :func:`join_shared_prefix`."""
    if not 0 <= history <= prefix < x.shape[0]:
        raise ValueError(f"shared prefix {prefix} must be shorter than the sequence ({x.shape[0]}) and at least "
                         f"the history {history}")
    return _SplitSharedPrefix.apply(x, prefix, history)


def join_shared_prefix(shared: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """(shared [m, 1, ...], rest [s - m, b, ...]) -> [s, b, ...], the shared rows in every column."""
    return _JoinSharedPrefix.apply(shared, rest)


def run_prefix_once(mix: Callable, hidden_states: torch.Tensor, prefix: int, history: int) -> torch.Tensor:
    """A sequence mixer over [s, b, h] with the first ``prefix`` rows shared by every column: ``mix(x, history=H,
    initial_state=S, output_final_state=F)`` -> (output of x's rows after the first H, final state or None) runs
    the shared rows once, then every column's rest from the state they leave, reading ``history`` of the shared
    rows again (its short conv's window). ``prefix`` 0 (or one column): ``mix`` over everything."""
    if not prefix or hidden_states.shape[1] == 1:
        return mix(hidden_states)[0]
    shared, rest = split_shared_prefix(hidden_states, prefix, history)
    out_shared, state = mix(shared, output_final_state=True)
    # every column starts from the same state (contiguous: the scan kernels index their states densely)
    out_rest, _ = mix(rest, history=history, initial_state=state.expand(rest.shape[1], *state.shape[1:]).contiguous())
    return join_shared_prefix(out_shared, out_rest)
