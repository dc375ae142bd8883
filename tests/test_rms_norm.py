"""ops.rms_norm: RMSNorm against torch's F.rms_norm (with the residual add before it: add_rms_norm), the gated
RMSNorm against its formula on strided views and unit rows against F.normalize, eager on the CPU and compiled
(fused) on a GPU. The gated norm's Triton kernels against the formula in fp64, values and gradients, on awkward
sizes: groups that are no power of two, a transposed y, a strided slice for z, rows not a multiple of the rows per
backward program; on a GPU, or on the CPU under Triton's interpreter (a subprocess with TRITON_INTERPRET=1,
tests/triton_kernels.py)."""

import re

import pytest
import torch
import torch.nn.functional as F

from megatron_flash.ops.rms_norm import add_rms_norm, gated_rms_norm, rms_norm, unit_rows
from tests.triton_kernels import (HAVE_TRITON, TRITON_DEVICE, needs_triton_kernels, run_under_interpreter,
                                  starts_the_interpreter)

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


def _add_rms_norm_case(dtype, device):
    """add_rms_norm and its definition, the add (rounded to the input dtype) then F.rms_norm on fp64 copies: both
    results, and the gradients of x, delta and w under one cotangent for each result."""
    x, d = _leaf(3, 5, 37, dtype=dtype, seed=10, device=device), _leaf(3, 5, 37, dtype=dtype, seed=11, device=device)
    w = _leaf(37, dtype=dtype, seed=12, device=device)
    x64, d64, w64 = (t.detach().double().requires_grad_() for t in (x, d, w))

    def definition():
        total = (x64.to(dtype) + d64.to(dtype)).double()  # the sum the norm reads is rounded, as the plain add's
        return total, F.rms_norm(total, (37,), w64, 1e-5)

    def both(pair):  # one scalar from both results, so each gets its own cotangent
        total, normed = pair
        gen = torch.Generator().manual_seed(98)
        return torch.stack([(r.double() * torch.randn(r.shape, generator=gen).to(r.device).double()).sum()
                            for r in (total, normed)]).sum().reshape(1)

    got, want = [], []
    for fn, leaves, out in ((lambda: add_rms_norm(x, d, w, 1e-5), (x, d, w), got), (definition, (x64, d64, w64), want)):
        pair = fn()
        both(pair).sum().backward()
        out += [r.detach() for r in pair] + [t.grad.clone() for t in leaves]
    return got, [t.to(dtype) for t in want]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-12, atol=1e-12)),
                                       (torch.bfloat16, dict(rtol=1.6e-2, atol=2e-2))])
def test_add_rms_norm_matches_the_add_then_the_norm(dtype, tol):
    _assert_all_close(*_add_rms_norm_case(dtype, "cpu"), **tol)


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
    """The fused kernels on a GPU (compiled, and the gated norm's Triton kernels) against the same references as the
    CPU tests, in fp64."""
    from torch._dynamo.utils import counters

    from megatron_flash.ops.gated_rms_norm_triton import GatedRMSNormFunction

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
    assert gated_rms_norm(y.transpose(0, 1), z[..., :9], g, 27, 1e-5).grad_fn._forward_cls is GatedRMSNormFunction
    _assert_all_close(*_unit_rows_case(dtype, "cuda"), **tol)
    _assert_all_close(*_add_rms_norm_case(dtype, "cuda"), **tol)
    assert counters["stats"]["unique_graphs"] >= 3  # the compiled path ran: rms_norm, unit_rows and add_rms_norm


# --------------------------------------------------------------------------------------------------------------
# the gated norm's Triton kernels (ops/gated_rms_norm_triton.py)
# --------------------------------------------------------------------------------------------------------------

# (y's leaf shape, y [d0, d1, H, P] as a function of it, z's leaf shape, z likewise, group size, rows per backward
# program or None for the module's own, whether y's channels are flat so that the kernels read it in place)
TRITON_CASES = {
    # the Mamba2 layer's layout: y a transposed [b, s] scan output, z a slice of a wider [s, b, W] projection
    "two_groups_of_21_10_rows_by_4": ((2, 5, 6, 7), lambda t: t.transpose(0, 1), (5, 2, 90),
                                      lambda t: t[..., 3:45].view(5, 2, 6, 7), 21, 4, True),
    "one_group_of_27_12_rows_by_5": ((3, 4, 3, 9), lambda t: t.transpose(0, 1), (4, 3, 40),
                                     lambda t: t[..., 1:28].view(4, 3, 3, 9), 27, 5, True),
    "heads_strided_so_copied": ((3, 7, 2, 16), lambda t: t[..., :8], (3, 7, 2, 8), lambda t: t, 8, None, False),
}

