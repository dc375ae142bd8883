"""ops.short_conv: every backend against the loop in causal_conv1d_reference, values and gradients, on awkward
sizes: packed documents shorter than the kernel, states, strided slices of a projection; fla's kernel on a GPU,
ours on a GPU or on the CPU under Triton's interpreter (tests/triton_kernels.py)."""

import re

import pytest
import torch

from megatron_flash.ops.short_conv import causal_conv1d, causal_conv1d_reference
from tests.triton_kernels import TRITON_DEVICE, needs_triton_kernels, run_under_interpreter, starts_the_interpreter

K = 4
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's kernel runs on GPUs only")


def _tensors(batch, length, channels, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=gen)
    weight = torch.randn(channels, K, generator=gen) / K
    bias = torch.randn(channels, generator=gen)
    return [t.to(device, dtype).requires_grad_() for t in (x, weight, bias)]


def _value_and_grads(fn, leaves):
    for t in leaves:
        t.grad = None
    y = fn()
    # bf16 values: every dtype holds them exactly, so each side gets the same cotangent
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).bfloat16().to(y)
    (y.double() * cotangent.double()).sum().backward()
    return [y.detach()] + [t.grad.clone() for t in leaves]


def _assert_matches(got, want, dtype, tol):
    """Each of ``got`` in ``dtype`` and within ``tol`` of ``want`` (fp64): elementwise for a dict (assert_close's
    arguments), else in relative error ||a - b|| / ||b||."""
    for g, r in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == r.shape
        if isinstance(tol, dict):
            torch.testing.assert_close(g.double(), r, **tol)
        else:
            assert (g.double() - r).norm() / r.norm() < tol


def _conv_flattened(x, weight, bias, activation, cu_seqlens, backend, sections):
    """causal_conv1d's y as [B, T, C]; with ``sections``, after checking its shape [B, T, S, C/S] and, on the
    triton backend, that each section is contiguous."""
    y = causal_conv1d(x, weight, bias, activation, cu_seqlens=cu_seqlens, backend=backend, sections=sections)[0]
    if sections == 1:
        return y
    assert y.shape == (*x.shape[:2], sections, x.shape[-1] // sections)
    assert backend != "triton" or all(y[:, :, i].is_contiguous() for i in range(sections))
    return y.flatten(-2)


def _compare(dtype, tol, backend="torch", device="cpu", bias=True, activation="silu", cu_seqlens=None, batch=2,
             length=37, channels=13, sections=1):
    """Output and gradients of ``backend`` against the reference in fp64 on the same values: elementwise within
    ``tol`` (a dict for assert_close), or, for a float, within ``tol`` of relative error ||a - b|| / ||b||."""
    x, w, b = _tensors(batch, length, channels, dtype, device)
    b = b if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    got = _value_and_grads(lambda: _conv_flattened(x, w, b, activation, cu_seqlens, backend, sections), leaves)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64, b64 = wide[0], wide[1], (wide[2] if bias else None)
    want = _value_and_grads(lambda: causal_conv1d_reference(x64, w64, b64, activation, cu_seqlens=cu_seqlens),
                            wide)
    _assert_matches(got, want, dtype, tol)


FP64 = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias,activation", [(True, "silu"), (False, None)])
def test_torch_backend_matches_the_reference(bias, activation):
    _compare(torch.float64, FP64, bias=bias, activation=activation)


def test_packed_documents_restart_from_zero():
    # documents of 5, 1, 2 (both shorter than the kernel), 15 and 17 tokens
    _compare(torch.float64, FP64, cu_seqlens=torch.tensor([0, 5, 6, 8, 23, 40]), batch=1, length=40)


def test_bf16_close_to_fp64():
    _compare(torch.bfloat16, 1e-2, length=129, channels=48)


def test_torch_backend_carries_states():
    """Two halves with the state handed over equal the whole; the final state is the last K inputs."""
    x, w, b = (t.detach() for t in _tensors(2, 30, 6, torch.float64))
    whole = causal_conv1d_reference(x, w, b, "silu")
    first, state = causal_conv1d(x[:, :11], w, b, "silu", output_final_state=True, backend="torch")
    second, final = causal_conv1d(x[:, 11:], w, b, "silu", initial_state=state, output_final_state=True,
                                  backend="torch")
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, **FP64)
    torch.testing.assert_close(final, x[:, -K:].transpose(1, 2))


