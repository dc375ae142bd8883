"""The (ungated) delta rule: DeltaNet's linear-attention recurrence.

Per head, with a state S of shape [K, V]:

    S_t = S_{t-1} + beta_t * k_t (v_t - S_{t-1}^T k_t)^T
    o_t = S_t^T (scale * q_t)                       scale = K ** -0.5 by default

Layout follows fla: q, k are [B, T, H, K], v is [B, T, H, V], beta is [B, T, H]; initial and final states are
[N, H, K, V] (N = B, or the number of documents with ``cu_seqlens``). With ``cu_seqlens`` (B must be 1) each
document starts from zero (or from its row of ``initial_state``) and gets its own final state.

Backends of :func:`delta_rule`:

* ``fla``: fla's chunked Triton kernel (``chunk_delta_rule``), CUDA tensors in bf16/fp16 (it refuses fp32);
* ``fla_recurrent``: fla's fused recurrent kernel, for decoding and very short sequences;
* ``torch``: megatron's pure-PyTorch chunked ``torch_chunk_gated_delta_rule`` with a zero gate (any device,
  computes in fp32);
* ``auto``: ``fla`` for bf16/fp16 CUDA tensors when fla imports, else ``torch``.

:func:`delta_rule_reference` (a sequential loop) is the definition all backends are tested against.
"""

from __future__ import annotations

import torch

try:  # fla's Triton kernels: used for CUDA tensors when installed
    from fla.ops.delta_rule import chunk_delta_rule as _fla_chunk_delta_rule
    from fla.ops.delta_rule import fused_recurrent_delta_rule as _fla_recurrent_delta_rule
except ImportError:  # pragma: no cover - fla is an optional (gpu) dependency
    _fla_chunk_delta_rule = _fla_recurrent_delta_rule = None

BACKENDS = ("auto", "fla", "fla_recurrent", "torch")
L2NORM_EPS = 1e-6  # fla's l2norm (and use_qk_l2norm_in_kernel): x / sqrt(sum(x^2) + 1e-6)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """fla's per-head L2 normalization over the last dim, computed in fp32 (fp64 stays fp64), returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def _documents(cu_seqlens, batch: int, length: int) -> list[tuple[int, int]] | None:
    """[(start, end)] of each packed document, or None without cu_seqlens."""
    if cu_seqlens is None:
        return None
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed documents), got batch {batch}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != length or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the sequence length {length}")
    return list(zip(bounds[:-1], bounds[1:]))


