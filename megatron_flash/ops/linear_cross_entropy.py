"""Output layer and cross-entropy in one op, in chunks of tokens, with the vocabulary split over tensor-parallel
ranks: the fp32 [tokens, vocabulary] logits (131072 columns here) are never held in full.

``loss[t] = logsumexp_v(h[t] . w[v]) - h[t] . w[label[t]]`` over the real vocabulary: rows of ``weight`` at or
past ``vocab_size`` (padding for TP) are excluded. ``weight`` is this rank's rows ``[vocab_start, vocab_start +
V_local)`` of the full matrix. Forward runs over chunks of tokens: each chunk's logits give its log-sum-exp and,
when a gradient is wanted, ``softmax - onehot(label)`` in the input dtype, kept for backward (2 bytes per token and
vocabulary row on this rank: 4 GiB for 16384 tokens of a 131072 vocabulary in bf16). Backward is then two matmuls,
with each token's incoming gradient applied to the rows of the input: it recomputes nothing (recomputing the logits
was a third matmul, 13 ms per 1B step on an H200). With ``recompute_logits`` forward keeps only the log-sum-exp and
backward recomputes the logits over chunks of vocabulary rows (each chunk's weight gradient is then one matmul):
one more matmul for none of that memory, for long sequences. The softmax is fp32 whatever the input dtype
(matmuls run in the input dtype with fp32 accumulation); on GPUs each chunk's softmax passes are Triton kernels
(ops/cross_entropy_triton.py): one read of the logits in the matmul's dtype for the log-sum-exp and the label's
logit, one read and one write into the kept gradient. Under TP each rank's log-sum-exp over its columns is combined
as ``M + log(sum_ranks exp(lse_rank - M))`` with M the largest.

Under TP the input must enter through ``copy_to_tensor_model_parallel_region`` (as megatron's ColumnParallelLinear
does): this op returns each rank's partial input gradient and that region all-reduces it.

:func:`linear_cross_entropy_reference` (full logits, ``F.cross_entropy``, one rank) is the definition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:  # the softmax passes' kernels: need triton
    from megatron_flash.ops import cross_entropy_triton
except ImportError:  # pragma: no cover - triton is an optional (gpu) dependency
    cross_entropy_triton = None

# Each chunk's logits hold about this many elements (512 MiB in bf16).
CHUNK_ELEMENTS = 2**28
# The rows multiplied are a whole multiple of this: the kept gradient's row length must be a multiple of 8 elements,
# or cuBLAS takes a slow unaligned kernel for the backward matmuls (an H200 took 93 ms instead of ~13 ms for the
# 1B's output layer when 131073 real rows were multiplied).
ALIGN_ROWS = 128


def _spans(length: int, other: int, chunk_elements: int | None, multiple: int = 1):
    """[start, end) spans of ``length``, each a multiple of ``multiple`` long (but the last), such that span x
    ``other`` holds at most ``chunk_elements`` elements (spans are at least ``multiple`` long)."""
    size = max(multiple, (chunk_elements or CHUNK_ELEMENTS) // max(other, 1) // multiple * multiple)
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def _local_target(labels, vocab_start: int, real_rows: int):
    """Index of each label among this rank's real rows, and whether it is there."""
    local = labels - vocab_start
    here = (local >= 0) & (local < real_rows)
    return local.clamp(0, max(real_rows - 1, 0)), here


def _real_logits(logits, valid: int):
    """fp32 logits with the columns from ``valid`` on (padding rows of the weight) at -inf."""
    columns = torch.arange(logits.shape[1], device=logits.device)
    return logits.float().masked_fill(columns >= valid, float("-inf"))


def _local_lse_and_target(logits, local, here, valid: int):
    """Each token's log-sum-exp over this rank's real columns (-inf where it has none) and its logit of its label
    (0 where the label is on another rank). The definition of cross_entropy_triton.local_lse_and_target."""
    wide = _real_logits(logits, valid)
    return torch.logsumexp(wide, dim=1), torch.where(here, wide.gather(1, local[:, None]).squeeze(1), 0.0)


def _grad_logits(logits, lse, local, here, valid: int):
    """d loss / d logits = softmax - onehot(label), in the logits' dtype (zero in the padding columns). The
    definition of cross_entropy_triton.grad_logits."""
    columns = torch.arange(logits.shape[1], device=logits.device)
    onehot = (columns[None, :] == local[:, None]) & here[:, None]
    probs = (_real_logits(logits, valid) - lse[:, None]).exp()
    return (probs - onehot.float()).to(logits.dtype)


def _on_triton(tensor) -> bool:
    """The softmax passes run as Triton kernels on CUDA tensors, and on CPU tensors under Triton's interpreter
    (TRITON_INTERPRET=1: how the CPU tests run them through the whole op); eagerly otherwise."""
    return cross_entropy_triton is not None and (tensor.is_cuda or cross_entropy_triton.INTERPRETED)


def _lse_and_target_pass(logits, local, here, valid: int):
    """:func:`_local_lse_and_target` by its Triton kernel where :func:`_on_triton`."""
    if _on_triton(logits):
        return cross_entropy_triton.local_lse_and_target(logits, local, here, valid)
    return _local_lse_and_target(logits, local, here, valid)


