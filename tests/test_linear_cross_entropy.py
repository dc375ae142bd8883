"""The fused, chunked output layer + cross-entropy against full logits and F.cross_entropy; its softmax passes'
Triton kernels against the eager functions they replace, on a GPU or on the CPU under Triton's interpreter (a
subprocess with TRITON_INTERPRET=1, which triton reads at import; the whole op then runs its kernels there too)."""

import re

import pytest
import torch

from megatron_flash.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from megatron_flash.testing import run_distributed
from tests.triton_kernels import TRITON_DEVICE, needs_triton_kernels, run_under_interpreter, starts_the_interpreter


def _inputs(n=70, h=24, padded_vocab=40, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = torch.randn(padded_vocab, h, generator=gen).to(dtype)
    grad = torch.rand(n, generator=gen)
    return hidden, weight, grad


def _loss_and_grads(fn, hidden, weight, labels, grad, vocab_size, **kw):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, labels, vocab_size, **kw)
    (loss * grad).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("recompute_logits", [False, True])
@pytest.mark.parametrize("chunk_elements,padded_vocab,vocab_size", [
    (16 * 37, 40, 37),    # 5 chunks of tokens; the last 3 rows are TP padding: never part of the softmax
    (33 * 37, 40, 37),    # 3 chunks
    (None, 40, 37),       # 1 chunk
    (70 * 128, 400, 300), # 1 chunk of tokens; 3 chunks of 128 rows in a recomputing backward, the last of 44 real
])
def test_matches_full_logits_with_vocab_padding(chunk_elements, padded_vocab, vocab_size, recompute_logits):
    hidden, weight, grad = _inputs(padded_vocab=padded_vocab)
    labels = torch.randint(0, vocab_size, (hidden.shape[0],), generator=torch.Generator().manual_seed(1))
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad, vocab_size,
                          chunk_elements=chunk_elements, recompute_logits=recompute_logits)
    want = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, grad, vocab_size)
    # fp32 logits of magnitude ~25 carry ~2e-6 of rounding, which matmuls over other blocks can flip: gradients
    # agree to ~1e-5 absolute (2e-6 of their largest entries)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert torch.all(got[2][vocab_size:] == 0)


@pytest.mark.parametrize("recompute_logits", [False, True])  # recomputing: 2 chunks of 128 rows in backward
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU "
                                                         "(the softmax passes' Triton kernels run there)"))])
def test_bf16_close_to_fp32_definition(device, recompute_logits):
    hidden, weight, grad = (t.to(device) for t in _inputs(n=129, h=64, padded_vocab=256, dtype=torch.bfloat16))
    labels = torch.randint(0, 250, (129,), generator=torch.Generator().manual_seed(2)).to(device)
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad, 250, chunk_elements=50 * 250,
                          recompute_logits=recompute_logits)
    want = _loss_and_grads(linear_cross_entropy_reference, hidden.float(), weight.float(), labels, grad, 250)
    for g, w in zip(got, want):
        assert (g.float() - w).norm() / w.norm() < 2e-2


def test_softmax_minus_onehot_is_kept_only_when_a_gradient_is_wanted():
    """Forward keeps a [tokens, rows] softmax - onehot for backward when a gradient is wanted, and under no_grad
    (evaluation) or with recompute_logits allocates none, with the same loss. Chunks of 14 tokens: only that kept
    tensor is [70, 40]."""
    from megatron_flash.testing import OpTrace

    hidden, weight, _ = _inputs()
    labels = torch.randint(0, 37, (hidden.shape[0],), generator=torch.Generator().manual_seed(3))
    want = linear_cross_entropy_reference(hidden, weight, labels, 37)
    kept_shape = (hidden.shape[0], weight.shape[0])

    def run(leaf, recompute_logits=False):
        with OpTrace() as trace:
            loss = linear_cross_entropy(leaf, weight, labels, 37, chunk_elements=16 * 37,
                                        recompute_logits=recompute_logits)
        shapes = {a[1] for _, args, _ in trace.ops for a in args if isinstance(a, tuple) and a[:1] == ("tensor",)}
        return loss, kept_shape in shapes

    with torch.no_grad():
        loss, kept = run(hidden.clone().requires_grad_())
    assert loss.grad_fn is None and not kept
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss, kept = run(hidden.clone().requires_grad_())
    assert loss.grad_fn is not None and kept
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    loss, kept = run(hidden.clone().requires_grad_(), recompute_logits=True)
    assert loss.grad_fn is not None and not kept
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_rejects_mismatched_shapes():
    hidden, weight, _ = _inputs()
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, torch.zeros(3, dtype=torch.long), 37)
    with pytest.raises(ValueError, match="hidden size"):
        linear_cross_entropy(hidden, weight[:, :5], torch.zeros(70, dtype=torch.long), 37)


