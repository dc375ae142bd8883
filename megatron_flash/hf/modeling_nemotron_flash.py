# coding=utf-8
"""PyTorch Nemotron-Flash: a hybrid of DeltaNet, Mamba2, softmax attention and SwiGLU blocks.

Written for megatron_flash's Hugging Face exporter and shipped verbatim next to the exported weights; it imports
only torch and transformers (plus flash-linear-attention's delta-rule kernels when the model runs on CUDA and
``fla`` is installed). Parameter names and shapes are those of NVIDIA's released Nemotron-Flash checkpoints.

The function computed (every block is pre-norm residual):

* ``num_memory_tokens`` learned vectors are prepended to the token embeddings on the first forward of a sequence
  (they then live in the caches like any token) and their outputs are dropped after the final norm;
* ``"deltanet"`` blocks: ``h += gla(input_layernorm(h))``, ``"m2"``: ``h += mamba(...)``, ``"a"``:
  ``h += self_attn(...)``, ``"f"``: ``h += ffn(pre_ffn_layernorm(h))``;
* logits use the output embedding with each vocabulary row scaled to unit L2 norm.

On CPU every mixer runs in plain PyTorch, with exact chunked forms of the DeltaNet and Mamba2 recurrences (fp32).
Batches must not contain padding: a 2-D ``attention_mask`` with zeros is refused (left-padded batched generation
is not supported).

Two caches: :class:`NemotronFlashCache` (grows by concatenation; what ``generate`` builds) and
:class:`NemotronFlashStaticCache` (``model.make_static_cache(batch, max_length)``: preallocated buffers updated in
place, with a device-side position). With the static cache a one-token forward has fixed shapes, reads no host-side
length and never synchronizes with the host, so a single captured CUDA graph of it replays every decode step.
Set ``NEMOTRON_FLASH_DISABLE_FLA=1`` to keep DeltaNet on the PyTorch path on CUDA too (no Triton autotuning).
"""

import math
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_nemotron_flash import NemotronFlashConfig

logger = logging.get_logger(__name__)

# Chunk length of the chunked DeltaNet / Mamba2 scans on the PyTorch path. Any value gives the same result up to
# fp32 rounding; 64 keeps the per-chunk [64 x 64] matrices small.
SCAN_CHUNK_SIZE = 64
# RMSNorm epsilons fixed by the released modules: fla's RMSNorm default (DeltaNet o_norm) and mamba_ssm's gated
# RMSNorm in Mamba2; only the block norms use config.rms_norm_eps.
DELTANET_OUTPUT_NORM_EPS = 1e-5
MAMBA2_GATED_NORM_EPS = 1e-5
# fla's l2norm epsilon, used on DeltaNet queries and keys.
L2NORM_EPS = 1e-6

_FLA_DELTA_RULE = None


def _fla_delta_rule_kernels():
    """fla's (chunk, fused_recurrent) delta-rule kernels, or None when fla is not installed.

    Imported on first use from CUDA tensors only: importing fla costs seconds and warns on machines without Triton.
    ``NEMOTRON_FLASH_DISABLE_FLA=1`` (read on every call) keeps the PyTorch path.
    """
    global _FLA_DELTA_RULE
    if os.environ.get("NEMOTRON_FLASH_DISABLE_FLA", "0") == "1":
        return None
    if _FLA_DELTA_RULE is None:
        try:
            from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule

            _FLA_DELTA_RULE = (chunk_delta_rule, fused_recurrent_delta_rule)
        except Exception as error:  # fla missing, or its Triton import failing
            logger.warning_once(f"flash-linear-attention unavailable ({error!r}); DeltaNet runs in PyTorch.")
            _FLA_DELTA_RULE = False
    return _FLA_DELTA_RULE or None


# --------------------------------------------------------------------------------------------------------------
# Functional building blocks (the reference math; the modules below only hold parameters and caches)
# --------------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, computed in fp32, returned in x's dtype.

    ``F.rms_norm`` upcasts 16-bit inputs itself; on CUDA it is one fused kernel (instead of eight with the casts),
    which matters in decode steps.
    """
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def inference_constant(owner: nn.Module, name: str, compute, *params: torch.Tensor) -> torch.Tensor:
    """``compute(*params)``: a small tensor derived from parameters (an fp32 copy, ``-exp(A_log)``, stacked conv
    kernels), kept on ``owner`` while the parameters stay the same (storage, version, dtype, device), so that decode
    steps (and the CUDA graphs that replay them) launch no kernel for it. Recomputed on every call when autograd
    records, and under torch.compile (which fuses it into its consumer)."""
    if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.compiler.is_compiling():
        return compute(*params)
    try:
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    except RuntimeError:  # inference-mode tensors have no version counter: do not keep anything
        return compute(*params)
    store = owner.__dict__.setdefault("_inference_constants", {})
    entry = store.get(name)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = store[name] = (key, compute(*params))
    return entry[1]


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """fla's l2norm: ``x / sqrt(sum(x^2) + 1e-6)`` over the last dim (computed in fp32)."""
    x_fp32 = x.float()
    return (x_fp32 * torch.rsqrt(x_fp32.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)


def causal_depthwise_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], conv_state: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution ``out[t, c] = bias[c] + sum_i weight[c, 0, i] * x[t - K + 1 + i, c]``.

    ``x`` is [B, T, C], ``weight`` [C, 1, K]. Inputs before the first position come from ``conv_state``
    ([B, C, K - 1], the previous K - 1 inputs) or are zero, which is ``nn.Conv1d(padding=K - 1)`` cut to the first
    T outputs (fla's ShortConvolution and Mamba2's conv1d). Returns the output [B, T, C] and the new state.
    """
    batch, _, channels = x.shape
    kernel_size = weight.shape[-1]
    x_channels_first = x.transpose(1, 2)
    if conv_state is None:
        conv_state = x_channels_first.new_zeros(batch, channels, kernel_size - 1)
    with_history = torch.cat([conv_state.to(x.dtype), x_channels_first], dim=-1)
    out = F.conv1d(with_history, weight, bias, groups=channels)
    # contiguous(): a bare slice would keep the whole [B, C, K - 1 + T] prompt buffer alive inside the cache.
    new_state = with_history[..., with_history.shape[-1] - (kernel_size - 1) :].contiguous()
    return out.transpose(1, 2), new_state


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = SCAN_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeltaNet recurrence, exactly, in fp32, a chunk at a time (the WY form used by fla's chunk kernel).

    Per head, with state S in R^{dk x dv} starting at ``initial_state`` (or 0):
    ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, ``o_t = S_t^T (q_t * dk^-0.5)``.

    Inside a chunk entered with state S0, write ``S_t = S0 + sum_{s<=t} k_s u_s^T``. Then
    ``u_t = beta_t (v_t - S0^T k_t - sum_{s<t} (k_s . k_t) u_s)``, a unit lower-triangular system
    ``(I + strict_tril(diag(beta) K K^T)) U = diag(beta) (V - K S0)``, solved once per chunk for ``V`` and ``K``
    (U = u - w S0), and ``O = Q S0 + tril(Q K^T) U``.

    q, k: [B, T, H, dk] (already L2-normalized), v: [B, T, H, dv], beta: [B, T, H]; state [B, H, dk, dv].
    Returns o [B, T, H, dv] and the final state, both fp32.
    """
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    q, k, v, beta = (t.float().transpose(1, 2) for t in (q, k, v, beta))  # [B, H, T, ...]
    q = q * key_dim**-0.5
    chunk = min(chunk_size, seq_len)
    pad = (-seq_len) % chunk
    if pad:
        # Zero keys and betas leave the state untouched, so padded steps change nothing.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta = F.pad(beta, (0, pad))
    num_chunks = (seq_len + pad) // chunk
    q, k, v = (t.reshape(batch, heads, num_chunks, chunk, -1) for t in (q, k, v))
    beta = beta.reshape(batch, heads, num_chunks, chunk, 1)

    k_beta, v_beta = k * beta, v * beta
    strictly_lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    system = eye + (k_beta @ k.transpose(-1, -2)).masked_fill(~strictly_lower, 0.0)
    w = torch.linalg.solve_triangular(system, k_beta, upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    qk = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)

    state = (
        q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.float()
    )
    outputs = []
    for i in range(num_chunks):
        pseudo_values = u[:, :, i] - w[:, :, i] @ state
        outputs.append(q[:, :, i] @ state + qk[:, :, i] @ pseudo_values)
        state = state + k[:, :, i].transpose(-1, -2) @ pseudo_values
    o = torch.stack(outputs, dim=2).reshape(batch, heads, num_chunks * chunk, value_dim)[:, :, :seq_len]
    return o.transpose(1, 2), state