def _write_grad_logits(out, logits, lse, local, here, valid: int):
    """:func:`_grad_logits` into ``out`` (a slice of the kept gradient, or ``logits`` itself), by its Triton kernel
    where :func:`_on_triton`."""
    if _on_triton(logits):
        return cross_entropy_triton.grad_logits(logits, lse, local, here, valid, out)
    return out.copy_(_grad_logits(logits, lse, local, here, valid))


def _lse_over_ranks(local_lse, group):
    """The log-sum-exp over all ranks' columns from each rank's over its own: M + log(sum exp(lse_rank - M)), M the
    largest. A rank holding only padding adds exp(-inf) = 0; where every rank's is -inf (no real column at all), M
    is taken as 0 so that -inf - M is no NaN."""
    peak = local_lse.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    peak.masked_fill_(peak == float("-inf"), 0.0)
    sum_exp = (local_lse - peak).exp_()
    dist.all_reduce(sum_exp, group=group)
    return sum_exp.log_().add_(peak)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, vocab_size, group, chunk_elements, keep_grad_logits):
        n, local_vocab = hidden.shape[0], weight.shape[0]
        real = min(max(vocab_size - vocab_start, 0), local_vocab)  # this rank's rows past it are padding
        # The rows multiplied: the real ones rounded up to a multiple of ALIGN_ROWS (the rounding masked), since
        # the logits' row length must stay a multiple of 8 elements for cuBLAS' fast kernels. At least one block:
        # a TP rank holding only padding rows then adds -inf logits (nothing) to the softmax, with no special case.
        span = min(max(-(-real // ALIGN_ROWS), 1) * ALIGN_ROWS, local_vocab)
        local, here = _local_target(labels, vocab_start, real)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_logits = torch.empty(n, span, dtype=hidden.dtype, device=hidden.device) if keep_grad_logits else None
        for s, e in _spans(n, local_vocab, chunk_elements):  # the same spans on every rank: all-reduces pair up
            logits = hidden[s:e] @ weight[:span].t()
            chunk_lse, target[s:e] = _lse_and_target_pass(logits, local[s:e], here[s:e], real)
            lse[s:e] = chunk_lse if group is None else _lse_over_ranks(chunk_lse, group)
            if keep_grad_logits:
                _write_grad_logits(grad_logits[s:e], logits, lse[s:e], local[s:e], here[s:e], real)
        if group is not None:
            dist.all_reduce(target, group=group)
        ctx.save_for_backward(hidden, weight, grad_logits, lse, local, here)
        ctx.span, ctx.real, ctx.chunk_elements = span, real, chunk_elements
        return lse - target

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, grad_logits, lse, local, here = ctx.saved_tensors
        span = ctx.span
        scale = grad_loss.float()[:, None]
        # Each token's incoming gradient scales a row of grad_logits: applied to the [tokens, h] side of each matmul.
        scaled_hidden = (hidden.float() * scale).to(hidden.dtype)
        grad_weight = torch.empty_like(weight)
        grad_weight[span:].zero_()  # padding rows past the span
        if grad_logits is not None:
            grad_hidden = ((grad_logits @ weight[:span]).float() * scale).to(hidden.dtype)
            torch.mm(grad_logits.t(), scaled_hidden, out=grad_weight[:span])
            return grad_hidden, grad_weight, None, None, None, None, None, None
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for r, r_end in _spans(span, hidden.shape[0], ctx.chunk_elements, multiple=ALIGN_ROWS):
            # a label outside rows [r, r_end) matches no column of this chunk: the onehot is zero there. The
            # gradient overwrites the logits, a temporary.
            logits = hidden @ weight[r:r_end].t()
            rows_grad = _write_grad_logits(logits, logits, lse, local - r, here, min(ctx.real - r, r_end - r))
            grad_hidden += rows_grad @ weight[r:r_end]
            torch.mm(rows_grad.t(), scaled_hidden, out=grad_weight[r:r_end])
        return (grad_hidden * scale).to(hidden.dtype), grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         vocab_start: int = 0, group=None, chunk_elements: int | None = None,
                         recompute_logits: bool = False) -> torch.Tensor:
    """Per-token loss [N] (fp32) of ``hidden`` [N, h] against ``labels`` [N], logits ``hidden @ weight.T``.

    ``weight`` [V_local, h] holds vocabulary rows ``vocab_start ..``; ``group`` is the tensor-parallel group the
    vocabulary is split over (None: one rank); ``vocab_size`` is the real vocabulary (later rows are padding);
    ``chunk_elements``: logits per chunk of tokens, and of vocabulary rows in a recomputing backward (default
    ``CHUNK_ELEMENTS``); ``recompute_logits``: keep no ``softmax - onehot`` (2 bytes per token and row), recompute
    the logits in backward instead.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, h] and labels [N]; got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[1]}")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    # Decided here: inside forward grad mode is always off, and ctx.needs_input_grad is true under no_grad too
    # (evaluation of parameters that require grad), where keeping softmax - onehot would waste its memory.
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, labels, vocab_start, vocab_size, group, chunk_elements,
                                     needs_grad and not recompute_logits)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   vocab_size: int) -> torch.Tensor:
    """The definition: full logits over the real vocabulary, then ``F.cross_entropy`` per token (fp32)."""
    logits = (hidden @ weight[:vocab_size].t()).float()
    return F.cross_entropy(logits, labels, reduction="none")
