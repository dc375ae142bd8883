"""The SSD scan of Mamba2 (state space duality), with selectable backends.

Shapes: x [B, T, H, P], dt [B, T, H] (already ``softplus(dt + dt_bias)``), A [H] (negative), Bm / Cm [B, T, G, N]
with head h reading group ``h // (H / G)``, D [H] or None; states [N_seq, H, P, N]. Per head:

    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T          (S_t: [P, N])
    y_t = S_t C_t + D x_t

:func:`ssd_reference` is that loop, the definition every backend is tested against. :func:`ssd_scan` picks one of:

* ``mamba_ssm``: ``mamba_chunk_scan_combined`` (Triton), where mamba_ssm is installed, with or without its CUDA
  extensions (the SSD does not use them);
* ``fla``: fla's ``chunk_simple_gla`` with q = C, k = B, v = x dt, log-gate g = A dt (SSD is scalar-decay gated
  linear attention). On Hopper with 3.4 <= triton < 3.7.1 fla refuses the backward of every gated chunk kernel
  (fla issue #640), but the miscompile bisected there needs key blocks of 64 in ``chunk_bwd_dqkwg``; fla tiles
  keys by min(next_pow2(N), 128) on Hopper, so a state of more than 64 (the presets' 128) never takes that path
  and this backend runs fla's backward with the refusal lifted (the GPU tests check it against the recurrence).
  A state of 64 or less raises before the forward when a gradient could be requested (an H200 probe at 64 showed
  no error, but the issue's failing case, two key blocks of 64, was not reproduced: refused to be safe). On one
  group it is no faster than ``torch_compile`` (fla's kernels are per head: B and C are copied to every head);
* ``torch``: the chunked SSD of the Mamba2 paper's ``ssd_minimal`` (batched matmuls inside chunks of
  ``chunk_size`` tokens, a [chunks x chunks] decay matrix between them), any device. Decays, sums and states are
  fp32 (fp64 for fp64 inputs); the contractions take bf16/fp16 operands when x, B and C come in that dtype, as
  mamba_ssm's kernels do (tensor cores, fp32 accumulation inside each matmul), else the fp32/fp64 ones;
* ``torch_compile``: the same function under ``torch.compile``, for GPUs without mamba_ssm;
* ``auto``: mamba_ssm on CUDA where it is installed, else torch_compile on CUDA, else torch.

Packed documents (``cu_seqlens``, B = 1) restart the state at every document. The torch backends do them in one
pass rather than a loop over documents: each document is padded to whole chunks (padding has dt = 0, which neither
decays nor feeds the state), so no chunk straddles two documents, and the chunk-to-chunk decay matrix is masked to
pairs of chunks of the same document. One graph for any number of documents, no recompilation per length.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_flash.ops import compile as compile_ops
from megatron_flash.ops.packed import document_index

BACKENDS = ("auto", "mamba_ssm", "fla", "torch", "torch_compile")


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(x, dt, A, Bm, Cm, D, initial_state, cu_seqlens) -> list[tuple[int, int]]:
    """Validate shapes; return the document bounds ([(0, T)] per batch row without cu_seqlens)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, time, heads, head_dim], got shape {tuple(x.shape)}")
    batch, length, heads, head_dim = x.shape
    if length == 0:
        raise ValueError("x has no time steps")
    if dt.shape != (batch, length, heads):
        raise ValueError(f"dt must be [batch, time, heads] = {(batch, length, heads)}, got {tuple(dt.shape)}")
    if A.shape != (heads,):
        raise ValueError(f"A must be [heads] = ({heads},), got {tuple(A.shape)}")
    if Bm.dim() != 4 or Bm.shape[:2] != (batch, length) or Cm.shape != Bm.shape:
        raise ValueError(f"B and C must both be [batch, time, groups, state_dim] with batch, time = {(batch, length)}, "
                         f"got {tuple(Bm.shape)} and {tuple(Cm.shape)}")
    groups, state_dim = Bm.shape[2:]
    if heads % groups != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of groups ({groups})")
    if D is not None and D.shape != (heads,):
        raise ValueError(f"D must be [heads] = ({heads},), got {tuple(D.shape)}")
    if cu_seqlens is None:
        bounds = [(0, length)]
        sequences = batch
    else:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (packed documents), got batch {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        edges = cu_seqlens.tolist()
        if len(edges) < 2 or edges[0] != 0 or edges[-1] != length or any(b < a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"cu_seqlens {edges} must rise from 0 to the sequence length {length}")
        bounds = list(zip(edges[:-1], edges[1:]))
        sequences = len(bounds)
    if initial_state is not None and initial_state.shape != (sequences, heads, head_dim, state_dim):
        raise ValueError(f"initial_state must be [sequences, heads, head_dim, state_dim] = "
                         f"{(sequences, heads, head_dim, state_dim)}, got {tuple(initial_state.shape)}")
    return bounds


def _compute_dtype(*tensors) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the torch backends accumulate in at least fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _matmul_dtype(x, Bm, Cm, compute_dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of the chunked SSD's contractions: x's when x, B and C share a 16-bit dtype (their values
    are already rounded to it, and 16-bit matmuls accumulate in fp32), else the compute dtype."""
    half = x.dtype in (torch.bfloat16, torch.float16) and Bm.dtype == Cm.dtype == x.dtype
    return x.dtype if half else compute_dtype


# --------------------------------------------------------------------------------------------------------------
# The definition
# --------------------------------------------------------------------------------------------------------------


def ssd_reference(x, dt, A, Bm, Cm, D=None, *, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Sequential recurrence, one step at a time, in fp32 (fp64 for fp64 inputs). Returns (y, final_state)."""
    bounds = _check_inputs(x, dt, A, Bm, Cm, D, initial_state, cu_seqlens)
    batch, length, heads, head_dim = x.shape
    groups, state_dim = Bm.shape[2:]
    dtype = _compute_dtype(x, dt, A, Bm, Cm, D, initial_state)
    group_of_head = torch.arange(heads, device=x.device) // (heads // groups)
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    Bh, Ch = Bm.to(dtype)[:, :, group_of_head], Cm.to(dtype)[:, :, group_of_head]  # [B, T, H, N]
    y = torch.zeros_like(x)
    finals = []
    sequences = [(row, start, end) for row in range(batch) for start, end in bounds]
    for n, (row, start, end) in enumerate(sequences):
        state = (initial_state[n].to(dtype) if initial_state is not None
                 else x.new_zeros(heads, head_dim, state_dim))
        for t in range(start, end):
            decay = torch.exp(dt[row, t] * A)[:, None, None]  # [H, 1, 1]
            state = decay * state + (dt[row, t, :, None] * x[row, t])[:, :, None] * Bh[row, t, :, None, :]
            y[row, t] = (state * Ch[row, t, :, None, :]).sum(-1)
        finals.append(state)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x
    return y, (torch.stack(finals) if output_final_state else None)


# --------------------------------------------------------------------------------------------------------------
# torch / torch_compile: chunked SSD
# --------------------------------------------------------------------------------------------------------------


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L] with out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal.

    Summing the masked entries (rather than subtracting two cumulative sums) keeps small decays exact when the
    cumulative log-decay is large, as in ssd_minimal's stable segsum.
    """
    length = a.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=a.device)
    terms = a[..., :, None].expand(*a.shape, length).masked_fill(~torch.tril(ones, -1), 0)
    return terms.cumsum(dim=-2).masked_fill(~torch.tril(ones), float("-inf"))


@dataclass
class _ChunkLayout:
    """Where tokens sit in the chunk-padded sequence and which document each chunk belongs to.

    Without cu_seqlens every batch row is one sequence (``docs`` = 1 per row); with cu_seqlens (batch 1) each
    document is padded to whole chunks and ``docs`` = the number of documents.
    """

    padded_length: int
    token_slots: Optional[torch.Tensor]  # [T] position of each token in the padded sequence; None = pad at the end
    chunk_doc: torch.Tensor  # [chunks] document of each chunk
    doc_first_chunk: torch.Tensor  # [docs]
    doc_last_chunk: torch.Tensor  # [docs]
    doc_is_empty: Optional[torch.Tensor]  # [docs] bool, None when no document is empty


def _chunk_layout(bounds, chunk_size: int, packed: bool, device) -> _ChunkLayout:
    if not packed:
        (start, end), = bounds
        chunks = -(-(end - start) // chunk_size)
        zeros = torch.zeros(chunks, dtype=torch.long, device=device)
        return _ChunkLayout(chunks * chunk_size, None, zeros, torch.zeros(1, dtype=torch.long, device=device),
                            torch.full((1,), chunks - 1, dtype=torch.long, device=device), None)
    slots, chunk_doc, first, last, empty = [], [], [], [], []
    padded = 0
    for doc, (start, end) in enumerate(bounds):
        chunks = -(-(end - start) // chunk_size)
        slots.append(torch.arange(padded, padded + end - start))
        first.append(len(chunk_doc))
        chunk_doc.extend([doc] * chunks)
        last.append(max(len(chunk_doc) - 1, 0))
        empty.append(chunks == 0)
        padded += chunks * chunk_size
    as_long = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return _ChunkLayout(padded, torch.cat(slots).to(device), as_long(chunk_doc), as_long(first), as_long(last),
                        torch.tensor(empty, device=device) if any(empty) else None)


def _ssd_chunks(x, dt, A, Bm, Cm, D, initial_state, chunk_doc, doc_first_chunk, doc_last_chunk, chunk_size: int):
    """The chunked SSD on a chunk-aligned sequence.

    x, Bm, Cm in the matmul dtype (see :func:`_matmul_dtype`), dt, A, D, initial_state in the compute dtype: every
    contraction takes matmul-dtype operands and its result is widened before it is summed or decayed, so decays,
    sums and states are in the compute dtype. x [b, c*l, H, P], dt [b, c*l, H], Bm/Cm [b, c*l, G, N],
    initial_state [b, docs, H, P, N] or None, chunk_doc [c], doc_first_chunk / doc_last_chunk [docs].
    Returns y [b, c*l, H, P] in the matmul dtype and final [b, docs, H, P, N] in the compute dtype.
    Heads are handled as [G, H/G] so that B and C are never repeated per head.
    """
    b, padded_length, heads, p = x.shape
    g, n = Bm.shape[2:]
    k, l = heads // g, chunk_size
    c = padded_length // l
    mm, wide = x.dtype, dt.dtype
    x_wide = x.to(wide)
    xdt = x_wide * dt[..., None]
    log_decay = (dt * A).view(b, c, l, heads).permute(0, 3, 1, 2)  # [b, H, c, l]
    Bc, Cc = Bm.view(b, c, l, g, n), Cm.view(b, c, l, g, n)
    cum = log_decay.cumsum(dim=-1)  # [b, H, c, l] log-decay from the chunk start through token l
    grouped = lambda t: t.view(b, g, k, *t.shape[2:])  # noqa: E731 - [b, H, ...] -> [b, G, H/G, ...]

    # 1. inside each chunk: y_l += sum_{s <= l} (C_l . B_s) exp(sum_{s<r<=l} a_r) x_s dt_s
    decay_within = grouped(torch.exp(_segsum(log_decay))).permute(0, 3, 1, 2, 4, 5)  # [b, c, G, H/G, l, s]
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)[:, :, :, None].to(wide) * decay_within
    y = torch.einsum("bcgkls,bcsgkp->bclgkp", scores.to(mm), xdt.to(mm).view(b, c, l, g, k, p)).to(wide)

    # 2. each chunk's own contribution to the state at its end
    to_chunk_end = torch.exp(cum[..., -1:] - cum).permute(0, 2, 3, 1)  # [b, c, l, H]
    weighted = (xdt.view(b, c, l, heads, p) * to_chunk_end[..., None]).to(mm).view(b, c, l, g, k, p)
    chunk_states = torch.einsum("bclgn,bclgkp->bcgkpn", Bc, weighted)

    # 3. states after each chunk: decayed sums of the chunk states of the same document, plus its initial state
    chunk_log_decay = cum[..., -1]  # [b, H, c]
    between = _segsum(chunk_log_decay)  # [b, H, c, c]: log-decay over chunks j+1..i
    same_doc = chunk_doc[:, None] == chunk_doc[None, :]
    carry = torch.exp(between).masked_fill(~same_doc, 0.0)
    after = torch.einsum("bgkij,bjgkpn->bigkpn", grouped(carry).to(mm), chunk_states).to(wide)  # [b, c, G, H/G, P, N]
    if initial_state is not None:
        first = doc_first_chunk[chunk_doc]  # [c] first chunk of each chunk's document
        since_doc_start = between.gather(-1, first.expand(b, heads, c)[..., None])[..., 0] + \
            chunk_log_decay.gather(-1, first.expand(b, heads, c))  # [b, H, c]
        init = initial_state[:, chunk_doc].view(b, c, g, k, p, n)
        after = after + grouped(torch.exp(since_doc_start)).permute(0, 3, 1, 2)[..., None, None] * init
    final = after[:, doc_last_chunk]  # [b, docs, G, H/G, P, N]

    # 4. the state entering each chunk, read out by C inside the chunk
    continues = torch.cat([chunk_doc.new_zeros(1, dtype=torch.bool), chunk_doc[1:] == chunk_doc[:-1]])
    entering = torch.cat([torch.zeros_like(after[:, :1]), after[:, :-1]], dim=1)
    if initial_state is not None:
        entering = torch.where(continues[:, None, None, None, None], entering, init)
    else:
        entering = entering * continues[:, None, None, None, None]
    from_chunk_start = grouped(torch.exp(cum)).permute(0, 3, 4, 1, 2)  # [b, c, l, G, H/G]
    y = y + torch.einsum("bclgn,bcgkpn->bclgkp", Cc, entering.to(mm)).to(wide) * from_chunk_start[..., None]

    y = y.reshape(b, padded_length, heads, p)
    if D is not None:
        y = y + D[:, None] * x_wide
    return y.to(mm), final.reshape(b, -1, heads, p, n)


def _ssd_torch(x, dt, A, Bm, Cm, D, initial_state, output_final_state, cu_seqlens, bounds, chunk_size, compiled):
    batch, length, heads, _ = x.shape
    dtype = _compute_dtype(x, dt, A, Bm, Cm, D, initial_state)
    mm = _matmul_dtype(x, Bm, Cm, dtype)
    chunk_size = max(1, min(chunk_size, max(end - start for start, end in bounds)))
    layout = _chunk_layout(bounds, chunk_size, cu_seqlens is not None, x.device)
    inputs = [x.to(mm), dt.to(dtype), Bm.to(mm), Cm.to(mm)]
    if layout.token_slots is None:
        pad = layout.padded_length - length
        if pad:
            inputs = [F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in inputs]
    else:  # scatter the documents into their chunk-aligned slots; padding stays zero (dt = 0: no effect)
        inputs = [t.new_zeros(1, layout.padded_length, *t.shape[2:]).index_copy(1, layout.token_slots, t)
                  for t in inputs]
    init = None
    if initial_state is not None:  # [docs, H, P, N] -> [b, docs, H, P, N]
        init = initial_state.to(dtype).view(batch, -1, *initial_state.shape[1:])
    fn = compile_ops.compiled(_ssd_chunks) if compiled and compile_ops.dynamo_enabled() else _ssd_chunks
    y, final = fn(*inputs[:1], inputs[1], A.to(dtype), *inputs[2:], None if D is None else D.to(dtype), init,
                  layout.chunk_doc, layout.doc_first_chunk, layout.doc_last_chunk, chunk_size)
    y = y[:, :length] if layout.token_slots is None else y.index_select(1, layout.token_slots)
    final = final.reshape(-1, *final.shape[2:])  # [sequences, H, P, N]
    if layout.doc_is_empty is not None:  # an empty document leaves its initial state (or zero) unchanged
        keep = init.reshape(final.shape) if init is not None else torch.zeros_like(final)
        final = torch.where(layout.doc_is_empty[:, None, None, None], keep, final)
    return y.to(x.dtype), (final if output_final_state else None)


# --------------------------------------------------------------------------------------------------------------
# mamba_ssm and fla
# --------------------------------------------------------------------------------------------------------------


MAMBA_SSM_SSD_MODULE = "mamba_ssm.ops.triton.ssd_combined"


def import_mamba_ssm_module(name: str):
    """The module ``name`` of mamba_ssm, or None where mamba_ssm is not installed.

    Its SSD is Triton only, but ``mamba_ssm/__init__`` imports the CUDA selective-scan extension, so a source
    install without the CUDA build (``MAMBA_SKIP_CUDA_BUILD=TRUE``: seconds instead of many minutes) cannot import
    the package. Then the module is imported under a bare package object that skips that ``__init__``, and the
    bare object leaves ``sys.modules`` again, so ``import mamba_ssm`` elsewhere fails as it did."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    spec = importlib.util.find_spec("mamba_ssm")  # a top-level spec: found without running __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    bare = importlib.util.module_from_spec(spec)
    sys.modules["mamba_ssm"] = bare
    try:
        return importlib.import_module(name)
    except ImportError:  # e.g. no triton or einops
        return None
    finally:
        if sys.modules.get("mamba_ssm") is bare:
            del sys.modules["mamba_ssm"]


@functools.lru_cache(maxsize=None)
def _mamba_chunk_scan_combined():
    """mamba_ssm's fused Triton SSD, or None where mamba_ssm is not installed."""
    module = import_mamba_ssm_module(MAMBA_SSM_SSD_MODULE)
    return None if module is None else module.mamba_chunk_scan_combined


def mamba_ssm_available() -> bool:
    return _mamba_chunk_scan_combined() is not None


def _ssd_mamba_ssm(x, dt, A, Bm, Cm, D, initial_state, output_final_state, cu_seqlens, chunk_size):
    scan = _mamba_chunk_scan_combined()
    if scan is None:
        raise RuntimeError("SSD backend 'mamba_ssm' needs mamba_ssm (pip install mamba-ssm --no-build-isolation; "
                           "MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE skip the CUDA build, which the SSD does "
                           "not use); use 'torch_compile' or 'torch' instead")
    if cu_seqlens is None:
        out = scan(x, dt, A, Bm, Cm, chunk_size, D=D, initial_states=initial_state,
                   return_final_states=output_final_state)
        return out if output_final_state else (out, None)
    if initial_state is not None:
        raise NotImplementedError("mamba_ssm takes no per-document initial states with cu_seqlens; "
                                  "use backend 'torch'/'torch_compile'")
    seq_idx = document_index(cu_seqlens.to(x.device), x.shape[1])[None]
    if not output_final_state:
        return scan(x, dt, A, Bm, Cm, chunk_size, D=D, seq_idx=seq_idx), None
    # per-document final states come from return_varlen_states, which mamba_ssm supports in forward only
    out, states = scan(x, dt, A, Bm, Cm, chunk_size, D=D, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                       return_varlen_states=True)
    return out, states


# fla's key block in chunk_bwd_dqkwg on Hopper is min(next_pow2(state_dim), 128); #640's miscompile needs 64
FLA_SAFE_MIN_STATE_DIM = 65


def _fla_has_640_bug() -> bool:
    """Whether fla's triton path hits #640 here (Hopper, 3.4 <= triton < 3.7.1, no tilelang to route around it)."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        return False
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return False
    try:
        from fla.backends import TileLangBackend

        return not TileLangBackend.is_available()
    except ImportError:
        return True


def fla_backward_unsupported_reason(state_dim: int) -> Optional[str]:
    """Why fla's SSD backward cannot run on this GPU for this state size (None when it can)."""
    if not _fla_has_640_bug() or state_dim >= FLA_SAFE_MIN_STATE_DIM:
        return None
    return (f"with 3.4 <= triton < 3.7.1 on Hopper fla's gated chunk backward can give wrong gradients with key "
            f"blocks of up to 64, which a state of {state_dim} uses (fla #640); upgrade triton to >= 3.7.1, install "
            f"tilelang, run under torch.no_grad(), or use the 'torch_compile' / 'mamba_ssm' backends for training")


@contextlib.contextmanager
def _fla_640_refusal_lifted():
    """fla's chunk_bwd_dqkwg refuses every gated backward in #640's triton range, whatever its block; lift the
    refusal (a module flag read at call time) for a call that :func:`fla_backward_unsupported_reason` cleared."""
    from fla.ops.common import chunk_o

    saved = chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = True
    try:
        yield
    finally:
        chunk_o.TRITON_ABOVE_3_7_1 = saved


class _FlaSimpleGLA(torch.autograd.Function):
    """fla's ChunkSimpleGLAFunction with scale 1 and our state layout ([V=P, K=N]: ``state_v_first``), its
    backward run with #640's refusal lifted (a no-op off Hopper, or where tilelang takes the call)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, output_final_state, cu_seqlens):
        from fla.ops.simple_gla.chunk import ChunkSimpleGLAFunction

        return ChunkSimpleGLAFunction.forward(ctx, q, k, v, g, None, 1.0, initial_state, output_final_state, True,
                                              cu_seqlens, None, None)

    @staticmethod
    def backward(ctx, d_out, d_final):
        from fla.ops.simple_gla.chunk import ChunkSimpleGLAFunction

        with _fla_640_refusal_lifted():
            dq, dk, dv, dg, _, _, d_initial, *_ = ChunkSimpleGLAFunction.backward(ctx, d_out, d_final)
        return dq, dk, dv, dg, d_initial, None, None


def _ssd_fla(x, dt, A, Bm, Cm, D, initial_state, output_final_state, cu_seqlens):
    """fla's chunk kernels, unchecked: :func:`ssd_scan` refuses training where #640 applies before calling this."""
    if importlib.util.find_spec("fla") is None:
        raise RuntimeError("SSD backend 'fla' needs flash-linear-attention (pip install '.[gpu]')")
    heads, groups = x.shape[2], Bm.shape[2]
    # fla takes per-head q/k: broadcast the groups to their heads (a copy; fla's kernels want contiguous inputs)
    q = Cm.repeat_interleave(heads // groups, dim=2)
    k = Bm.repeat_interleave(heads // groups, dim=2)
    v = x * dt[..., None].to(x.dtype)
    g = (dt.float() * A.float()[None, None])
    o, final = _FlaSimpleGLA.apply(q, k, v, g, initial_state, output_final_state, cu_seqlens)
    if D is not None:
        o = o + (D[:, None] * x.to(D.dtype)).to(o.dtype)
    return o, (final if output_final_state else None)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ``auto`` stands for on ``device`` (other names are returned as they are, after a check)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown SSD backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "mamba_ssm" if mamba_ssm_available() else "torch_compile"
    return "torch"


def ssd_scan(x, dt, A, Bm, Cm, D=None, *, chunk_size: int = 64, initial_state=None, output_final_state=False,
             cu_seqlens=None, backend: str = "auto"):
    """The SSD scan (see the module docstring). Returns (y [B, T, H, P] in x's dtype, final_state or None).

    ``final_state`` is [N_seq, H, P, N] (N_seq = B, or the number of documents with cu_seqlens), in fp32 (fp64 for
    fp64 inputs) for the torch backends.
    """
    backend = resolve_backend(backend, x.device)
    bounds = _check_inputs(x, dt, A, Bm, Cm, D, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if backend == "mamba_ssm":
        return _ssd_mamba_ssm(x, dt, A, Bm, Cm, D, initial_state, output_final_state, cu_seqlens, chunk_size)
    if backend == "fla":
        reason = fla_backward_unsupported_reason(Bm.shape[-1])
        if reason is not None and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, dt, A, Bm, Cm, D, initial_state)):
            raise RuntimeError(f"SSD backend 'fla' cannot train here: {reason}")
        return _ssd_fla(x, dt, A, Bm, Cm, D, initial_state, output_final_state, cu_seqlens)
    return _ssd_torch(x, dt, A, Bm, Cm, D, initial_state, output_final_state, cu_seqlens, bounds, chunk_size,
                      compiled=backend == "torch_compile")