def _check_shapes(q, k, v, beta, initial_state, cu_seqlens) -> None:
    """Shape checks that need no device sync (cu_seqlens' values are checked where they are read)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    batch, _, heads, key_dim = q.shape
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed documents), got batch {batch}")
    if initial_state is not None:
        sequences = cu_seqlens.numel() - 1 if cu_seqlens is not None else batch
        expected = (sequences, heads, key_dim, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be [N, H, K, V] = {expected}, got {tuple(initial_state.shape)}")


# --------------------------------------------------------------------------------------------------------------
# The definition
# --------------------------------------------------------------------------------------------------------------


def delta_rule_reference(q, k, v, beta, initial_state=None, output_final_state=False, scale=None,
                         cu_seqlens=None):
    """Sequential loop over time: the definition. fp32 accumulation (fp64 for fp64 inputs); q, k used as given.

    Returns (o [B, T, H, V] in v's dtype, final_state [N, H, K, V] in the accumulation dtype, or None).
    Differentiable (autograd through the loop), so tests can compare gradients too.
    """
    _check_shapes(q, k, v, beta, initial_state, cu_seqlens)
    batch, length, heads, key_dim = q.shape
    value_dim, out_dtype = v.shape[-1], v.dtype
    docs = _documents(cu_seqlens, batch, length)
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = key_dim ** -0.5 if scale is None else scale
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    # (batch row, start, end) of each independent sequence
    sequences = [(0, s, e) for s, e in docs] if docs is not None else [(b, 0, length) for b in range(batch)]
    outputs, finals = [], []
    for n, (row, start, end) in enumerate(sequences):
        state = (initial_state[n].to(acc) if initial_state is not None
                 else q.new_zeros(heads, key_dim, value_dim))  # [H, K, V]
        steps = []
        for t in range(start, end):
            k_t, v_t, q_t, beta_t = k[row, t], v[row, t], q[row, t], beta[row, t]  # [H, K], [H, V], [H, K], [H]
            predicted = torch.einsum("hkv,hk->hv", state, k_t)
            state = state + torch.einsum("hk,hv->hkv", k_t, beta_t[:, None] * (v_t - predicted))
            steps.append(torch.einsum("hkv,hk->hv", state, q_t * scale))
        outputs.append(torch.stack(steps) if steps else v.new_zeros(0, heads, value_dim))
        finals.append(state)
    if docs is not None:
        o = torch.cat(outputs).unsqueeze(0)
    else:
        o = torch.stack(outputs)
    return o.to(out_dtype), (torch.stack(finals) if output_final_state else None)


# --------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------


def _torch_delta_rule(q, k, v, beta, initial_state, output_final_state, docs):
    """megatron's chunked PyTorch gated delta rule with g = 0 (no decay), one call per packed document.

    It takes fla's [B, T, H, *] layout (transposes to heads-first inside), pads T to its chunk size with zero
    k/beta (which leave the state unchanged), always computes in fp32 and returns o in q's dtype, the final state
    in fp32.
    """
    from megatron.core.ssm.gated_delta_net import torch_chunk_gated_delta_rule

    def run(q_, k_, v_, beta_, state):
        no_decay = torch.zeros_like(beta_, dtype=torch.float32)
        return torch_chunk_gated_delta_rule(q_, k_, v_, g=no_decay, beta=beta_, initial_state=state,
                                            output_final_state=output_final_state, use_qk_l2norm_in_kernel=False)

    if docs is None:
        return run(q, k, v, beta, initial_state)
    outputs, finals = [], []
    for n, (start, end) in enumerate(docs):
        state = initial_state[n:n + 1] if initial_state is not None else None
        o, final = run(q[:, start:end], k[:, start:end], v[:, start:end], beta[:, start:end], state)
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, dim=1), (torch.cat(finals) if output_final_state else None)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend 'auto' stands for on this tensor; validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown delta-rule backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    fla_ok = _fla_chunk_delta_rule is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    return "fla" if fla_ok else "torch"


def delta_rule(q, k, v, beta, *, initial_state=None, output_final_state=False, cu_seqlens=None,
               use_qk_l2norm=True, backend="auto"):
    """The delta rule with scale K^-0.5. Returns (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 or None).

    ``use_qk_l2norm`` L2-normalizes q and k per head first (DeltaNet's default; fla fuses it into its kernels).
    """
    _check_shapes(q, k, v, beta, initial_state, cu_seqlens)
    backend = resolve_backend(backend, q)
    if backend in ("fla", "fla_recurrent"):
        if _fla_chunk_delta_rule is None:
            raise RuntimeError(f"delta-rule backend {backend!r} needs flash-linear-attention (pip install '.[gpu]')")
        if not q.is_cuda:
            raise ValueError(f"delta-rule backend {backend!r} runs fla's Triton kernels and needs CUDA tensors; "
                             f"use backend='torch' on {q.device}")
        if backend == "fla" and q.dtype == torch.float32:
            raise ValueError("fla's chunk_delta_rule refuses fp32 inputs: use bf16/fp16 or backend='torch'")
        kernel = _fla_chunk_delta_rule if backend == "fla" else _fla_recurrent_delta_rule
        return kernel(q=q, k=k, v=v, beta=beta, initial_state=initial_state, output_final_state=output_final_state,
                      use_qk_l2norm_in_kernel=use_qk_l2norm,
                      cu_seqlens=cu_seqlens.long() if cu_seqlens is not None else None)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    docs = _documents(cu_seqlens, q.shape[0], q.shape[1])
    return _torch_delta_rule(q, k, v, beta, initial_state, output_final_state, docs)