def test_bad_arguments_are_clear_errors():
    x, w, _ = (t.detach() for t in _tensors(2, 9, 4, torch.float32))
    with pytest.raises(ValueError, match="batch size 1"):
        causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 9]), backend="torch")
    with pytest.raises(ValueError, match="must rise from 0"):
        causal_conv1d(x[:1], w, cu_seqlens=torch.tensor([0, 5, 3, 9]), backend="torch")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="gelu", backend="torch")
    with pytest.raises(ValueError, match="unknown short-conv backend"):
        causal_conv1d(x, w, backend="cudnn")
    with pytest.raises(ValueError, match="sections 3 must divide the 4 channels"):
        causal_conv1d(x, w, backend="torch", sections=3)


def test_sections_unflatten_the_channels():
    """The torch backend's y in sections is its plain y unflattened (the triton backend's own sections are checked
    against the reference below)."""
    x, w, b = (t.detach() for t in _tensors(1, 20, 12, torch.float64))
    for cu_seqlens in (None, torch.tensor([0, 2, 11, 20])):
        plain, _ = causal_conv1d(x, w, b, "silu", cu_seqlens=cu_seqlens, backend="torch")
        sectioned, _ = causal_conv1d(x, w, b, "silu", cu_seqlens=cu_seqlens, backend="torch", sections=3)
        torch.testing.assert_close(sectioned, plain.unflatten(-1, (3, 4)), rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-4, atol=1e-4)), (torch.bfloat16, 1e-2)])
def test_fla_kernel_matches_the_reference(dtype, tol):
    _compare(dtype, tol, backend="fla", device="cuda", length=300, channels=96)
    _compare(dtype, tol, backend="fla", device="cuda", batch=1, length=300, channels=96,
             cu_seqlens=torch.tensor([0, 3, 100, 101, 300], device="cuda"))


def _compare_projection_slice(dtype, tol, device, bias=True, cu_seqlens=None, batch=2, length=37, channels=15,
                              sections=1):
    """The triton backend on x = a slice of channels of a [T, B, C + 3] projection, transposed to [B, T, C] (the
    layers' layout, read in place), against the reference on the same values made contiguous."""
    gen = torch.Generator().manual_seed(1)
    projection = torch.randn(length, batch, channels + 3, generator=gen)
    weight = torch.randn(channels, K, generator=gen) / K
    b = torch.randn(channels, generator=gen) if bias else None
    leaves = [t.to(device, dtype).requires_grad_() for t in (projection, weight, b) if t is not None]

    def sliced(p):
        return p[..., 1:channels + 1].transpose(0, 1)

    got = _value_and_grads(lambda: _conv_flattened(sliced(leaves[0]), *leaves[1:], *([None] * (not bias)), "silu",
                                                   cu_seqlens, "triton", sections), leaves)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    want = _value_and_grads(lambda: causal_conv1d_reference(sliced(wide[0]).contiguous(), *wide[1:],
                                                            *([None] * (not bias)), "silu", cu_seqlens=cu_seqlens),
                            wide)
    _assert_matches(got, want, dtype, tol)


FP32_KERNEL = dict(rtol=1e-5, atol=1e-5)  # the kernels accumulate in fp32 whatever the input dtype


@needs_triton_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_KERNEL), (torch.bfloat16, 1e-2)])
def test_triton_kernels_match_the_reference(dtype, tol):
    device = TRITON_DEVICE
    # more tokens and channels than one tile (64 x 128 forward, 64 x 64 backward), neither a multiple of it
    _compare(dtype, tol, backend="triton", device=device, length=150, channels=131)
    _compare(dtype, tol, backend="triton", device=device, bias=False, activation=None, length=70, channels=13)
    _compare(dtype, tol, backend="triton", device=device, batch=1, length=150, channels=70,
             cu_seqlens=torch.tensor([0, 3, 64, 65, 67, 150], device=device))
    _compare_projection_slice(dtype, tol, device)
    _compare_projection_slice(dtype, tol, device, bias=False, batch=1, length=90, channels=80,
                              cu_seqlens=torch.tensor([0, 5, 6, 8, 23, 90], device=device))


