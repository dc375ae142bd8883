"""ops.rms_norm: RMSNorm against torch's F.rms_norm, the gated RMSNorm against its formula on strided views and unit
rows against F.normalize, eager on the CPU and compiled (fused) on a GPU."""

from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from megatron_flash.ops.rms_norm import gated_rms_norm, rms_norm, unit_rows

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels are compiled on GPUs only")


def _leaf(*shape, dtype, seed, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype).requires_grad_()


def _value_and_grads(fn, *leaves):
    for t in leaves:
        t.grad = None
    out = fn()
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out)
    (out.float() * cotangent.float()).sum().backward()
    return [out.detach()] + [t.grad.clone() for t in leaves]


def _assert_all_close(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-12, atol=1e-12)),
                                       (torch.bfloat16, dict(rtol=1.6e-2, atol=1e-2))])
def test_rms_norm_matches_torch(dtype, tol):
    x, w = _leaf(3, 5, 37, dtype=dtype, seed=0), _leaf(37, dtype=dtype, seed=1)
    got = _value_and_grads(lambda: rms_norm(x, w, 1e-5), x, w)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    want = _value_and_grads(lambda: F.rms_norm(x64, (37,), w64, 1e-5), x64, w64)
    _assert_all_close(got, [t.to(dtype) for t in want], **tol)


def test_rms_norm_of_a_transposed_view_is_contiguous():
    """DeltaNet normalizes a [s, b] view of its [b, s] output and views the result as the out-projection's input."""
    x = torch.randn(5, 3, 37, dtype=torch.float64)
    w = torch.randn(37, dtype=torch.float64)
    got = rms_norm(x.transpose(0, 1), w, 1e-5)
    assert got.is_contiguous()
    torch.testing.assert_close(got, F.rms_norm(x.transpose(0, 1), (37,), w, 1e-5), rtol=1e-12, atol=1e-12)


def _gated_formula(y, z, w, group_size, eps):
    """mamba_ssm's RMSNormGated (norm_before_gate=False) spelled out, in fp64."""
    gated = (y.double() * z.double() * torch.sigmoid(z.double())).reshape(*y.shape[:-2], -1)
    groups = gated.reshape(*gated.shape[:-1], -1, group_size)
    normed = groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.reshape(gated.shape) * w.double()).to(y.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-12, atol=1e-12)),
                                       (torch.bfloat16, dict(rtol=1.6e-2, atol=1e-2))])
@pytest.mark.parametrize("group_size", [3 * 7, 6 * 7])
def test_gated_rms_norm_on_strided_views(dtype, tol, group_size):
    """y and z as the Mamba2 mixer passes them: a transposed scan output and a slice of the projection."""
    y_bs = _leaf(2, 5, 6, 7, dtype=dtype, seed=2)  # [b, s, heads, head_dim]
    projected = _leaf(5, 2, 6, 15, dtype=dtype, seed=3)  # [s, b, heads, 2 * head_dim + 1]
    w = _leaf(6 * 7, dtype=dtype, seed=4)
    got = _value_and_grads(lambda: gated_rms_norm(y_bs.transpose(0, 1), projected[..., :7], w, group_size, 1e-5),
                           y_bs, projected, w)
    want = _value_and_grads(lambda: _gated_formula(y_bs.transpose(0, 1), projected[..., :7], w, group_size, 1e-5),
                            y_bs, projected, w)
    assert got[0].shape == (5, 2, 42) and got[0].is_contiguous()  # the out-projection's input, without a copy
    _assert_all_close(got, want, **tol)


def test_compiled_gated_rms_norm_writes_a_contiguous_result():
    """Compiled (inductor, here for the CPU), the fused kernel writes the contiguous layout itself: one kernel,
    whatever y's strides (a pointwise kernel's output otherwise follows its input's, the Mamba2 scan's [b, s])."""
    y_bs = _leaf(2, 5, 6, 7, dtype=torch.float32, seed=2)
    projected = _leaf(5, 2, 6, 15, dtype=torch.float32, seed=3)
    w = _leaf(6 * 7, dtype=torch.float32, seed=4)
    torch._dynamo.reset()
    with patch.object(torch._dynamo.config, "disable", False):
        compiled = torch.compile(gated_rms_norm.__wrapped__, fullgraph=True)
        got = compiled(y_bs.transpose(0, 1), projected[..., :7], w, 21, 1e-5)
    assert got.is_contiguous()
    torch.testing.assert_close(got, _gated_formula(y_bs.transpose(0, 1), projected[..., :7], w, 21, 1e-5).float(),
                               rtol=1e-5, atol=1e-5)


def _unit_rows_case(dtype, device):
    """unit_rows and F.normalize in fp64 on the same values; one row of zeros (the norm's floor)."""
    w = _leaf(37, 129, dtype=dtype, seed=10, device=device)
    with torch.no_grad():
        w[5] = 0
    w64 = w.detach().double().requires_grad_()
    return _value_and_grads(lambda: unit_rows(w), w), [
        t.to(dtype) for t in _value_and_grads(lambda: F.normalize(w64, dim=1), w64)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-12, atol=1e-12)),
                                       (torch.float32, dict(rtol=1e-5, atol=1e-6)),
                                       (torch.bfloat16, dict(rtol=1.6e-2, atol=1e-2))])
def test_unit_rows_matches_normalize(dtype, tol):
    got, want = _unit_rows_case(dtype, "cpu")
    _assert_all_close(got, want, **tol)
    assert torch.all(got[0][5] == 0) and torch.allclose(got[0].float().norm(dim=1)[6:], torch.ones(31), atol=1e-2)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_match_the_references_on_gpu(dtype):
    """The fused (compiled) kernels on a GPU against the same references as the CPU tests, in fp64."""
    from torch._dynamo.utils import counters

    counters.clear()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    x, w = _leaf(4, 3, 257, dtype=dtype, seed=5, device="cuda"), _leaf(257, dtype=dtype, seed=6, device="cuda")
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    _assert_all_close(_value_and_grads(lambda: rms_norm(x, w, 1e-6), x, w),
                      [t.to(dtype) for t in _value_and_grads(lambda: F.rms_norm(x64, (257,), w64, 1e-6), x64, w64)],
                      **tol)
    y = _leaf(3, 4, 6, 9, dtype=dtype, seed=7, device="cuda")
    z = _leaf(4, 3, 6, 19, dtype=dtype, seed=8, device="cuda")
    g = _leaf(54, dtype=dtype, seed=9, device="cuda")
    y64, z64, g64 = (t.detach().double().requires_grad_() for t in (y, z, g))
    got = _value_and_grads(lambda: gated_rms_norm(y.transpose(0, 1), z[..., :9], g, 27, 1e-5), y, z, g)
    want = _value_and_grads(lambda: _gated_formula(y64.transpose(0, 1), z64[..., :9], g64, 27, 1e-5), y64, z64, g64)
    _assert_all_close(got, [t.to(dtype) for t in want], **tol)
    _assert_all_close(*_unit_rows_case(dtype, "cuda"), **tol)
    assert counters["stats"]["unique_graphs"] >= 3  # the compiled path ran
