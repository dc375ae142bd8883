"""The delta-rule op: the sequential reference against fla's naive recurrence and a hand-checkable case, and the
torch backend (megatron's chunked torch_chunk_gated_delta_rule with g = 0) against the reference: outputs, final
states and gradients, with initial states, awkward lengths and packed documents. fla's Triton backends run only
on CUDA (test at the end, skipped here)."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_flash.ops.delta_rule import delta_rule, delta_rule_reference, l2norm, resolve_backend

H, K, V = 3, 16, 12


def _inputs(batch, length, dtype=torch.float64, seed=0, with_state=False, states=None, unit_keys=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, H, K, generator=g, dtype=dtype)
    k = torch.randn(batch, length, H, K, generator=g, dtype=dtype)
    if unit_keys:  # without the l2norm the recurrence is only stable for |k| <= 1 (beta < 1)
        k = F.normalize(k, dim=-1)
    v = torch.randn(batch, length, H, V, generator=g, dtype=dtype)
    beta = torch.rand(batch, length, H, generator=g, dtype=dtype)
    h0 = torch.randn(states or batch, H, K, V, generator=g, dtype=dtype) if with_state else None
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, beta, h0)]


def _vjp(o, final, seed=1):
    """A scalar that weights every output and final-state element differently, so gradients are all exercised."""
    g = torch.Generator().manual_seed(seed)  # drawn in fp64 whatever the dtypes, so both sides get the same weights
    loss = (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)).sum()
    if final is not None:
        weights = torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.device, final.dtype)
        loss = loss + (final * weights).sum()
    return loss


def _grads(loss, tensors):
    present = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, present)


def _close(actual, expected, what, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------------------------


def _fla_naive():
    """fla/ops/delta_rule/naive.py loaded by path: it needs only torch and einops, the fla package needs triton."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("flash-linear-attention is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "ops", "delta_rule", "naive.py")
    module_spec = importlib.util.spec_from_file_location("fla_delta_rule_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("length", [70, 129])
def test_reference_matches_fla_naive_recurrence(length):
    # fla's naive recurrence: heads-first [B, H, T, K] layout, scale fixed at K^-0.5, computes in fp32
    naive = _fla_naive()
    q, k, v, beta, h0 = _inputs(2, length, with_state=True, unit_keys=True)
    with torch.no_grad():
        o, final = delta_rule_reference(q, k, v, beta, initial_state=h0, output_final_state=True)
        heads_first = [t.transpose(1, 2).float() for t in (q, k, v)]
        o_fla, final_fla = naive.delta_rule_recurrence(*heads_first, beta.transpose(1, 2).float(),
                                                       initial_state=h0.float(), output_final_state=True)
    _close(o_fla.transpose(1, 2), o, "output", rtol=1e-4, atol=1e-5)
    _close(final_fla, final, "final state", rtol=1e-4, atol=1e-5)


def test_reference_stores_and_recalls_orthonormal_keys():
    # beta = 1 with orthonormal keys writes v_i exactly under k_i: reading with q = k_j / scale returns v_j
    keys = torch.eye(K, dtype=torch.float64)[:5]  # 5 orthonormal keys
    values = torch.randn(5, V, dtype=torch.float64)
    k = keys.view(1, 5, 1, K)
    v = values.view(1, 5, 1, V)
    beta = torch.ones(1, 5, 1, dtype=torch.float64)
    _, state = delta_rule_reference(k, k, v, beta, output_final_state=True)
    torch.testing.assert_close(state[0, 0].t() @ keys.t(), values.t())  # S^T k_j = v_j
    # overwriting key 2 with beta = 1 replaces its value and leaves the others
    new_value = torch.randn(1, 1, 1, V, dtype=torch.float64)
    _, state2 = delta_rule_reference(k[:, 2:3], k[:, 2:3], new_value, beta[:, :1], initial_state=state,
                                     output_final_state=True)
    recalled = state2[0, 0].t() @ keys.t()
    torch.testing.assert_close(recalled[:, 2], new_value.flatten())
    torch.testing.assert_close(recalled[:, [0, 1, 3, 4]], values[[0, 1, 3, 4]].t())


def test_reference_scale_and_output_dtype():
    q, k, v, beta, _ = _inputs(1, 9, dtype=torch.float32, unit_keys=True)
    with torch.no_grad():
        o_default, _ = delta_rule_reference(q, k, v, beta)
        o_scaled, _ = delta_rule_reference(q, k, v, beta, scale=2 * K ** -0.5)
    assert o_default.dtype == torch.float32
    torch.testing.assert_close(o_scaled, 2 * o_default)


# --------------------------------------------------------------------------------------------------------------
# the torch backend against the reference
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [70, 129])
@pytest.mark.parametrize("use_qk_l2norm", [True, False], ids=["l2norm", "raw_qk"])
def test_torch_backend_matches_reference(length, use_qk_l2norm):
    inputs = _inputs(2, length, with_state=True, unit_keys=not use_qk_l2norm)
    q, k, v, beta, h0 = inputs
    o, final = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=use_qk_l2norm,
                          backend="torch")
    grads = _grads(_vjp(o, final), inputs)
    q_ref, k_ref = (l2norm(q), l2norm(k)) if use_qk_l2norm else (q, k)
    o_ref, final_ref = delta_rule_reference(q_ref, k_ref, v, beta, initial_state=h0, output_final_state=True)
    grads_ref = _grads(_vjp(o_ref, final_ref), inputs)
    # megatron's chunked path computes in fp32 whatever the input dtype: compare at fp32 accuracy
    assert o.dtype == torch.float64 and final.dtype == torch.float32
    _close(o, o_ref, "output")
    _close(final, final_ref, "final state")
    for name, got, want in zip(["q", "k", "v", "beta", "initial_state"], grads, grads_ref):
        _close(got, want, f"grad of {name}", rtol=1e-4, atol=1e-5)


