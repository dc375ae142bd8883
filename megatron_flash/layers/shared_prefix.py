"""Work on the rows that every sequence of a micro-batch shares, done once.

Every sequence starts with the same meta tokens and every mixer is causal (and dropout-free), so the first ``m``
positions of a [s, b, h] micro-batch hold the same values in every column at every layer. A position-wise mixer
(the FFN: :func:`apply_once_to_shared_prefix`) may compute them from column 0 alone and broadcast the result. That
is exact: the broadcast's backward sums the columns' gradients into column 0, which is what the columns' separate,
identical paths would have summed upstream (at the meta-token parameter). A sequence mixer (DeltaNet, Mamba2 with
``config.share_meta_prefix_in_mixers``) runs the shared rows once with its final state, and every column's rest
from that state; the rest starts ``history`` rows early, the shared rows' last ones, which its short conv reads
(:func:`split_shared_prefix`), and :func:`join_shared_prefix` puts the outputs back together.

The meta prefix depends on the parameters alone, so with ``config.meta_prefix_once_per_step`` it is computed once
per optimizer step instead of once per micro-batch: :class:`MetaPrefix` records, in one pass of the stack over the
meta tokens, each sharing layer's output on them and its mixer's final state; every micro-batch's sharing layers
then take those instead of computing them (see there for how the gradients get back).

The split and the join are two autograd Functions that each copy the other rows once (the join in forward, the
split in backward). Plain slicing and ``torch.cat`` cost about what the shared rows save: a slice's backward
zero-fills a full-size gradient (two slices: two of them, then an add), and a ``cat`` with the broadcast (stride-0)
piece runs PyTorch's element-by-element kernel (session 16 measured that version at -0.2..+0.1%;
docs/performance.md).
"""

from __future__ import annotations

from typing import Callable, Optional

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


class _WithEarlierGradients(torch.autograd.Function):
    """``tensor`` itself; backward adds the gradient the earlier micro-batches left in ``leaf.grad``."""

    @staticmethod
    def forward(ctx, tensor, leaf):
        ctx.leaf = leaf
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        earlier = ctx.leaf.grad
        return (grad if earlier is None else grad + earlier), None


class MetaPrefix:
    """The meta prefix's results in each sharing layer, computed once per optimizer step (recorded by
    ``model(None, meta_prefix=MetaPrefix(n))``, NemotronFlashModel) for the step's ``num_microbatches`` micro-batches.

    :meth:`record` keeps each result twice: as computed (with its autograd graph) and as a detached leaf. The
    micro-batches before the last read the leaves, so their backward passes accumulate the results' gradients in
    the leaves' ``.grad`` and stop there. The last micro-batch reads the computed results through
    :class:`_WithEarlierGradients`, so its backward carries the sum of every micro-batch's gradient through the
    prefix's graph to the parameters, once. That backward is the step's last, as without the cache: DDP's gradient
    reduction (overlapped or not) and megatron's grad finalization see complete gradients. This needs the micro-batches
    run one after another, forward then backward (megatron's schedule without pipelining)."""

    def __init__(self, num_microbatches: int):
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be at least 1, got {num_microbatches}")
        self.recording = True
        self._left = num_microbatches  # micro-batches not yet started
        self._results: dict = {}

    def record(self, key, output: torch.Tensor, state: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keep layer ``key``'s output on the prefix (and its mixer's final state); returns ``output``."""
        if not self.recording:
            raise RuntimeError(f"layer {key}: the meta prefix is recorded once, before the micro-batches")
        self._results[key] = [(t, t.detach().requires_grad_(t.requires_grad)) if t is not None else None
                              for t in (output, state)]
        return output

    def start_microbatch(self) -> None:
        """Called by the model at each micro-batch's forward."""
        if self._left == 0:
            raise RuntimeError("the meta prefix was computed for fewer micro-batches than were run")
        self.recording = False
        self._left -= 1

    def lookup(self, key):
        """(output on the prefix, final state or None) of layer ``key``, for the micro-batch running now."""
        if self.recording:
            raise RuntimeError(f"layer {key}: a micro-batch read the meta prefix before it started")
        if key not in self._results:
            raise KeyError(f"layer {key} has no recorded meta prefix (it did not share the meta rows when recorded)")
        last = self._left == 0
        return tuple(None if pair is None else
                     (_WithEarlierGradients.apply(*pair) if last else pair[1]) for pair in self._results[key])


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


def meta_prefix_once_per_step(config, micro_batch: int, packed: bool, pipeline_stages: int) -> bool:
    """Whether training computes the meta prefix once per optimizer step (:class:`MetaPrefix`): asked for
    (``config.meta_prefix_once_per_step``), some layer shares the meta rows, and the model is one pipeline stage
    without recomputed layers. A later stage's prefix would start from the previous stage's, and a recomputed
    forward would read the prefix again; there each micro-batch computes it."""
    return (config.meta_prefix_once_per_step and shares_meta_rows(config, micro_batch, packed, training=True)
            and pipeline_stages == 1 and config.recompute_granularity is None)


def apply_once_to_shared_prefix(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                                prefix: int, meta_prefix: Optional[MetaPrefix] = None, key=None) -> torch.Tensor:
    """``fn(x)`` for a position-wise ``fn`` whose input's first ``prefix`` rows are the same in every column:
    those rows go through ``fn`` once, from column 0, or come from ``meta_prefix`` (which records them when it is
    recording; ``key``: the layer). ``prefix`` 0 (or one column) is plain ``fn(x)``."""
    if meta_prefix is not None and meta_prefix.recording:
        return meta_prefix.record(key, fn(x))
    if not prefix or x.shape[1] == 1:
        return fn(x)
    shared, rest = split_shared_prefix(x, prefix)
    return join_shared_prefix(meta_prefix.lookup(key)[0] if meta_prefix is not None else fn(shared), fn(rest))


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


def run_prefix_once(mix: Callable, hidden_states: torch.Tensor, prefix: int, history: int,
                    meta_prefix: Optional[MetaPrefix] = None, key=None) -> torch.Tensor:
    """A sequence mixer over [s, b, h] with the first ``prefix`` rows shared by every column: ``mix(x, history=H,
    initial_state=S, output_final_state=F)`` -> (output of x's rows after the first H, final state or None) runs
    the shared rows once (or takes their output and state from ``meta_prefix``, which records them when it is
    recording; ``key``: the layer), then every column's rest from the state they leave, reading ``history`` of
    the shared rows again (its short conv's window). ``prefix`` 0 (or one column): ``mix`` over everything."""
    if meta_prefix is not None and meta_prefix.recording:
        return meta_prefix.record(key, *mix(hidden_states, output_final_state=True))
    if not prefix or hidden_states.shape[1] == 1:
        return mix(hidden_states)[0]
    shared, rest = split_shared_prefix(hidden_states, prefix, history)
    out_shared, state = (meta_prefix.lookup(key) if meta_prefix is not None
                         else mix(shared, output_final_state=True))
    # every column starts from the same state (contiguous: the scan kernels index their states densely)
    out_rest, _ = mix(rest, history=history, initial_state=state.expand(rest.shape[1], *state.shape[1:]).contiguous())
    return join_shared_prefix(out_shared, out_rest)