# fp32: the same math in fp32 against fp64, a few roundings of 2^-24 and sums over at most 27 channels or 12 rows
# (and the GPU's approximate exp in sigmoid, ~1e-7 relative) apart, far inside 1e-5; atol for results near zero
# (the input gradient's rstd * (dn - n * mean(dn * n)) cancels, leaving an absolute error of its terms' size).
# bf16: inputs and cotangent are bf16 values, exact in fp32 and fp64, and the kernels round their fp32 results to
# bf16 once (the weight gradient after the fp32 sum of its partials): at most half a bf16 ulp, 2^-8 relative. One
# ulp, 2^-7, leaves the fp32 error above on top.
TRITON_TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5)}


def _gated_value_and_grads(fn, y, z, w):
    """fn(y, z, w) and its gradients at y, z and w themselves (the tensors the backward writes, before autograd
    carries them to the leaves), for a cotangent of bf16 values, which every dtype holds exactly."""
    out = fn(y, z, w)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).bfloat16().to(out)
    return [out.detach(), *torch.autograd.grad(out, (y, z, w), cotangent)]


@needs_triton_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_gated_triton_kernels_match_the_formula(case, dtype, monkeypatch):
    from megatron_flash.ops import gated_rms_norm_triton

    y_shape, y_view, z_shape, z_view, group_size, rows_per_program, flat_y = TRITON_CASES[case]
    if rows_per_program is not None:
        monkeypatch.setattr(gated_rms_norm_triton, "ROWS_PER_PROGRAM", rows_per_program)
    y = y_view(_leaf(*y_shape, dtype=dtype, seed=20, device=TRITON_DEVICE))
    z = z_view(3 * _leaf(*z_shape, dtype=dtype, seed=21, device=TRITON_DEVICE))  # sigmoid's saturated ends too
    w = _leaf(y.shape[2] * y.shape[3], dtype=dtype, seed=22, device=TRITON_DEVICE)
    got = _gated_value_and_grads(
        lambda *t: gated_rms_norm_triton.gated_rms_norm_triton(*t, group_size, 1e-5), y, z, w)
    want = _gated_value_and_grads(lambda *t: _gated_formula(*t, group_size, 1e-5),
                                  *(t.detach().double().requires_grad_() for t in (y, z, w)))
    out, dy, dz, _ = got
    assert out.shape == (*y.shape[:2], w.shape[0]) and out.is_contiguous()  # the out-projection's input
    assert dz.is_contiguous() and (dy.stride() == y.stride() or not flat_y)  # the scan's backward gets its layout
    for what, g, r, t in zip(("output", "dy", "dz", "dweight"), got, want, (y, y, z, w), strict=True):
        assert g.dtype == dtype and g.shape == (r.shape if what == "output" else t.shape), what
        torch.testing.assert_close(g.double(), r, **TRITON_TOLERANCES[dtype], msg=lambda msg: f"{what}: {msg}")


@needs_triton_kernels
def test_gated_triton_kernels_take_empty_inputs():
    from megatron_flash.ops.gated_rms_norm_triton import gated_rms_norm_triton

    y, z = (torch.zeros(0, 2, 3, 4, device=TRITON_DEVICE, requires_grad=True) for _ in range(2))
    w = torch.ones(12, device=TRITON_DEVICE, requires_grad=True)
    out = gated_rms_norm_triton(y, z, w, 6, 1e-5)
    out.sum().backward()
    assert out.shape == (0, 2, 12) and y.grad.shape == y.shape and z.grad.shape == z.shape
    assert torch.all(w.grad == 0)


@pytest.mark.skipif(not HAVE_TRITON, reason="the kernels' module needs triton")
def test_gated_triton_wrapper_refuses_bad_shapes():
    from megatron_flash.ops.gated_rms_norm_triton import gated_rms_norm_triton

    y = torch.randn(2, 3, 4, 6)
    with pytest.raises(ValueError, match=r"one shape \[d0, d1, heads, head_dim\]"):
        gated_rms_norm_triton(y[0], y[0], torch.ones(24), 24, 1e-5)
    with pytest.raises(ValueError, match="a group size dividing 24"):
        gated_rms_norm_triton(y, y, torch.ones(24), 9, 1e-5)


GATED_TRITON_KERNEL_TESTS = 2 * len(TRITON_CASES) + 1


@starts_the_interpreter
def test_gated_triton_kernels_under_the_interpreter():
    """Runs the gated_triton_kernels tests above in a subprocess under Triton's interpreter; they must pass, not
    skip."""
    summary = run_under_interpreter([__file__, "-k", "gated_triton_kernels_match or gated_triton_kernels_take"])
    assert re.search(rf"\b{GATED_TRITON_KERNEL_TESTS} passed", summary) and "skipped" not in summary, summary