def _tensor_parallel_case(vocab_size, recompute_logits):
    from megatron.core import parallel_state, tensor_parallel

    hidden, weight, grad = _inputs()
    labels = torch.randint(0, vocab_size, (hidden.shape[0],), generator=torch.Generator().manual_seed(1))
    rank, world = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    per_rank = weight.shape[0] // world
    local_weight = weight[rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_()
    hidden_leaf = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(tensor_parallel.copy_to_tensor_model_parallel_region(hidden_leaf), local_weight,
                                labels, vocab_size, vocab_start=rank * per_rank,
                                group=parallel_state.get_tensor_model_parallel_group(), chunk_elements=16 * 20,
                                recompute_logits=recompute_logits)
    (loss * grad).sum().backward()
    want = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, grad, vocab_size)
    torch.testing.assert_close(loss.detach(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_leaf.grad, want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(local_weight.grad, want[2][rank * per_rank:(rank + 1) * per_rank], rtol=1e-5,
                               atol=1e-5)
    return True


# 40 rows over 2 ranks: rank 1 holds rows 20..39; with 37 real rows 37..39 are padding, with 15 all of its rows are
@pytest.mark.parametrize("recompute_logits", [False, True])
@pytest.mark.parametrize("vocab_size", [37, 15])
def test_tensor_parallel_vocab_split_matches_one_rank(vocab_size, recompute_logits):
    assert run_distributed(_tensor_parallel_case, world_size=2, tensor_model_parallel_size=2,
                           args=(vocab_size, recompute_logits)) == [True, True]


def test_row_chunks_of_a_recomputing_backward_are_whole_multiples_of_the_alignment():
    """cuBLAS takes a slow unaligned kernel for row chunks whose length is not a multiple of 8 (ALIGN_ROWS = 128):
    every span but the last is a whole multiple, and the element budget is kept where it allows one multiple."""
    from megatron_flash.ops.linear_cross_entropy import ALIGN_ROWS, _spans

    spans = _spans(1000, 70, 70 * 300, multiple=ALIGN_ROWS)  # budget: 300 rows -> 256
    assert spans == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert _spans(1000, 70, 70 * 5, multiple=ALIGN_ROWS)[0] == (0, ALIGN_ROWS)  # at least one multiple
    assert _spans(10, 3, 7) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # token chunks: no multiple


def _logits_chunk(valid, dtype, rows=7, width=1000, seed=0):
    """A chunk's logits [rows, width] as a view of a wider buffer (its row stride is not its width), ~N(0, 9) in the
    real columns and 50 more in the padding columns from ``valid`` on (one counted would show), with the labels'
    columns and ``here`` as the op makes them from labels on this rank and off it; row 0's label is the last real
    column, row 1's the first padding column (another rank's)."""
    from megatron_flash.ops.linear_cross_entropy import _local_target

    gen = torch.Generator().manual_seed(seed)
    buffer = 3 * torch.randn(rows, width + 24, generator=gen)
    buffer[:, valid:] += 50
    labels = torch.randint(-300, valid + 300, (rows,), generator=gen)
    labels[:2] = torch.tensor([valid - 1, valid])
    local, here = _local_target(labels, 0, valid)
    return [buffer.to(TRITON_DEVICE, dtype)[:, :width], local.to(TRITON_DEVICE), here.to(TRITON_DEVICE)]


# 7 rows of 1000 columns: with 256-column blocks 4 per row, the last partly past the width; with the module's
# default block (8192) one block. valid = 1000: no padding; 777: padding inside the last block and before it, not a
# multiple of 16 (the masks' vectors are kept whole at the width); 0: a TP rank holding only padding.
KERNEL_CASES = [(valid, block, dtype) for valid in (1000, 777, 0) for block in (256, None)
                for dtype in (torch.float32, torch.bfloat16)]


@needs_triton_kernels
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # the interpreter's log(0): -inf, wanted
@pytest.mark.parametrize("valid,block,dtype", KERNEL_CASES, ids=str)
def test_triton_lse_and_target_match_the_eager_pass(valid, block, dtype):
    from megatron_flash.ops import cross_entropy_triton
    from megatron_flash.ops.linear_cross_entropy import _local_lse_and_target

    logits, local, here = _logits_chunk(valid, dtype)
    got_lse, got_target = cross_entropy_triton.local_lse_and_target(
        logits, local, here, valid, **({"block": block} if block else {}))
    want_lse, want_target = _local_lse_and_target(logits, local, here, valid)
    # the label's logit is one element loaded and widened to fp32: exact
    torch.testing.assert_close(got_target, want_target, rtol=0, atol=0)
    # fp32 sums of up to 1000 exps in another order (and the GPU's exp2 approximation, 2 ulp): the sum's relative
    # error, the log-sum-exp's absolute one, stays well under 1e-5; -inf (valid = 0) must be -inf on both sides
    torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=1e-5)


@needs_triton_kernels
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("valid,block,dtype", KERNEL_CASES, ids=str)
def test_triton_grad_logits_match_the_eager_pass(valid, block, dtype, in_place):
    """Written into a slice of a larger buffer (the kept gradient's rows of one chunk), whose other elements stay
    as they were, or over the logits themselves (the recomputing backward)."""
    from megatron_flash.ops import cross_entropy_triton
    from megatron_flash.ops.linear_cross_entropy import _grad_logits, _local_lse_and_target

    logits, local, here = _logits_chunk(valid, dtype)
    # the log-sum-exp over every rank: this rank's columns and others' (finite where this rank has no real column)
    other_ranks = 3 * torch.randn(logits.shape[0], generator=torch.Generator().manual_seed(5)) + 8
    lse = torch.logaddexp(_local_lse_and_target(logits, local, here, valid)[0], other_ranks.to(TRITON_DEVICE))
    want = _grad_logits(logits, lse, local, here, valid)
    block_arg = {"block": block} if block else {}
    if in_place:
        got = cross_entropy_triton.grad_logits(logits, lse, local, here, valid, out=logits, **block_arg)
        assert got.data_ptr() == logits.data_ptr()
    else:
        buffer = torch.full((logits.shape[0] + 3, logits.shape[1] + 8), 7.0, dtype=dtype, device=TRITON_DEVICE)
        got = cross_entropy_triton.grad_logits(logits, lse, local, here, valid, out=buffer[2:-1, :-8], **block_arg)
        untouched = torch.ones_like(buffer, dtype=torch.bool)
        untouched[2:-1, :-8] = False
        assert torch.all(buffer[untouched] == 7.0)
    assert got.dtype == dtype and torch.all(got[:, valid:] == 0)
    # fp32: the same exp of the same difference, up to exp's rounding (the GPU's exp2 approximation: a few ulp of
    # the scaled argument, ~1e-6 relative at arguments of -30). bf16: each side's fp32 value rounds to 8 significant
    # bits and may land on the neighbouring value (Triton's interpreter truncates where GPUs round to nearest):
    # one bf16 ulp, at most 2^-7 relative. No value is near fp32's subnormals (the real logits are within ~40 of
    # the log-sum-exp), so no absolute slack.
    tol = dict(rtol=1e-5, atol=0) if dtype == torch.float32 else dict(rtol=2**-7, atol=0)
    torch.testing.assert_close(got, want, **tol)


@needs_triton_kernels
def test_triton_kernels_refuse_arguments_they_would_misread():
    from megatron_flash.ops import cross_entropy_triton

    logits, local, here = _logits_chunk(777, torch.float32)
    lse = torch.zeros(logits.shape[0], device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="contiguous rows"):
        cross_entropy_triton.local_lse_and_target(logits.t(), local, here, 5)
    with pytest.raises(ValueError, match="valid must be within"):
        cross_entropy_triton.local_lse_and_target(logits, local, here, 1001)
    with pytest.raises(ValueError, match="per-row tensors"):
        cross_entropy_triton.local_lse_and_target(logits, local[:3], here, 777)
    with pytest.raises(ValueError, match="out must be shaped as logits"):
        cross_entropy_triton.grad_logits(logits, lse, local, here, 777, out=logits[:, :10])
    with pytest.raises(ValueError, match="per-row tensors"):
        cross_entropy_triton.grad_logits(logits, torch.zeros(7, 2, device=TRITON_DEVICE)[:, 0], local, here, 777,
                                         out=logits)


@starts_the_interpreter
def test_triton_kernels_under_the_interpreter():
    """Runs the kernel tests above in a subprocess under Triton's interpreter, and the op's own tests there, where
    it runs its softmax passes through the kernels: one vocabulary split with a rank holding only padding (-inf
    log-sum-exp on it). All must pass: a kernel test that skipped would be missing from the count."""
    tests = [f"{__file__}::{name}" for name in (
        "test_triton_lse_and_target_match_the_eager_pass", "test_triton_grad_logits_match_the_eager_pass",
        "test_triton_kernels_refuse_arguments_they_would_misread", "test_matches_full_logits_with_vocab_padding",
        "test_bf16_close_to_fp32_definition", "test_tensor_parallel_vocab_split_matches_one_rank[15-False]")]
    summary = run_under_interpreter(tests)
    # the kernel cases (twice for the gradient), the refusals, 8 full-logits cases, bf16's 2 on the cpu, 1 split
    expected = 3 * len(KERNEL_CASES) + 1 + 8 + 2 + 1
    assert re.search(rf"\b{expected} passed", summary), summary