def test_torch_backend_without_state_returns_none():
    q, k, v, beta, _ = _inputs(1, 70)
    o, final = delta_rule(q, k, v, beta, backend="torch")
    assert final is None and o.shape == (1, 70, H, V)
    o_ref, _ = delta_rule_reference(l2norm(q), l2norm(k), v, beta)
    _close(o, o_ref, "output")


def test_torch_backend_packed_documents_are_independent():
    lengths = [29, 1, 40, 65]  # a 1-token document and one crossing the 64-token chunk
    cu_seqlens = torch.tensor([0, 29, 30, 70, 135], dtype=torch.int32)
    inputs = _inputs(1, sum(lengths), with_state=True, states=len(lengths))
    q, k, v, beta, h0 = inputs
    o, final = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                          backend="torch")
    grads = _grads(_vjp(o, final), inputs)

    # each document on its own, from its own initial state
    outs, finals = [], []
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        part = [t[:, start:end] for t in (q, k, v, beta)]
        o_n, f_n = delta_rule_reference(l2norm(part[0]), l2norm(part[1]), part[2], part[3],
                                        initial_state=h0[n:n + 1], output_final_state=True)
        outs.append(o_n)
        finals.append(f_n)
    o_ref, final_ref = torch.cat(outs, dim=1), torch.cat(finals)
    grads_ref = _grads(_vjp(o_ref, final_ref), inputs)
    _close(o, o_ref, "output")
    _close(final, final_ref, "final state")
    for name, got, want in zip(["q", "k", "v", "beta", "initial_state"], grads, grads_ref):
        _close(got, want, f"grad of {name}", rtol=1e-4, atol=1e-5)

    # the reference's own cu_seqlens path agrees with the per-document loop
    with torch.no_grad():
        o_packed_ref, final_packed_ref = delta_rule_reference(l2norm(q), l2norm(k), v, beta, initial_state=h0,
                                                              output_final_state=True, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(o_packed_ref, o_ref.detach())
    torch.testing.assert_close(final_packed_ref, final_ref.detach())


def test_errors_are_clear():
    q, k, v, beta, h0 = (t.detach() if t is not None else None for t in _inputs(2, 8, with_state=True))
    with pytest.raises(ValueError, match="unknown delta-rule backend 'cuda'"):
        delta_rule(q, k, v, beta, backend="cuda")
    with pytest.raises(ValueError, match=r"q must be \[B, T, H, K\]"):
        delta_rule(q[0], k[0], v[0], beta[0])
    with pytest.raises(ValueError, match="v must be"):
        delta_rule(q, k, v[:, :5], beta)
    with pytest.raises(ValueError, match="beta must be"):
        delta_rule(q, k, v, beta[..., None])
    with pytest.raises(ValueError, match="initial_state must be"):
        delta_rule(q, k, v, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="batch size 1"):
        delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="must rise from 0 to the sequence length 8"):
        delta_rule(q[:1], k[:1], v[:1], beta[:1], cu_seqlens=torch.tensor([0, 5, 7]), backend="torch")
    with pytest.raises((ValueError, RuntimeError), match="CUDA|flash-linear-attention"):
        delta_rule(q, k, v, beta, backend="fla")
    assert resolve_backend("auto", q) == "torch"


# --------------------------------------------------------------------------------------------------------------
# fla's kernels (CUDA only)
# --------------------------------------------------------------------------------------------------------------


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's delta-rule kernels are Triton: CUDA only")
@pytest.mark.parametrize("backend", ["fla", "fla_recurrent"])
def test_fla_backends_match_reference_on_cuda(backend):
    pytest.importorskip("fla")
    cu_seqlens = torch.tensor([0, 29, 30, 129], dtype=torch.int32, device="cuda")
    q, k, v, beta, h0 = (t.detach().cuda() for t in _inputs(1, 129, dtype=torch.float32, with_state=True,
                                                               states=3))
    beta = beta.sigmoid()
    bf16 = [t.bfloat16().requires_grad_() for t in (q, k, v, beta)]
    h0 = h0.requires_grad_()
    o, final = delta_rule(*bf16, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend)
    grads = _grads(_vjp(o.float(), final), bf16 + [h0])
    fp32 = [t.detach().float().requires_grad_() for t in bf16]
    h0_ref = h0.detach().clone().requires_grad_()
    o_ref, final_ref = delta_rule_reference(l2norm(fp32[0]), l2norm(fp32[1]), *fp32[2:], initial_state=h0_ref,
                                            output_final_state=True, cu_seqlens=cu_seqlens)
    grads_ref = _grads(_vjp(o_ref, final_ref), fp32 + [h0_ref])
    assert _rel(o, o_ref) < 2e-2 and _rel(final, final_ref) < 2e-2
    for name, got, want in zip(["q", "k", "v", "beta", "initial_state"], grads, grads_ref):
        assert _rel(got, want) < 3e-2, f"grad of {name}: relative error {_rel(got, want):.3g}"
