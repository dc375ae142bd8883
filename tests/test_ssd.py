"""The chunked PyTorch SSD (ops.ssd) against the sequential recurrence: outputs, final states and gradients, with
initial states, lengths that are not a multiple of the chunk, groups, and packed documents."""

import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_flash.ops import ssd
from megatron_flash.ops.ssd import mamba_ssm_available, resolve_backend, ssd_reference, ssd_scan
from megatron_flash.testing import OpTrace, relative_error

MATMULS = ("bmm.default", "mm.default")


def _inputs(batch, length, heads, head_dim, groups, state_dim, *, dtype=torch.float64, seed=0, sequences=None,
            with_d=True, with_initial=False):
    """Realistic magnitudes: dt = softplus(.) around 0.01..1, A in [-16, -1] (mamba's A_log init range)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    tensors = dict(
        x=rand(batch, length, heads, head_dim),
        dt=F.softplus(rand(batch, length, heads) - 2.0),
        A=-torch.empty(heads, dtype=dtype).uniform_(1.0, 16.0, generator=g),
        Bm=rand(batch, length, groups, state_dim),
        Cm=rand(batch, length, groups, state_dim),
        D=rand(heads) if with_d else None,
        initial_state=rand(sequences or batch, heads, head_dim, state_dim) if with_initial else None,
    )
    return {k: (v.requires_grad_() if v is not None else None) for k, v in tensors.items()}


def _outputs_and_grads(fn, tensors, with_final=True, **kwargs):
    """Run fn, backprop fixed random cotangents through y and (with_final) the final state; return y, final (or
    None), and all grads."""
    for t in tensors.values():
        if t is not None:
            t.grad = None
    y, final = fn(tensors["x"], tensors["dt"], tensors["A"], tensors["Bm"], tensors["Cm"], tensors["D"],
                  initial_state=tensors["initial_state"], output_final_state=with_final, **kwargs)
    g = torch.Generator().manual_seed(123)
    cotangent = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)  # noqa: E731 - same in any dtype
    loss = (y * cotangent(y)).sum() + ((final * cotangent(final)).sum() if with_final else 0)
    loss.backward()
    grads = {k: t.grad.clone() for k, t in tensors.items() if t is not None}
    return y.detach(), (final.detach() if with_final else None), grads


def _bf16_rounded(t64, device="cpu"):
    """Round x, B, C of fp64 inputs to bf16 in place (the rounding is part of the input: the fp64 reference then
    sees the same values) and return the inputs as the mixer feeds them: x, B, C bf16, the rest fp32, on device."""
    with torch.no_grad():
        for name in ("x", "Bm", "Cm"):
            t64[name].copy_(t64[name].bfloat16().double())
    return {k: (v.detach().to(device, torch.bfloat16 if k in ("x", "Bm", "Cm") else torch.float32).requires_grad_()
                if v is not None else None) for k, v in t64.items()}


def _relative_errors(got, want) -> dict:
    """||got - want|| / ||want|| of y, the final states and every gradient (got may live on another device)."""
    (y, final, grads), (y_ref, final_ref, grads_ref) = got, want
    finals = {} if final is None else {"final": relative_error(final.cpu(), final_ref)}
    return {"y": relative_error(y.cpu(), y_ref), **finals,
            **{f"d{k}": relative_error(g.cpu(), grads_ref[k]) for k, g in grads.items()}}


def _assert_match(got, want, rtol, atol):
    (y, final, grads), (y_ref, final_ref, grads_ref) = got, want
    torch.testing.assert_close(y, y_ref.to(y.dtype), rtol=rtol, atol=atol, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(final, final_ref.to(final.dtype), rtol=rtol, atol=atol, msg=lambda m: f"final: {m}")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name].to(grad.dtype), rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("batch,length,heads,head_dim,groups,state_dim,chunk,with_initial,with_d", [
    (2, 70, 4, 8, 2, 6, 16, False, True),   # T not a multiple of the chunk, 2 groups
    (1, 129, 4, 8, 1, 6, 32, True, True),   # one group (the released model), an initial state
    (2, 64, 2, 4, 1, 5, 16, True, False),   # T a multiple of the chunk, no D
    (1, 5, 2, 4, 1, 3, 64, False, True),    # shorter than one chunk
])
def test_torch_matches_reference(batch, length, heads, head_dim, groups, state_dim, chunk, with_initial, with_d):
    tensors = _inputs(batch, length, heads, head_dim, groups, state_dim, with_initial=with_initial, with_d=with_d)
    want = _outputs_and_grads(ssd_reference, tensors)
    got = _outputs_and_grads(ssd_scan, tensors, chunk_size=chunk, backend="torch")
    _assert_match(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("with_initial", [False, True])
def test_packed_documents_match_reference(with_initial):
    # an empty document, documents shorter and longer than a chunk, one ending mid-chunk
    cu_seqlens = torch.tensor([0, 5, 5, 60, 61, 129])
    tensors = _inputs(1, 129, 4, 8, 1, 6, sequences=5, with_initial=with_initial)
    want = _outputs_and_grads(ssd_reference, tensors, cu_seqlens=cu_seqlens)
    got = _outputs_and_grads(ssd_scan, tensors, chunk_size=16, cu_seqlens=cu_seqlens, backend="torch")
    _assert_match(got, want, rtol=1e-9, atol=1e-10)


def test_packed_documents_equal_separate_runs():
    """The reference restarts per document by construction; check that against independent single-sequence runs."""
    cu_seqlens = [0, 33, 70, 100]
    t = _inputs(1, 100, 4, 8, 1, 6, sequences=3, with_initial=True)
    y, final = ssd_scan(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], t["D"], chunk_size=16,
                        initial_state=t["initial_state"], output_final_state=True,
                        cu_seqlens=torch.tensor(cu_seqlens), backend="torch")
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        piece = lambda v: v[:, start:end]  # noqa: E731
        y_doc, final_doc = ssd_reference(piece(t["x"]), piece(t["dt"]), t["A"], piece(t["Bm"]), piece(t["Cm"]),
                                         t["D"], initial_state=t["initial_state"][n:n + 1], output_final_state=True)
        torch.testing.assert_close(y[:, start:end], y_doc)
        torch.testing.assert_close(final[n:n + 1], final_doc)


def test_fp32_is_exact_to_rounding():
    """fp32 inputs vs the fp64 recurrence at a realistic size: the chunked form adds no error beyond fp32 rounding."""
    t64 = _inputs(2, 256, 4, 16, 1, 16, with_initial=True)
    t32 = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in t64.items()}
    want = _outputs_and_grads(ssd_reference, t64)
    got = _outputs_and_grads(ssd_scan, t32, chunk_size=64, backend="torch")
    assert got[0].dtype == torch.float32
    _assert_match(got, want, rtol=2e-5, atol=2e-5)


def test_chunk_size_does_not_change_the_result():
    t = _inputs(1, 50, 2, 4, 1, 3, with_initial=True)
    runs = [ssd_scan(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], t["D"], chunk_size=c, backend="torch",
                     initial_state=t["initial_state"], output_final_state=True) for c in (1, 7, 64, 500)]
    for y, final in runs[1:]:
        torch.testing.assert_close(y, runs[0][0])
        torch.testing.assert_close(final, runs[0][1])


def test_zero_dt_keeps_state_and_bf16_output_dtype():
    """dt = 0 neither decays nor feeds the state (what chunk padding relies on); outputs keep the input dtype."""
    t = _inputs(1, 20, 2, 4, 1, 3, with_initial=True, dtype=torch.float32)
    with torch.no_grad():
        t["dt"].zero_()
    y, final = ssd_scan(t["x"].bfloat16(), t["dt"], t["A"], t["Bm"], t["Cm"], None, chunk_size=8, backend="torch",
                        initial_state=t["initial_state"], output_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    torch.testing.assert_close(final, t["initial_state"].detach())


def test_bad_inputs_are_rejected():
    t = {k: (v.detach() if v is not None else None) for k, v in _inputs(2, 10, 4, 8, 2, 6).items()}
    args = (t["x"], t["dt"], t["A"], t["Bm"], t["Cm"])
    with pytest.raises(ValueError, match="unknown SSD backend"):
        ssd_scan(*args, backend="cuda")
    with pytest.raises(ValueError, match="dt must be"):
        ssd_scan(t["x"], t["dt"][:, :5], *args[2:])
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd_scan(*args[:3], t["Bm"][:, :, :1].expand(-1, -1, 3, -1), t["Cm"][:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="batch size 1"):
        ssd_scan(*args, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="must rise from 0"):
        ssd_scan(*(a[:1] for a in args[:2]), args[2], *(a[:1] for a in args[3:]), cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd_scan(*args, initial_state=torch.zeros(1, 4, 8, 6))
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan(*args, chunk_size=0)


def test_backend_resolution_and_missing_mamba_ssm():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("fla", torch.device("cpu")) == "fla"
    assert resolve_backend("auto", torch.device("cuda")) == ("mamba_ssm" if mamba_ssm_available() else "torch_compile")
    if not mamba_ssm_available():
        t = {k: (v.detach() if v is not None else None) for k, v in _inputs(1, 8, 2, 4, 1, 3).items()}
        with pytest.raises(RuntimeError, match="needs mamba_ssm"):
            ssd_scan(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], backend="mamba_ssm")


def test_mamba_ssm_loads_without_its_cuda_extension(tmp_path, monkeypatch):
    """A mamba_ssm whose package __init__ cannot import (no CUDA build) still yields its Triton SSD, and the package
    stays unimportable for everyone else. The package here is a stand-in on disk with the real module path; the
    GPU test below runs the real one."""
    package = tmp_path / "mamba_ssm"
    (package / "ops" / "triton").mkdir(parents=True)
    (package / "__init__.py").write_text("import selective_scan_cuda_is_not_built\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "triton" / "__init__.py").write_text("")
    (package / "ops" / "triton" / "ssd_combined.py").write_text(
        "from mamba_ssm.ops.triton import helper\nmamba_chunk_scan_combined = helper.scan\n")
    (package / "ops" / "triton" / "helper.py").write_text("def scan(*args):\n    return 'scanned'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    ssd._mamba_chunk_scan_combined.cache_clear()
    try:
        assert ssd.mamba_ssm_available()
        assert ssd._mamba_chunk_scan_combined()() == "scanned"
        with pytest.raises(ImportError, match="selective_scan_cuda_is_not_built"):
            import mamba_ssm  # noqa: F401
    finally:
        for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
            del sys.modules[name]
        ssd._mamba_chunk_scan_combined.cache_clear()


def test_matches_mamba_ssm_minimal_reference():
    """mamba_ssm's own pure-torch ssd_minimal, where mamba_ssm is installed (with or without its CUDA build)."""
    minimal = ssd.import_mamba_ssm_module("mamba_ssm.modules.ssd_minimal")
    if minimal is None:
        pytest.skip("mamba_ssm is not installed")
    t = {k: (v.detach().float() if v is not None else None)
         for k, v in _inputs(2, 128, 4, 8, 1, 6, with_d=False, with_initial=True).items()}
    heads = t["x"].shape[2]
    y_ref, final_ref = minimal.ssd_minimal_discrete(
        t["x"] * t["dt"][..., None], t["A"] * t["dt"], t["Bm"].expand(-1, -1, heads, -1),
        t["Cm"].expand(-1, -1, heads, -1), block_len=32, initial_states=t["initial_state"][:, None])
    y, final = ssd_scan(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], chunk_size=32, backend="torch",
                        initial_state=t["initial_state"], output_final_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="torch.compile of the SSD takes ~60 s on this 2-core CPU; benchmarks/gpu_check_mamba2.py "
                           "checks the torch_compile backend on the GPU")
