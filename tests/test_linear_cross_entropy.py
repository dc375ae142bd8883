"""The fused, chunked output layer + cross-entropy against full logits and F.cross_entropy."""

import pytest
import torch

from megatron_flash.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from megatron_flash.testing import run_distributed


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
                                                         "(the fused softmax kernels are compiled there)"))])
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
