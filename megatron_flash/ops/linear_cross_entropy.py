"""Output layer and cross-entropy in one op, over chunks of tokens, with the vocabulary split over tensor-parallel
ranks: the [tokens, vocabulary] logits (131072 columns here) are never held in full.

``loss[t] = logsumexp_v(h[t] . w[v]) - h[t] . w[label[t]]`` over the real vocabulary: rows of ``weight`` at or
past ``vocab_size`` (padding for TP) are excluded. ``weight`` is this rank's rows ``[vocab_start, vocab_start +
V_local)`` of the full matrix. Forward keeps only the per-token log-sum-exp; backward recomputes each chunk's
logits (one extra matmul: the price of not storing them) and accumulates the input and weight gradients. The
softmax is fp32 whatever the input dtype (matmuls run in the input dtype with fp32 accumulation); on GPUs each
chunk's softmax passes are fused kernels (ops/compile.py) that read the logits in the matmul's dtype once.

Under TP the input must enter through ``copy_to_tensor_model_parallel_region`` (as megatron's ColumnParallelLinear
does): this op returns each rank's partial input gradient and that region all-reduces it.

:func:`linear_cross_entropy_reference` (full logits, ``F.cross_entropy``, one rank) is the definition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_flash.ops.compile import compiled_on_cuda

# Tokens per chunk are chosen so one chunk's logits hold about this many elements (512 MiB in bf16).
CHUNK_ELEMENTS = 2**28


def _chunks(num_tokens: int, local_vocab: int, chunk_tokens: int | None):
    size = chunk_tokens or max(1, CHUNK_ELEMENTS // max(local_vocab, 1))
    return [(s, min(s + size, num_tokens)) for s in range(0, num_tokens, size)]


def _real_logits(logits: torch.Tensor, real: int) -> torch.Tensor:
    """fp32 logits with the columns past the real vocabulary (TP padding) at -inf."""
    column = torch.arange(logits.shape[1], device=logits.device)
    return logits.float().masked_fill(column >= real, float("-inf"))


@compiled_on_cuda
def _target_and_peak(logits, local, here, real: int):
    """Each token's logit of its label (0 where the label is on another rank) and its largest logit."""
    wide = _real_logits(logits, real)
    return torch.where(here, wide.gather(1, local[:, None]).squeeze(1), 0.0), wide.amax(dim=1)


@compiled_on_cuda
def _sum_exp(logits, peak, real: int):
    return (_real_logits(logits, real) - peak[:, None]).exp().sum(dim=1)


@compiled_on_cuda
def _grad_logits(logits, lse, local, here, grad_loss, real: int):
    """d loss / d logits = (softmax - onehot(label)) * each token's incoming gradient, in the logits' dtype."""
    probs = (_real_logits(logits, real) - lse[:, None]).exp()
    onehot = torch.zeros_like(probs).scatter_(1, local[:, None], here.float()[:, None])
    return ((probs - onehot) * grad_loss[:, None]).to(logits.dtype)


def _local_target(labels, vocab_start: int, local_vocab: int):
    """Index of each label in this rank's slice, and whether it is there."""
    local = labels - vocab_start
    here = (local >= 0) & (local < local_vocab)
    return local.clamp(0, local_vocab - 1), here


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, vocab_size, group, chunk_tokens):
        n, local_vocab = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        real = vocab_size - vocab_start  # this rank's rows past it are padding
        for s, e in _chunks(n, local_vocab, chunk_tokens):
            logits = hidden[s:e] @ weight.t()
            local, here = _local_target(labels[s:e], vocab_start, local_vocab)
            target[s:e], peak = _target_and_peak(logits, local, here, real)
            if group is not None:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            sum_exp = _sum_exp(logits, peak, real)
            if group is not None:
                dist.all_reduce(sum_exp, group=group)
            lse[s:e] = sum_exp.log_() + peak
        if group is not None:
            dist.all_reduce(target, group=group)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.vocab_start, ctx.vocab_size, ctx.chunk_tokens = vocab_start, vocab_size, chunk_tokens
        return lse - target

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        n, local_vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_loss = grad_loss.float()
        real = ctx.vocab_size - ctx.vocab_start
        for s, e in _chunks(n, local_vocab, ctx.chunk_tokens):
            local, here = _local_target(labels[s:e], ctx.vocab_start, local_vocab)
            grad_logits = _grad_logits(hidden[s:e] @ weight.t(), lse[s:e], local, here, grad_loss[s:e], real)
            grad_hidden[s:e] = grad_logits @ weight
            grad_weight += grad_logits.t() @ hidden[s:e]  # one fused widening add
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         vocab_start: int = 0, group=None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token loss [N] (fp32) of ``hidden`` [N, h] against ``labels`` [N], logits ``hidden @ weight.T``.

    ``weight`` [V_local, h] holds vocabulary rows ``vocab_start ..``; ``group`` is the tensor-parallel group the
    vocabulary is split over (None: one rank); ``vocab_size`` is the real vocabulary (later rows are padding).
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, h] and labels [N]; got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[1]}")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    return _LinearCrossEntropy.apply(hidden, weight, labels, vocab_start, vocab_size, group, chunk_tokens)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   vocab_size: int) -> torch.Tensor:
    """The definition: full logits over the real vocabulary, then ``F.cross_entropy`` per token (fp32)."""
    logits = (hidden @ weight[:vocab_size].t()).float()
    return F.cross_entropy(logits, labels, reduction="none")