def test_torch_compile_matches_reference():
    t = _inputs(1, 129, 4, 8, 1, 6, with_initial=True, dtype=torch.float32)
    t = {k: (v.detach().cuda().requires_grad_() if v is not None else None) for k, v in t.items()}
    t64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in t.items()}
    _assert_match(_outputs_and_grads(ssd_scan, t, chunk_size=32, backend="torch_compile"),
                  _outputs_and_grads(ssd_reference, t64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cu_seqlens", [None, [0, 37, 100, 161]])
def test_bf16_inputs_contract_in_bf16_within_bf16_error(cu_seqlens):
    """x, B, C in bf16 (as the mixer feeds them): every contraction, forward and backward, takes bf16 operands, and
    y, the final states and all gradients stay within bf16 error of the fp64 recurrence on the same rounded values;
    fp32 inputs keep fp32 contractions."""
    batch = 1 if cu_seqlens else 2
    cu = torch.tensor(cu_seqlens) if cu_seqlens else None
    t64 = _inputs(batch, 161, 4, 16, 1, 32, with_initial=True, sequences=3 if cu_seqlens else None)
    half = _bf16_rounded(t64)
    want = _outputs_and_grads(ssd_reference, t64, cu_seqlens=cu)
    with OpTrace() as trace:
        got = _outputs_and_grads(ssd_scan, half, chunk_size=32, cu_seqlens=cu, backend="torch")
    assert trace.tensor_dtypes(*MATMULS) == {torch.bfloat16}
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    errors = _relative_errors(got, want)
    assert max(errors.values()) < 1.5e-2, errors
    fp32 = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in t64.items()}
    with OpTrace() as trace:
        _outputs_and_grads(ssd_scan, fp32, chunk_size=32, cu_seqlens=cu, backend="torch")
    assert trace.tensor_dtypes(*MATMULS) == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the SSD is checked on the GPU")
def test_torch_compile_bf16_within_bf16_error():
    t64 = _inputs(2, 161, 4, 16, 1, 32, with_initial=True)
    half = _bf16_rounded(t64, "cuda")
    errors = _relative_errors(_outputs_and_grads(ssd_scan, half, chunk_size=32, backend="torch_compile"),
                              _outputs_and_grads(ssd_reference, t64))
    assert max(errors.values()) < 1.5e-2, errors


def test_fla_training_is_refused_only_where_fla_640_applies(monkeypatch):
    """fla #640 (Hopper, 3.4 <= triton < 3.7.1) miscompiles key blocks of 64: states of 64 or less are refused for
    training there, before any kernel runs; larger states (fla's block 128) and other machines are not."""
    from megatron_flash.ops import ssd

    t = _inputs(1, 8, 2, 4, 1, 64, dtype=torch.float32)
    monkeypatch.setattr(ssd, "_fla_has_640_bug", lambda: True)
    assert ssd.fla_backward_unsupported_reason(128) is None
    assert "#640" in ssd.fla_backward_unsupported_reason(64)
    with pytest.raises(RuntimeError, match="cannot train here.*#640"):
        ssd_scan(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], t["D"], backend="fla")
    monkeypatch.setattr(ssd, "_fla_has_640_bug", lambda: False)
    assert ssd.fla_backward_unsupported_reason(64) is None