def mamba2_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = SCAN_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2 SSM (one B/C group), exactly, in fp32, a chunk at a time (the SSD form).

    Per head h, with state S in R^{P x N} from ``initial_state`` (or 0):
    ``S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T``, ``y_t = S_t C_t + D_h x_t``.
    With ``L_t = sum_{s<=t} dt_s A_h`` inside a chunk entered with S0:
    ``y_t = exp(L_t) S0 C_t + sum_{s<=t} exp(L_t - L_s) (C_t . B_s) dt_s x_s + D_h x_t``.

    x: [Bt, T, H, P], dt: [Bt, T, H] (after softplus), A: [H] (negative), B, C: [Bt, T, N], D: [H];
    state [Bt, H, P, N]. Returns y [Bt, T, H, P] and the final state, both fp32.
    """
    batch, seq_len, heads, head_dim = x.shape
    state_dim = B.shape[-1]
    x, dt, A, B, C, D = (t.float() for t in (x, dt, A, B, C, D))
    skip = x * D[:, None]
    chunk = min(chunk_size, seq_len)
    pad = (-seq_len) % chunk
    if pad:
        # dt = 0 on padded steps: decay exp(0) = 1 and no input, so the state passes through unchanged.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (dt, B, C))
    num_chunks = (seq_len + pad) // chunk
    x = x.reshape(batch, num_chunks, chunk, heads, head_dim).permute(0, 3, 1, 2, 4)  # [Bt, H, c, l, P]
    dt = dt.reshape(batch, num_chunks, chunk, heads).permute(0, 3, 1, 2)  # [Bt, H, c, l]
    B = B.reshape(batch, 1, num_chunks, chunk, state_dim)  # shared by all heads (one group)
    C = C.reshape(batch, 1, num_chunks, chunk, state_dim)

    log_decay = torch.cumsum(dt * A[None, :, None, None], dim=-1)  # L_t, [Bt, H, c, l]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    # exp(L_t - L_s) for s <= t; masked to -inf before exp since L_t - L_s > 0 (possibly huge) for s > t.
    pair_decay = torch.exp((log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, float("-inf")))
    x_dt = x * dt[..., None]
    y = ((C @ B.transpose(-1, -2)) * pair_decay) @ x_dt  # within-chunk part, [Bt, H, c, l, P]

    # What each chunk adds to the state at its end: sum_s exp(L_end - L_s) dt_s x_s B_s^T.
    decay_to_chunk_end = torch.exp(log_decay[..., -1:] - log_decay)
    chunk_inputs = (x_dt * decay_to_chunk_end[..., None]).transpose(-1, -2) @ B  # [Bt, H, c, P, N]
    state = x.new_zeros(batch, heads, head_dim, state_dim) if initial_state is None else initial_state.float()
    from_state = []
    for i in range(num_chunks):
        # exp(L_t) S0 C_t for the state entering chunk i.
        from_state.append((C[:, :, i] @ state.transpose(-1, -2)) * torch.exp(log_decay[:, :, i])[..., None])
        state = state * torch.exp(log_decay[:, :, i, -1])[..., None, None] + chunk_inputs[:, :, i]
    y = y + torch.stack(from_state, dim=2)
    y = y.permute(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk, heads, head_dim)[:, :seq_len]
    return y + skip, state


# One-token forms of the above, for the static cache: fixed shapes, states updated in place, no host reads.


def causal_conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], conv_state: torch.Tensor
) -> torch.Tensor:
    """One step of :func:`causal_depthwise_conv1d`: ``x`` [..., C] (one token), ``weight`` [..., C, K], ``conv_state``
    [..., C, K - 1] (the previous K - 1 inputs, fp32), shifted in place. Computed and returned in fp32."""
    window = torch.cat([conv_state, x.unsqueeze(-1).float()], dim=-1)
    conv_state.copy_(window[..., 1:])
    out = (window * weight.float()).sum(-1)
    return out if bias is None else out + bias.float()


def delta_rule_recurrent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """One token of :func:`delta_rule_chunked`: ``S += beta k (v - S^T k)^T``, ``o = S^T (q * scale)``.

    q, k: [B, H, dk] (L2-normalized), v: [B, H, dv], beta: [B, H]; ``state`` [B, H, dk, dv] fp32, updated in place;
    ``scale`` defaults to dk^-0.5. Returns o [B, H, dv] fp32.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q.float() if scale == 1.0 else q.float() * scale
    k, v = k.float(), v.float()
    # Products and sums, not matmuls: under torch.compile they fuse with the state update (one batch of tiny
    # matrix-vector products per launch otherwise).
    predicted = (k.unsqueeze(-1) * state).sum(-2)  # S^T k
    state.addcmul_(k.unsqueeze(-1), ((v - predicted) * beta.float().unsqueeze(-1)).unsqueeze(-2))
    return (q.unsqueeze(-1) * state).sum(-2)


