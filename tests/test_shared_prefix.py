"""layers/shared_prefix.py: a position-wise function applied once to the rows every column shares equals applying
it to every column, values and gradients (of the inputs upstream of the broadcast and of the function's weights)."""

import pytest
import torch

from megatron_flash.layers.shared_prefix import apply_once_to_shared_prefix


def _values_and_grads(shared, m=3, rest_len=4, batch=5, hidden=6):
    gen = torch.Generator().manual_seed(0)
    meta = torch.randn(m, 1, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    rest = torch.randn(rest_len, batch, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2 * hidden, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(m + rest_len, batch, 2 * hidden, generator=gen, dtype=torch.float64)

    def position_wise(x):
        return torch.nn.functional.silu(x @ weight.t())

    x = torch.cat([meta.expand(-1, batch, -1), rest])  # every column starts with the same rows
    y = apply_once_to_shared_prefix(position_wise, x, m) if shared else position_wise(x)
    y.backward(cotangent)
    return y.detach(), meta.grad, rest.grad, weight.grad


def test_shared_rows_once_equal_every_column():
    for got, want in zip(_values_and_grads(shared=True), _values_and_grads(shared=False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_only_the_rest_used_gets_a_gradient_for_the_rest():
    """A gradient reaching one side only (the other unused) still gives x a whole gradient."""
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    apply_once_to_shared_prefix(lambda t: t * 2, x, 2)[2:].sum().backward()
    want = torch.zeros_like(x)
    want[2:] = 2
    torch.testing.assert_close(x.grad, want)


def test_nothing_to_share():
    x = torch.randn(4, 1, 2)
    assert torch.equal(apply_once_to_shared_prefix(torch.sin, x, 2), torch.sin(x))  # one column
    assert torch.equal(apply_once_to_shared_prefix(torch.sin, x.expand(-1, 3, -1), 0), torch.sin(x).expand(-1, 3, -1))
    with pytest.raises(ValueError, match="shared prefix 4 must be shorter than the sequence"):
        apply_once_to_shared_prefix(torch.sin, x.expand(-1, 3, -1), 4)


def test_split_with_history_rows_gives_one_gradient_for_both_reads():
    """The rest starts ``history`` rows inside the prefix: those rows' gradient is the shared read's (column 0)
    plus each column's own read."""
    from megatron_flash.layers.shared_prefix import join_shared_prefix, split_shared_prefix

    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    shared, rest = split_shared_prefix(x, 4, history=2)
    assert shared.shape == (4, 1, 2) and rest.shape == (4, 3, 2) and torch.equal(rest, x[2:])
    (shared * 3).sum().backward(retain_graph=True)
    (rest * 5).sum().backward()
    want = torch.zeros_like(x)
    want[:4, :1] = 3
    want[2:] += 5
    torch.testing.assert_close(x.grad, want)
    joined = join_shared_prefix(shared, rest[2:])
    assert torch.equal(joined[:4], x[:4, :1].expand(-1, 3, -1)) and torch.equal(joined[4:], x[4:])
    with pytest.raises(ValueError, match="at least the history 5"):
        split_shared_prefix(x, 4, history=5)


def test_rows_from_drops_rows_and_adds_no_node_when_it_drops_none():
    """The mixers' view of their rows after the conv window: the dropped rows get a zero gradient; with nothing
    dropped (the default path, every training step) it is the tensor itself, so no slice's backward copies it."""
    from megatron_flash.layers.base import rows_from

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = x * 2
    assert rows_from(y, 0) is y
    rows = rows_from(y, 2)
    assert torch.equal(rows, y[2:])
    rows.backward(torch.ones_like(rows))
    want = torch.full_like(x, 2.0)
    want[:2] = 0
    torch.testing.assert_close(x.grad, want)