def test_fla_640_refusal_is_restored_after_an_error():
    pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    from fla.ops.common import chunk_o
    from megatron_flash.ops.ssd import _fla_640_refusal_lifted

    before = chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = False
    try:
        with pytest.raises(ValueError), _fla_640_refusal_lifted():
            assert chunk_o.TRITON_ABOVE_3_7_1 is True
            raise ValueError
        assert chunk_o.TRITON_ABOVE_3_7_1 is False
    finally:
        chunk_o.TRITON_ABOVE_3_7_1 = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need CUDA")
@pytest.mark.parametrize("cu_seqlens", [None, [0, 130, 131, 333]])
def test_fla_trains_within_bf16_error(cu_seqlens):
    """fla's chunk kernels at the presets' head dim 64 and state 128 (on Hopper with triton < 3.7.1: fla's backward
    with #640's refusal lifted), forward and backward, against the fp64 recurrence on the same bf16-rounded values."""
    pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    batch = 1 if cu_seqlens else 2
    cu = torch.tensor(cu_seqlens) if cu_seqlens else None
    t64 = _inputs(batch, 333, 4, 64, 1, 128, with_initial=True, sequences=3 if cu_seqlens else None)
    half = _bf16_rounded(t64, "cuda")
    errors = _relative_errors(
        _outputs_and_grads(ssd_scan, half, cu_seqlens=None if cu is None else cu.cuda(), backend="fla"),
        _outputs_and_grads(ssd_reference, t64, cu_seqlens=cu))
    assert max(errors.values()) < 1.5e-2, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba_ssm's Triton kernels need CUDA")
@pytest.mark.parametrize("cu_seqlens", [None, [0, 130, 131, 333]])
def test_mamba_ssm_trains_within_bf16_error(cu_seqlens):
    """mamba_ssm's mamba_chunk_scan_combined (the `auto` backend where it is installed) at the presets' head dim 64
    and state 128, forward and backward, against the fp64 recurrence on the same bf16-rounded values. Packed
    documents: no initial or final states (mamba_ssm has no per-document initial states, and its per-document
    final states have no backward)."""
    if not mamba_ssm_available():
        pytest.skip("mamba_ssm is not installed")
    packed = cu_seqlens is not None
    cu = torch.tensor(cu_seqlens) if packed else None
    t64 = _inputs(1 if packed else 2, 333, 4, 64, 1, 128, with_initial=not packed)
    half = _bf16_rounded(t64, "cuda")
    errors = _relative_errors(
        _outputs_and_grads(ssd_scan, half, with_final=not packed, cu_seqlens=None if cu is None else cu.cuda(),
                           backend="mamba_ssm"),
        _outputs_and_grads(ssd_reference, t64, with_final=not packed, cu_seqlens=cu))
    assert max(errors.values()) < 1.5e-2, errors