def mamba2_recurrent_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token of :func:`mamba2_scan_chunked`: ``S = exp(dt A) S + dt x B^T``, ``y = S C + D x``.

    x: [Bt, H, P], dt: [Bt, H] (after softplus), A: [H], B, C: [Bt, N], D: [H]; ``state`` [Bt, H, P, N] fp32,
    updated in place. Returns y [Bt, H, P] fp32.
    """
    x, dt = x.float(), dt.float()
    decay = torch.exp(dt * A.float())
    state.mul_(decay[..., None, None]).addcmul_((x * dt.unsqueeze(-1)).unsqueeze(-1), B.float()[:, None, None, :])
    y = (state * C.float()[:, None, None, :]).sum(-1)  # a product and a sum: fuses with the update when compiled
    return y + x * D.float()[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-NeoX ("rotate_half") RoPE tables over the full head dim for integer ``positions`` [B, T] -> [B, 1, T, D].

    Frequencies and angles in fp32 (as Megatron and the released code), the tables cast to the activations' dtype.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------


class NemotronFlashCache:
    """Per-layer decoding state: attention keys/values, DeltaNet and Mamba2 conv and recurrent states.

    The cache sees the memory tokens as ordinary tokens (they are prepended on the first forward), but
    ``get_seq_length()`` counts only the text tokens, which is what ``GenerationMixin`` compares with
    ``input_ids``. ``stream_length`` counts everything (memory + text): the next RoPE position and attention index.

    Not a ``transformers.Cache`` subclass (whose layer API changes between releases): it implements what
    ``generate`` uses (``get_seq_length``, ``reorder_cache`` for beam search, ``is_compileable``).
    Recurrent states cannot be rolled back, so it is not croppable (no assisted generation).
    """

    is_compileable = False
    is_croppable = False
    # transformers >= 5.24: generate slices already-cached tokens off the input unless every layer is "linear"
    # (recurrent-only). Every layer here counts its tokens in get_seq_length, so that slicing is right for all.
    is_linear = (False,)

    def __init__(self, config: NemotronFlashConfig):
        self.layer_types = list(config.layer_types)
        self.reset()

    def reset(self) -> None:
        """Forget everything (the next forward starts a new sequence, memory tokens included)."""
        num_layers = len(self.layer_types)
        self.key_cache: list[Optional[torch.Tensor]] = [None] * num_layers
        self.value_cache: list[Optional[torch.Tensor]] = [None] * num_layers
        # Stream index of the first cached key: sliding-window layers drop keys no query can see again.
        self.first_cached_key_index = [0] * num_layers
        # DeltaNet: (q, k, v) tuples of [B, C, K - 1]; Mamba2: [B, conv_dim, K - 1].
        self.conv_states: list = [None] * num_layers
        # DeltaNet: [B, H, dk, dv] fp32; Mamba2: [B, H, P, N] fp32.
        self.recurrent_states: list[Optional[torch.Tensor]] = [None] * num_layers
        self.text_length = 0
        self.stream_length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.text_length

    @property
    def is_empty(self) -> bool:
        return self.stream_length == 0

    def advance(self, num_text_tokens: int, num_stream_tokens: int) -> None:
        """Called by the model once all layers have consumed a forward's tokens."""
        self.text_length += num_text_tokens
        self.stream_length += num_stream_tokens

    def mixer_state(self, layer_idx: int) -> tuple:
        """(conv state, recurrent state) of a DeltaNet or Mamba2 layer; (None, None) before its first forward."""
        return self.conv_states[layer_idx], self.recurrent_states[layer_idx]

    def set_mixer_state(self, layer_idx: int, conv_state, recurrent_state: torch.Tensor) -> None:
        self.conv_states[layer_idx], self.recurrent_states[layer_idx] = conv_state, recurrent_state

    def update_attention(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, sliding_window: Optional[int]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append this forward's keys/values [B, Hkv, T, D]; return all visible ones and the first one's index."""
        first_index = self.first_cached_key_index[layer_idx]
        if self.key_cache[layer_idx] is not None:
            keys = torch.cat([self.key_cache[layer_idx], keys], dim=2)
            values = torch.cat([self.value_cache[layer_idx], values], dim=2)
        stored_keys, stored_values = keys, values
        if sliding_window is not None:
            # The next query (stream index n) sees keys j > n - window: the last window - 1 keys.
            dropped = max(keys.shape[2] - (sliding_window - 1), 0)
            if dropped:
                # clone(): a view would keep the whole concatenated (e.g. prompt-long) buffer alive.
                stored_keys, stored_values = keys[:, :, dropped:].clone(), values[:, :, dropped:].clone()
            self.first_cached_key_index[layer_idx] = first_index + dropped
        self.key_cache[layer_idx], self.value_cache[layer_idx] = stored_keys, stored_values
        return keys, values, first_index

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""

        def select(tensor):
            return None if tensor is None else tensor.index_select(0, beam_idx.to(tensor.device))

        for i in range(len(self.layer_types)):
            self.key_cache[i], self.value_cache[i] = select(self.key_cache[i]), select(self.value_cache[i])
            self.recurrent_states[i] = select(self.recurrent_states[i])
            state = self.conv_states[i]
            self.conv_states[i] = tuple(select(s) for s in state) if isinstance(state, tuple) else select(state)


def attention_window(config: NemotronFlashConfig, layer_idx: int) -> Optional[int]:
    """Sliding window of attention layer ``layer_idx``; None for full attention (the layers in global_attn_idx)."""
    if config.sliding_window is None or layer_idx in (config.global_attn_idx or []):
        return None
    return config.sliding_window


# Full-attention buffers of the static cache hold a multiple of this many positions (aligned rows for SDPA kernels).
STATIC_CACHE_ALIGNMENT = 64


class NemotronFlashStaticCache:
    """Decoding state in preallocated buffers of fixed shapes, updated in place: what a captured CUDA graph replays.

    * attention: keys/values [B, Hkv, slots, D] in the model dtype. Full-attention layers have a slot per stream
      position (memory tokens + ``max_length`` text tokens, rounded up to a multiple of 64); a sliding-window layer
      has a ring of ``sliding_window`` slots, stream index j in slot j % window (softmax attention does not care
      about the order of its keys; RoPE is applied before keys are stored);
    * DeltaNet: conv inputs [B, 3 (q, k, v), H * dk, K - 1] and the state [B, H, dk, dv]; Mamba2: conv inputs
      [B, conv_dim, K - 1] and the state [B, H, P, N]; all fp32 (the conv inputs are stored exactly);
    * ``position``: a one-element device tensor, the stream index (memory + text) of the next token.

    A one-token forward reads and advances only device tensors: it writes keys/values at ``position`` with
    ``index_copy_``, masks the buffer with ``slot <= position``, takes RoPE from tables made here, copies the new
    mixer states into their buffers, and adds 1 to ``position``. No ``.item()``, no host-side length, no shape
    that changes per step, so one captured step replays every decode step. A forward of several tokens (the
    prompt) reads the position on the host once. ``get_seq_length`` also reads it (it is for ``generate``).
    """

    # Not for generate()'s automatic torch.compile (untested here): capture a step with megatron_flash's driver.
    is_compileable = False
    is_croppable = False
    is_linear = NemotronFlashCache.is_linear

    def __init__(self, config: NemotronFlashConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"NemotronFlashStaticCache: batch_size ({batch_size}) and max_length ({max_length}) "
                             "must be positive")
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # compared with the inputs' device
        self.layer_types = list(config.layer_types)
        self.batch_size, self.max_length, self.dtype, self.device = batch_size, max_length, dtype, device
        self.num_memory_tokens = config.num_memory_tokens
        self.stream_capacity = config.num_memory_tokens + max_length
        full_slots = -(-self.stream_capacity // STATIC_CACHE_ALIGNMENT) * STATIC_CACHE_ALIGNMENT
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = config.hidden_size // heads
        d_inner = config.mamba_expand * config.hidden_size
        mamba_heads = d_inner // config.mamba2_headdim

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        num_layers = len(self.layer_types)
        self.key_cache: list[Optional[torch.Tensor]] = [None] * num_layers
        self.value_cache: list[Optional[torch.Tensor]] = [None] * num_layers
        # Ring size of each sliding-window layer (None: a slot per stream position).
        self.ring_sizes: list[Optional[int]] = [None] * num_layers
        self.conv_states: list[Optional[torch.Tensor]] = [None] * num_layers
        self.recurrent_states: list[Optional[torch.Tensor]] = [None] * num_layers
        for i, layer_type in enumerate(self.layer_types):
            if layer_type == "a":
                window = attention_window(config, i)
                # A window that covers the whole capacity never drops a key: store it like full attention.
                self.ring_sizes[i] = window if window is not None and window < self.stream_capacity else None
                slots = full_slots if self.ring_sizes[i] is None else window
                self.key_cache[i] = zeros(batch_size, kv_heads, slots, head_dim, dtype=dtype)
                self.value_cache[i] = zeros(batch_size, kv_heads, slots, head_dim, dtype=dtype)
            elif layer_type == "deltanet":
                self.conv_states[i] = zeros(batch_size, 3, heads * head_dim, config.d_conv - 1)
                self.recurrent_states[i] = zeros(batch_size, heads, head_dim, head_dim)
            elif layer_type == "m2":
                conv_dim = d_inner + 2 * config.mamba_d_state
                self.conv_states[i] = zeros(batch_size, conv_dim, config.mamba_d_conv - 1)
                self.recurrent_states[i] = zeros(batch_size, mamba_heads, config.mamba2_headdim, config.mamba_d_state)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slot_index = torch.arange(full_slots, device=device)
        self.rope_cos = self.rope_sin = None
        if "a" in self.layer_types and config.rope:
            cos, sin = rotary_cos_sin(self.slot_index[None], head_dim, config.rope_theta, dtype)
            self.rope_cos, self.rope_sin = cos[0, 0], sin[0, 0]  # [positions, head_dim]
        self.started = False
        self.num_prefix_tokens = 0  # memory tokens prepended by the first forward

    def buffers(self) -> list:
        """Every state tensor (not the RoPE tables or the position)."""
        return [t for group in (self.key_cache, self.value_cache, self.conv_states, self.recurrent_states)
                for t in group if t is not None]

    def memory_bytes(self) -> int:
        tables = [t for t in (self.rope_cos, self.rope_sin, self.slot_index, self.position) if t is not None]
        return sum(t.numel() * t.element_size() for t in self.buffers() + tables)

    def reset(self) -> None:
        """Forget everything in place (buffers stay where a captured graph expects them)."""
        for tensor in self.buffers():
            tensor.zero_()
        self.position.zero_()
        self.started = False
        self.num_prefix_tokens = 0

    @property
    def is_empty(self) -> bool:
        return not self.started

    @property
    def stream_length(self) -> int:
        """Stream tokens seen (memory + text). Reads the device position: a host synchronization."""
        return int(self.position.item())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Text tokens seen (a host synchronization; for ``generate``, not for captured steps)."""
        return self.stream_length - self.num_prefix_tokens if self.started else 0

    def check_room(self, num_stream_tokens: int) -> None:
        """Refuse a multi-token forward that would run past the buffers (one-token steps are not checked: that
        would need the position on the host; the caller sizes ``max_length``)."""
        end = self.stream_length + num_stream_tokens
        if end > self.stream_capacity:
            raise ValueError(f"NemotronFlashStaticCache: {end} stream tokens exceed its capacity "
                             f"{self.stream_capacity} ({self.num_memory_tokens} memory tokens + max_length "
                             f"{self.max_length})")

    def advance(self, num_text_tokens: int, num_stream_tokens: int) -> None:
        if not self.started:
            self.num_prefix_tokens = num_stream_tokens - num_text_tokens
            self.started = True
        self.position.add_(num_stream_tokens)

    def mixer_state(self, layer_idx: int) -> tuple:
        conv = self.conv_states[layer_idx]
        if self.layer_types[layer_idx] == "deltanet":
            conv = tuple(conv.unbind(1))
        return conv, self.recurrent_states[layer_idx]

    def set_mixer_state(self, layer_idx: int, conv_state, recurrent_state: torch.Tensor) -> None:
        if isinstance(conv_state, tuple):
            self.conv_states[layer_idx].copy_(torch.stack(conv_state, dim=1))
        else:
            self.conv_states[layer_idx].copy_(conv_state)
        self.recurrent_states[layer_idx].copy_(recurrent_state)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin [B, 1, T, D] of stream ``positions`` [B, T], looked up in the tables (a gather, no math)."""
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def write_token(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Store one token's keys/values [B, Hkv, 1, D] at the device position; return the visible slots [slots].

        Full attention: slots <= position. Ring: after the write, slot s holds the newest stream index j = s
        (mod window) with j <= position, which is inside the window; slots > position were never written.
        """
        key_buffer, value_buffer = self.key_cache[layer_idx], self.value_cache[layer_idx]
        ring = self.ring_sizes[layer_idx]
        slot = self.position if ring is None else torch.remainder(self.position, ring)
        key_buffer.index_copy_(2, slot, keys.to(key_buffer.dtype))
        value_buffer.index_copy_(2, slot, values.to(value_buffer.dtype))
        return self.slot_index[: key_buffer.shape[2]] <= self.position

    def update_attention(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, sliding_window: Optional[int]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A multi-token forward (eager): store its keys/values [B, Hkv, T, D]; return the visible cached ones
        followed by the new ones, and the stream index of the first (as :meth:`NemotronFlashCache.update_attention`).
        """
        start, length = self.stream_length, keys.shape[2]
        key_buffer, value_buffer = self.key_cache[layer_idx], self.value_cache[layer_idx]
        ring = self.ring_sizes[layer_idx]
        first = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        if ring is None:
            old = torch.arange(first, start, device=keys.device)
            stored = torch.arange(start, start + length, device=keys.device)
        else:
            old = torch.arange(first, start, device=keys.device) % ring
            kept = min(length, ring)  # older new keys fall out of the window before the next query
            stored = torch.arange(start + length - kept, start + length, device=keys.device) % ring
        all_keys = torch.cat([key_buffer.index_select(2, old).to(keys.dtype), keys], dim=2)
        all_values = torch.cat([value_buffer.index_select(2, old).to(values.dtype), values], dim=2)
        key_buffer.index_copy_(2, stored, keys[:, :, length - stored.numel():].to(key_buffer.dtype))
        value_buffer.index_copy_(2, stored, values[:, :, length - stored.numel():].to(value_buffer.dtype))
        return all_keys, all_values, first

    def copy_from(self, other: "NemotronFlashStaticCache") -> None:
        """Take ``other``'s state (same layout and capacity), broadcasting it to every row when it has one row
        (one prompt prefilled once, decoded as a batch)."""
        if other.layer_types != self.layer_types or other.stream_capacity != self.stream_capacity:
            raise ValueError("NemotronFlashStaticCache.copy_from: the caches differ in layers or capacity")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"NemotronFlashStaticCache.copy_from: {other.batch_size} rows into {self.batch_size}")
        for mine, theirs in zip(self.buffers(), other.buffers()):
            mine.copy_(theirs.expand_as(mine))
        self.position.copy_(other.position)
        self.started, self.num_prefix_tokens = other.started, other.num_prefix_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search), in place."""
        for tensor in self.buffers():
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


class NemotronFlashRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.dtype != x.dtype:  # e.g. DeltaNet's output norm (fp32 input) in a bf16 model
            weight = inference_constant(self, f"weight_{x.dtype}", lambda w: w.to(x.dtype), self.weight)
        return rms_norm(x, weight, self.eps)


class NemotronFlashGatedRMSNorm(nn.Module):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: ``rmsnorm(y * silu(z)) * weight`` per channel group."""

    def __init__(self, dim: int, group_size: int, eps: float = MAMBA2_GATED_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(gate.float())
        weight = inference_constant(self, "weight", _fp32, self.weight)
        if self.group_size == gated.shape[-1]:
            normalized = F.rms_norm(gated, (self.group_size,), weight, self.eps)
        else:
            grouped = F.rms_norm(gated.unflatten(-1, (-1, self.group_size)), (self.group_size,), None, self.eps)
            normalized = grouped.flatten(-2) * weight
        return normalized.to(gate.dtype)


def _depthwise_conv(channels: int, kernel_size: int, bias: bool) -> nn.Conv1d:
    """Holds a [C, 1, K] depthwise kernel (+ bias); applied through :func:`causal_depthwise_conv1d`."""
    return nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias)


class PackableInputProjections:
    """For a module whose linears named in ``input_projections`` (no biases) all read the same input.

    :meth:`pack_projections` lays their weights out as consecutive row blocks of one tensor, each weight becoming a
    view of its block (the old storages are freed, so memory stays the same); :meth:`project` then computes all
    their outputs with one matmul. Decode steps gain from it: at batch 1 every matmul is a matrix-vector product,
    and one launch reading one larger weight is faster than several (cuBLAS reaches a larger share of the memory
    bandwidth). Parameter names and values, and so the state dict, are unchanged.
    """

    input_projections: tuple = ()

    def _linears(self) -> list:
        return [getattr(self, name) for name in self.input_projections]

    def _packed_weight(self) -> Optional[torch.Tensor]:
        """The packed weight while the linears' weights still are its row blocks: not after ``.to()`` or a
        reassigned weight (checked on the host; a compiled step takes the layout it was traced with)."""
        packed = getattr(self, "_packed_input_weight", None)
        if packed is None or torch.compiler.is_compiling():
            return packed
        address = packed.data_ptr()
        for weight in (linear.weight for linear in self._linears()):
            if (weight.data_ptr() != address or weight.device != packed.device or weight.dtype != packed.dtype
                    or not weight.is_contiguous()):
                self._packed_input_weight = None  # moved or replaced: let the stale copy go
                return None
            address += weight.numel() * weight.element_size()
        return packed

    @torch.no_grad()
    def pack_projections(self) -> None:
        """Pack the input projections' weights (see the class); nothing to do while they are packed."""
        if self._packed_weight() is not None:
            return
        weights = [linear.weight for linear in self._linears()]
        packed = torch.cat([weight.detach() for weight in weights])
        for weight, block in zip(weights, packed.split([w.shape[0] for w in weights])):
            weight.data = block
        self._packed_input_weight = packed

    def project(self, x: torch.Tensor) -> tuple:
        """``tuple(linear(x) for each input projection)``: one matmul when packed and no gradient is recorded."""
        linears = self._linears()
        packed = self._packed_weight()
        if packed is None or (torch.is_grad_enabled() and any(linear.weight.requires_grad for linear in linears)):
            return tuple(linear(x) for linear in linears)
        return F.linear(x, packed).split([linear.out_features for linear in linears], dim=-1)


class NemotronFlashDeltaNet(PackableInputProjections, nn.Module):
    """DeltaNet token mixer (released module name ``gla``): fla's DeltaNet with silu short convs, L2-normalized
    q/k, sigmoid beta, no output gate and one RMSNorm weight shared by all heads."""

    input_projections = ("q_proj", "k_proj", "v_proj", "b_proj")

    def __init__(self, config: NemotronFlashConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.q_conv1d = _depthwise_conv(inner, config.d_conv, bias=False)
        self.k_conv1d = _depthwise_conv(inner, config.d_conv, bias=False)
        self.v_conv1d = _depthwise_conv(inner, config.d_conv, bias=False)
        self.o_norm = NemotronFlashRMSNorm(self.head_dim, eps=DELTANET_OUTPUT_NORM_EPS)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if isinstance(cache, NemotronFlashStaticCache) and x.shape[1] == 1:
            return self._decode_step(x, cache)
        batch, seq_len, _ = x.shape
        conv_q, conv_k, conv_v = (None, None, None)
        initial_state = None
        if cache is not None:
            conv_states, initial_state = cache.mixer_state(self.layer_idx)
            if conv_states is not None:
                conv_q, conv_k, conv_v = conv_states

        q, k, v, b = self.project(x)
        q, conv_q = causal_depthwise_conv1d(q, self.q_conv1d.weight, None, conv_q)
        k, conv_k = causal_depthwise_conv1d(k, self.k_conv1d.weight, None, conv_k)
        v, conv_v = causal_depthwise_conv1d(v, self.v_conv1d.weight, None, conv_v)
        q, k, v = (F.silu(t).view(batch, seq_len, self.num_heads, self.head_dim) for t in (q, k, v))
        q, k = l2_normalize(q), l2_normalize(k)
        beta = b.float().sigmoid()

        # fla's kernels take bf16/fp16 only (its chunk kernel refuses fp32); fp32 models run the exact PyTorch path.
        use_fla = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        kernels = _fla_delta_rule_kernels() if use_fla else None
        if kernels is not None:
            # Same inputs and math as delta_rule_chunked (scale dk^-0.5, q/k normalized above); fla accumulates
            # in fp32 and returns the final state in fp32. Short inputs (decode) use the recurrent kernel.
            chunk_kernel, recurrent_kernel = kernels
            kernel = recurrent_kernel if seq_len <= 64 else chunk_kernel
            o, final_state = kernel(
                q=q, k=k, v=v, beta=beta.to(q.dtype), scale=self.head_dim**-0.5,
                initial_state=initial_state, output_final_state=cache is not None, use_qk_l2norm_in_kernel=False,
            )
        else:
            o, final_state = delta_rule_chunked(q, k, v, beta, initial_state)

        if cache is not None:
            cache.set_mixer_state(self.layer_idx, (conv_q, conv_k, conv_v), final_state)
        o = self.o_norm(o).to(x.dtype)
        return self.o_proj(o.reshape(batch, seq_len, -1))

    def _decode_step(self, x: torch.Tensor, cache: NemotronFlashStaticCache) -> torch.Tensor:
        """One token [B, 1, hidden] against the static cache: the same function as :meth:`forward`, with the three
        short convolutions done as one and the recurrence as one delta-rule step (states updated in place)."""
        batch = x.shape[0]
        x_token = x[:, 0]
        q, k, v, b = self.project(x_token)
        projected = torch.stack([q, k, v], dim=1)
        conv_weight = inference_constant(
            self, "stacked_conv_weight", lambda q, k, v: torch.stack([q, k, v])[:, :, 0].float(),
            self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight,
        )
        # fp32 from the convolution to the output norm (the chunked path rounds q, k, v to x's dtype in between).
        qkv = F.silu(causal_conv1d_step(projected, conv_weight, None, cache.conv_states[self.layer_idx]))
        qkv = qkv.unflatten(-1, (self.num_heads, self.head_dim))  # [B, 3, H, dk]
        # l2norm(t) = rms_norm(t, eps / dk) / sqrt(dk): one fused kernel for q and k. The delta-rule step scales q by
        # dk^-0.5 again, so q is divided by dk in all here and the step is told to scale by 1.
        scale = inference_constant(
            self, "qk_scale",
            lambda w: torch.tensor([self.head_dim**-1.0, self.head_dim**-0.5], device=w.device)[:, None, None],
            self.q_proj.weight,
        )
        q, k = (F.rms_norm(qkv[:, :2], (self.head_dim,), None, L2NORM_EPS / self.head_dim) * scale).unbind(1)
        beta = b.float().sigmoid()
        o = delta_rule_recurrent_step(q, k, qkv[:, 2], beta, cache.recurrent_states[self.layer_idx], scale=1.0)
        o = self.o_norm(o).to(x.dtype)
        return self.o_proj(o.reshape(batch, 1, -1))


class NemotronFlashMamba2(nn.Module):
    """Mamba2 token mixer (released module name ``mamba``): one B/C group, scalar A per head, D per head,
    gated RMSNorm before out_proj. ``in_proj`` rows are ordered [z, x, B, C, dt]."""

    def __init__(self, config: NemotronFlashConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner = config.mamba_expand * config.hidden_size
        self.head_dim = config.mamba2_headdim
        self.num_heads = self.d_inner // self.head_dim
        self.state_dim = config.mamba_d_state
        self.num_groups = 1
        conv_dim = self.d_inner + 2 * self.num_groups * self.state_dim
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + conv_dim + self.num_heads, bias=config.mamba_proj_bias)
        self.conv1d = _depthwise_conv(conv_dim, config.mamba_d_conv, bias=config.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = NemotronFlashGatedRMSNorm(self.d_inner, group_size=self.d_inner // self.num_groups)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.mamba_proj_bias)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if isinstance(cache, NemotronFlashStaticCache) and x.shape[1] == 1:
            return self._decode_step(x, cache)
        batch, seq_len, _ = x.shape
        conv_state = initial_state = None
        if cache is not None:
            conv_state, initial_state = cache.mixer_state(self.layer_idx)

        z, xBC, dt = torch.split(
            self.in_proj(x), [self.d_inner, self.d_inner + 2 * self.state_dim, self.num_heads], dim=-1
        )
        xBC, conv_state = causal_depthwise_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, conv_state)
        xBC = F.silu(xBC)
        x_ssm, B, C = torch.split(xBC, [self.d_inner, self.state_dim, self.state_dim], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y, final_state = mamba2_scan_chunked(
            x_ssm.reshape(batch, seq_len, self.num_heads, self.head_dim), dt, A, B, C, self.D, initial_state
        )
        if cache is not None:
            cache.set_mixer_state(self.layer_idx, conv_state, final_state)
        y = self.norm(y.reshape(batch, seq_len, self.d_inner), z)
        return self.out_proj(y)

    def _decode_step(self, x: torch.Tensor, cache: NemotronFlashStaticCache) -> torch.Tensor:
        """One token [B, 1, hidden] against the static cache: conv step and SSM step, states updated in place."""
        batch = x.shape[0]
        z, xBC, dt = torch.split(
            self.in_proj(x[:, 0]), [self.d_inner, self.d_inner + 2 * self.state_dim, self.num_heads], dim=-1
        )
        conv_weight = inference_constant(self, "conv_weight", lambda w: w[:, 0].float(), self.conv1d.weight)
        conv_bias = None
        if self.conv1d.bias is not None:
            conv_bias = inference_constant(self, "conv_bias", _fp32, self.conv1d.bias)
        # fp32 from the convolution on (the chunked path rounds x, B, C to x's dtype after it).
        xBC = F.silu(causal_conv1d_step(xBC, conv_weight, conv_bias, cache.conv_states[self.layer_idx]))
        x_ssm, B, C = torch.split(xBC, [self.d_inner, self.state_dim, self.state_dim], dim=-1)
        dt = F.softplus(dt.float() + inference_constant(self, "dt_bias", _fp32, self.dt_bias))
        A = inference_constant(self, "A", lambda a: -torch.exp(a.float()), self.A_log)
        D = inference_constant(self, "D", _fp32, self.D)
        y = mamba2_recurrent_step(x_ssm.reshape(batch, self.num_heads, self.head_dim), dt, A, B, C, D,
                                  cache.recurrent_states[self.layer_idx])
        y = self.norm(y.reshape(batch, 1, self.d_inner), z.unsqueeze(1))
        return self.out_proj(y)


class NemotronFlashAttention(PackableInputProjections, nn.Module):
    """Causal GQA softmax attention with RoPE over the full head dim, optional sliding window, no biases."""

    input_projections = ("q_proj", "k_proj", "v_proj")

    def __init__(self, config: NemotronFlashConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.rope_theta = config.rope_theta
        self.use_rope = config.rope
        self.attention_dropout = config.attention_dropout
        self.sliding_window = attention_window(config, layer_idx)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        decode_step = isinstance(cache, NemotronFlashStaticCache) and seq_len == 1
        q, k, v = self.project(x)
        q = q.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            if decode_step:
                cos, sin = cache.rotary(positions)
            else:
                cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, q.dtype)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if decode_step:
            return self._decode_step(q, k, v, cache)

        # Stream indices (memory + text tokens) of the queries and of the first key, for the causal/window mask.
        first_query_index = 0 if cache is None else cache.stream_length
        first_key_index = 0
        if cache is not None:
            k, v, first_key_index = cache.update_attention(self.layer_idx, k, v, self.sliding_window)

        num_keys = k.shape[2]
        if self.sliding_window is None and first_query_index == first_key_index:
            mask, is_causal = None, True  # prefill from an empty cache: plain causal
        elif self.sliding_window is None and seq_len == 1:
            mask, is_causal = None, False  # one decoded token sees every cached key
        else:
            query_index = first_query_index + torch.arange(seq_len, device=x.device)[:, None]
            key_index = first_key_index + torch.arange(num_keys, device=x.device)[None, :]
            mask = key_index <= query_index
            if self.sliding_window is not None:
                mask = mask & (key_index > query_index - self.sliding_window)
            is_causal = False

        repeats = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.attention_dropout if self.training else 0.0, scale=self.head_dim**-0.5,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))

    def _decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cache: NemotronFlashStaticCache) -> torch.Tensor:
        """One token (q [B, H, 1, D], k/v [B, Hkv, 1, D], RoPE applied) against the whole static buffer, masked
        by the device position."""
        batch = q.shape[0]
        visible = cache.write_token(self.layer_idx, k, v)
        keys, values = cache.key_cache[self.layer_idx], cache.value_cache[self.layer_idx]
        # Query head h reads KV head h // (H / Hkv) (as repeat_interleave pairs them): the query heads of a KV head
        # become query rows of it, so GQA needs no per-step copy of the buffer.
        grouped = q.reshape(batch, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        # Two batched matmuls, not SDPA: its kernels split the work by (batch, head, block of 64+ queries), so with
        # one token they walk the whole buffer on batch x Hkv SMs (cuDNN's: 0.18 ms per layer over 8k slots on an
        # H200, a quarter of the 1B's step); cuBLAS spreads the slots over the GPU. Scores come out of the matmul in
        # the cache's dtype (fp32-accumulated) and the softmax runs in fp32, as transformers' eager attention does.
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * self.head_dim**-0.5
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(values.dtype)
        out = torch.matmul(weights, values)
        return self.o_proj(out.reshape(batch, 1, -1))


class NemotronFlashMLP(PackableInputProjections, nn.Module):
    input_projections = ("gate_proj", "up_proj")

    def __init__(self, config: NemotronFlashConfig):
        super().__init__()
        ffn_dim = config.intermediate_size if config.intermediate_size else config.ffn_expand_ratio * config.hidden_size
        self.gate_proj = nn.Linear(config.hidden_size, ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)


class NemotronFlashMixerBlock(nn.Module):
    """``h + mixer(input_layernorm(h))`` for the "deltanet" (``gla``), "m2" (``mamba``) and "a" (``self_attn``)
    layer types; the attribute names are the released parameter names."""

    def __init__(self, config: NemotronFlashConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = NemotronFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.layer_type == "deltanet":
            self.gla = NemotronFlashDeltaNet(config, layer_idx)
        elif self.layer_type == "m2":
            self.mamba = NemotronFlashMamba2(config, layer_idx)
        elif self.layer_type == "a":
            self.self_attn = NemotronFlashAttention(config, layer_idx)
        else:
            raise ValueError(f"not a mixer layer type: {self.layer_type!r}")

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, cache: Optional[NemotronFlashCache]):
        normed = self.input_layernorm(hidden)
        if self.layer_type == "deltanet":
            return hidden + self.gla(normed, cache)
        if self.layer_type == "m2":
            return hidden + self.mamba(normed, cache)
        return hidden + self.self_attn(normed, positions, cache)


class NemotronFlashFFNBlock(nn.Module):
    """``h + ffn(pre_ffn_layernorm(h))`` for the "f" layer type."""

    def __init__(self, config: NemotronFlashConfig, layer_idx: int):
        super().__init__()
        self.pre_ffn_layernorm = NemotronFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn = NemotronFlashMLP(config)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, cache: Optional[NemotronFlashCache]):
        return hidden + self.ffn(self.pre_ffn_layernorm(hidden))


def _check_supported(config: NemotronFlashConfig) -> None:
    """Refuse released config options this implementation does not compute, instead of ignoring them."""
    unsupported = []
    if config.kq_norm not in (None, "none"):
        unsupported.append(f"kq_norm={config.kq_norm!r}")
    if config.rope_type not in (None, "default"):
        unsupported.append(f"rope_type={config.rope_type!r}")
    for name in ("attn_hidden_size", "kq_head_dim", "v_head_dim"):
        if getattr(config, name, -1) not in (None, -1):
            unsupported.append(f"{name}={getattr(config, name)}")
    if config.hidden_size % config.num_attention_heads or config.num_attention_heads % config.num_key_value_heads:
        unsupported.append("hidden_size / num_attention_heads / num_key_value_heads not divisible")
    if (config.mamba_expand * config.hidden_size) % config.mamba2_headdim:
        unsupported.append("mamba_expand * hidden_size not divisible by mamba2_headdim")
    if unsupported:
        raise NotImplementedError("NemotronFlash: unsupported configuration: " + ", ".join(unsupported))


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def _init_unless_loaded(tensor: torch.Tensor, init_fn) -> None:
    """Apply ``init_fn`` in place unless transformers marked the tensor as loaded from a checkpoint."""
    if not getattr(tensor, "_is_hf_initialized", False):
        with torch.no_grad():
            init_fn(tensor)


def _cache_argument(past_key_values, kwargs: dict):
    """The cache under either name: transformers 5.24 renamed ``past_key_values`` to ``cache`` (its ``generate``
    passes ``cache=``), older releases pass ``past_key_values=``; ignoring one would silently decode without
    history."""
    if "cache" not in kwargs:
        return past_key_values
    if past_key_values is not None:
        raise ValueError("pass the cache as either cache= or past_key_values=, not both")
    return kwargs.pop("cache")


class NemotronFlashPreTrainedModel(PreTrainedModel):
    config_class = NemotronFlashConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NemotronFlashMixerBlock", "NemotronFlashFFNBlock"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    # Recurrent states cannot be rewound: no assisted generation.
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache (it cannot hold recurrent states, and it interprets
        # config.layer_types); forward() creates a NemotronFlashCache on the first step instead.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Init for models built from a config; loaded checkpoints overwrite (and transformers skips) it."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init_unless_loaded(module.weight, lambda w: w.normal_(0.0, std))
            if getattr(module, "bias", None) is not None:
                _init_unless_loaded(module.bias, nn.init.zeros_)
        elif isinstance(module, nn.Conv1d):
            # PyTorch's default Conv1d init (what the released modules get): U(-1/sqrt(K), 1/sqrt(K)) for depthwise.
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            _init_unless_loaded(module.weight, lambda w: w.uniform_(-bound, bound))
            if module.bias is not None:
                _init_unless_loaded(module.bias, lambda b: b.uniform_(-bound, bound))
        elif isinstance(module, (NemotronFlashRMSNorm, NemotronFlashGatedRMSNorm)):
            _init_unless_loaded(module.weight, nn.init.ones_)
        elif isinstance(module, NemotronFlashMamba2):
            _init_unless_loaded(module.D, nn.init.ones_)
            # A = -exp(A_log) with exp(A_log) ~ U(1, 16).
            _init_unless_loaded(module.A_log, lambda a: a.copy_(torch.empty_like(a).uniform_(1.0, 16.0).log()))
            _init_unless_loaded(module.dt_bias, _init_mamba2_dt_bias)
        elif isinstance(module, NemotronFlashModel) and module.memory_tokens is not None:
            _init_unless_loaded(module.memory_tokens, lambda m: m.normal_(0.0, std))


def _init_mamba2_dt_bias(dt_bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
    """dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (mamba_ssm's Mamba2 init)."""
    dt = torch.exp(
        torch.empty_like(dt_bias, dtype=torch.float32).uniform_() * (math.log(dt_max) - math.log(dt_min))
        + math.log(dt_min)
    ).clamp(min=1e-4)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class NemotronFlashModel(NemotronFlashPreTrainedModel):
    """Embeddings, memory tokens, the block stack and the final norm; returns the text positions' hidden states."""

    def __init__(self, config: NemotronFlashConfig):
        super().__init__(config)
        _check_supported(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.num_memory_tokens = config.num_memory_tokens
        self.memory_tokens = (
            nn.Parameter(torch.zeros(config.num_memory_tokens, config.hidden_size))
            if config.num_memory_tokens > 0
            else None
        )
        self.layers = nn.ModuleList(
            NemotronFlashFFNBlock(config, i) if layer_type == "f" else NemotronFlashMixerBlock(config, i)
            for i, layer_type in enumerate(config.layer_types)
        )
        self.final_layernorm = NemotronFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[NemotronFlashCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[tuple, BaseModelOutputWithPast]:
        """``position_ids`` (optional) are text positions (0 = first text token); RoPE adds ``num_memory_tokens``.
        Without them, positions continue from the cache."""
        if kwargs.get("output_attentions"):
            raise NotImplementedError("NemotronFlash does not return attention weights")
        past_key_values = _cache_argument(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and (attention_mask.dim() != 2 or not bool(attention_mask.all())):
            raise ValueError(
                "NemotronFlash supports only unpadded batches: attention_mask must be 2-D and all ones "
                "(the recurrent DeltaNet/Mamba2 states would absorb padding tokens)."
            )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # Default: keep states for decoding in eval mode only (training would just hold on to them).
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; not caching.")
            use_cache = False

        if past_key_values is not None and not isinstance(
            past_key_values, (NemotronFlashCache, NemotronFlashStaticCache)
        ):
            raise TypeError(
                "past_key_values must be a NemotronFlashCache (from a previous forward) or a "
                f"NemotronFlashStaticCache (model.make_static_cache), got {type(past_key_values)}"
            )

        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, num_text_tokens, _ = hidden.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = NemotronFlashCache(self.config)
        static = isinstance(cache, NemotronFlashStaticCache)
        if static and (cache.batch_size != batch or cache.dtype != hidden.dtype or cache.device != hidden.device):
            raise ValueError(
                f"NemotronFlashStaticCache of batch {cache.batch_size}, {cache.dtype} on {cache.device} cannot take "
                f"a batch of {batch} in {hidden.dtype} on {hidden.device} (make it with model.make_static_cache)"
            )

        # Memory tokens start every sequence: prepend them when nothing has been seen yet.
        prepend = self.memory_tokens is not None and (cache is None or cache.is_empty)
        num_prefix = self.num_memory_tokens if prepend else 0
        if static and num_prefix + num_text_tokens > 1:
            cache.check_room(num_prefix + num_text_tokens)
        if static and position_ids is None:
            # Stream positions from the cache's device counter: no host-side length, so that one captured decode
            # step serves every position.
            offsets = torch.arange(num_prefix + num_text_tokens, device=hidden.device)
            positions = (cache.position + offsets).unsqueeze(0).expand(batch, -1)
        else:
            if position_ids is None:
                past_text = 0 if cache is None else cache.get_seq_length()
                position_ids = torch.arange(past_text, past_text + num_text_tokens, device=hidden.device)
            positions = position_ids.to(hidden.device).long().view(-1, num_text_tokens).expand(batch, -1)
            if self.memory_tokens is not None:
                positions = positions + self.num_memory_tokens
            if prepend:
                memory_positions = torch.arange(num_prefix, device=hidden.device).unsqueeze(0).expand(batch, -1)
                positions = torch.cat([memory_positions, positions], dim=1)
        if prepend:
            memory = self.memory_tokens.to(hidden.dtype).unsqueeze(0).expand(batch, -1, -1)
            hidden = torch.cat([memory, hidden], dim=1)

        all_hidden = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden[:, num_prefix:])
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, positions, None)
            else:
                hidden = layer(hidden, positions, cache)
        hidden = self.final_layernorm(hidden)[:, num_prefix:]
        if output_hidden_states:
            all_hidden.append(hidden)
        if cache is not None:
            cache.advance(num_text_tokens, num_text_tokens + num_prefix)

        all_hidden = tuple(all_hidden) if output_hidden_states else None
        next_cache = cache if use_cache else None
        if not return_dict:
            return tuple(t for t in (hidden, next_cache, all_hidden) if t is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=next_cache, hidden_states=all_hidden)


class NemotronFlashForCausalLM(NemotronFlashPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NemotronFlashConfig):
        super().__init__(config)
        self.model = NemotronFlashModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # (weight identity, version) -> 1 / ||row||: the norms of a frozen lm_head are computed once, not per step.
        self._inverse_row_norms = None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def make_static_cache(self, batch_size: int, max_length: int) -> NemotronFlashStaticCache:
        """A :class:`NemotronFlashStaticCache` for ``batch_size`` sequences of up to ``max_length`` text tokens
        (prompt + generated; memory tokens come on top), in this model's dtype and on its device."""
        return NemotronFlashStaticCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device)

    def pack_projections(self) -> None:
        """Pack the projections that read one input in every layer (see :class:`PackableInputProjections`): fewer,
        larger matrix-vector products per decode step. The graph-decode driver calls it."""
        for module in self.modules():
            if isinstance(module, PackableInputProjections):
                module.pack_projections()

    def output_row_inverse_norms(self) -> torch.Tensor:
        """1 / ||W_v|| (fp32) for each vocabulary row of the output embedding."""
        weight = self.lm_head.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return 1.0 / weight.float().norm(dim=1).clamp_min(1e-12)
        if torch.compiler.is_compiling() and self._inverse_row_norms is not None:
            # Inference under torch.compile (a compiled decode step): the norms computed by an eager call before
            # are a constant of the compiled code; the storage check below would only break its graph.
            return self._inverse_row_norms[1]
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype, weight.shape)
        if self._inverse_row_norms is None or self._inverse_row_norms[0] != key:
            self._inverse_row_norms = (key, 1.0 / weight.detach().float().norm(dim=1).clamp_min(1e-12))
        return self._inverse_row_norms[1]

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[NemotronFlashCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs,
    ) -> Union[tuple, CausalLMOutputWithPast]:
        """Logits (fp32) are ``h @ (W / ||W||_row)^T``. ``logits_to_keep``: 0 = all positions, n = the last n.
        ``labels`` give the usual shifted next-token cross-entropy (ignore index -100)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past_key_values = _cache_argument(past_key_values, kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        # Scaling the logits by 1/||W_v|| equals normalizing the rows of W, without materializing a normalized copy.
        logits = self.lm_head(hidden).float() * self.output_row_inverse_norms()

        loss = None
        if labels is not None:
            shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shifted_labels = labels[:, 1:].reshape(-1).to(logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)
            else:  # the Trainer's gradient-accumulation-aware normalization
                loss = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum")
                loss = loss / num_items_in_batch

        if not return_dict:
            output = (logits, outputs.past_key_values, outputs.hidden_states)
            output = tuple(t for t in output if t is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )


__all__ = [
    "NemotronFlashCache",
    "NemotronFlashStaticCache",
    "NemotronFlashForCausalLM",
    "NemotronFlashModel",
    "NemotronFlashPreTrainedModel",
]