@needs_triton_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_KERNEL), (torch.bfloat16, 1e-2)])
def test_triton_kernels_match_the_reference_in_sections(dtype, tol):
    """y [B, T, 3, 43] stored section-major: the forward's 64-channel tiles straddle the sections."""
    device = TRITON_DEVICE
    _compare_projection_slice(dtype, tol, device, length=70, channels=129, sections=3)
    _compare_projection_slice(dtype, tol, device, batch=1, length=90, channels=129, sections=3,
                              cu_seqlens=torch.tensor([0, 5, 6, 8, 23, 90], device=device))
    # without the activation the backward reads y's gradient [B, T, 3, 43] directly
    _compare(dtype, tol, backend="triton", device=device, bias=False, activation=None, length=70, channels=129,
             sections=3)


def _compare_history(backend, device, dtype, tol, history, sections=1, bias=True, length=70, channels=129):
    """``history`` H on a strided [T, B] projection slice (the layers' layout): y and every gradient equal the
    reference's over the whole input with its first H outputs dropped (the history rows still get the gradient of
    their reads)."""
    gen = torch.Generator().manual_seed(3)
    projection = torch.randn(length, 2, channels + 3, generator=gen)
    weight = torch.randn(channels, K, generator=gen) / K
    b = torch.randn(channels, generator=gen) if bias else None
    leaves = [t.to(device, dtype).requires_grad_() for t in (projection, weight, b) if t is not None]

    def sliced(p):
        return p[..., 1:channels + 1].transpose(0, 1)

    def conv():
        y = causal_conv1d(sliced(leaves[0]), *leaves[1:], *([None] * (not bias)), "silu", backend=backend,
                          sections=sections, history=history)[0]
        assert y.shape[:2] == (2, length - history)
        assert backend != "triton" or sections == 1 or all(y[:, :, i].is_contiguous() for i in range(sections))
        return y.flatten(2)

    got = _value_and_grads(conv, leaves)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    want = _value_and_grads(lambda: causal_conv1d_reference(sliced(wide[0]).contiguous(), *wide[1:],
                                                            *([None] * (not bias)), "silu")[:, history:], wide)
    _assert_matches(got, want, dtype, tol)


@pytest.mark.parametrize("history", [1, 3])
def test_history_rows_are_read_but_have_no_output(history):
    _compare_history("torch", "cpu", torch.float64, FP64, history)
    _compare_history("torch", "cpu", torch.float64, FP64, history, sections=3, bias=False)
    x, w, _ = _tensors(2, 9, 4, torch.float64)
    with pytest.raises(ValueError, match="history 9 must be shorter"):
        causal_conv1d(x, w, history=9)
    with pytest.raises(ValueError, match="no cu_seqlens or states"):
        causal_conv1d(x, w, history=3, output_final_state=True)


@needs_triton_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_KERNEL), (torch.bfloat16, 1e-2)])
def test_triton_kernels_match_the_reference_with_history_rows(dtype, tol):
    """History rows before tiles of outputs that are not multiples of the tiles (70 - H tokens, 129 channels)."""
    for history in (1, 3, 5):
        _compare_history("triton", TRITON_DEVICE, dtype, tol, history)
    _compare_history("triton", TRITON_DEVICE, dtype, tol, 3, sections=3, bias=False, length=150)


@needs_triton_kernels
def test_triton_backend_refuses_states():
    x, w, _ = (t.detach().to(TRITON_DEVICE) for t in _tensors(2, 9, 4, torch.float32))
    with pytest.raises(ValueError, match="takes no states"):
        causal_conv1d(x, w, output_final_state=True, backend="triton")
    with pytest.raises(ValueError, match="batch size 1"):
        causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 9], device=TRITON_DEVICE), backend="triton")


@starts_the_interpreter
def test_triton_kernels_under_the_interpreter():
    """Runs the kernel tests above in a subprocess under Triton's interpreter; they must pass, not skip."""
    summary = run_under_interpreter([__file__, "-k", "triton_kernels_match or triton_backend_refuses"])
    assert re.search(r"\b7 passed", summary) and "skipped" not in summary, summary


def test_document_index_of_each_position():
    """ops.packed.document_index, which gives the triton backend its document starts (and mamba_ssm its seq_idx):
    documents of 3, 1 and 2 positions."""
    from megatron_flash.ops.packed import document_index

    index = document_index(torch.tensor([0, 3, 4, 6]), 6)
    assert index.dtype == torch.int32 and index.tolist() == [0, 0, 0, 1, 2, 2]
