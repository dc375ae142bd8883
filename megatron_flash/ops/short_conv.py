"""Depthwise causal short convolution (DeltaNet's q/k/v convs, Mamba2's xBC conv).

``y[t, c] = act(bias[c] + sum_{i<K} weight[c, i] * x[t - K + 1 + i, c])``, with x = 0 before a sequence starts
(or taken from ``initial_state``). Layout follows fla: x is [B, T, C], weight [C, K], states [N, C, K] holding the
last K inputs of each sequence; x may have any strides (e.g. a slice of a projection's output). With
``cu_seqlens`` (B must be 1) every document restarts from zero (or from its row of ``initial_state``).

Backends:
* ``triton`` (``short_conv_triton``: reads x in place through its strides; no states): what ``auto`` picks on
  CUDA tensors for training, where no state goes in or out;
* ``fla`` (fla's Triton kernel, CUDA tensors; it copies a strided x first): ``auto``'s pick on CUDA with states;
* ``torch`` (F.conv1d, any device).
The loop in :func:`causal_conv1d_reference` is the definition all are tested against.

``history`` H makes x's first H rows the window of the others only (a shared prefix's last rows, in place of a
state: layers/shared_prefix.py): y has T - H rows. The ``triton`` kernels read back past their first output;
the others compute the H rows' outputs and drop them.

``sections`` S > 1 returns y as [B, T, S, C/S], the channels cut into S equal sections (DeltaNet's q, k, v). The
``triton`` backend stores it section-major, so that each section ``y[:, :, i]`` is contiguous: fla's delta-rule
kernels copy non-contiguous q, k and v first. The other backends return their [B, T, C] result unflattened.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # fla's Triton kernel: used for CUDA tensors when installed
    from fla.modules.causal_conv1d import causal_conv1d as _fla_causal_conv1d
except ImportError:  # pragma: no cover - fla is an optional (gpu) dependency
    _fla_causal_conv1d = None

try:  # our Triton kernels: need triton
    from megatron_flash.ops.short_conv_triton import causal_conv1d_triton as _triton_causal_conv1d
except ImportError:  # pragma: no cover - triton is an optional (gpu) dependency
    _triton_causal_conv1d = None

BACKENDS = ("auto", "triton", "fla", "torch")


def conv_init_(tensor: torch.Tensor, kernel: int) -> None:
    """nn.Conv1d's default initialization for a depthwise conv's weight [C, K] or bias [C]:
    kaiming_uniform_(a=sqrt(5)) with fan_in = K, i.e. U(-1/sqrt(K), 1/sqrt(K))."""
    bound = 1.0 / math.sqrt(kernel)
    torch.nn.init.uniform_(tensor, -bound, bound)


def _check_packed(cu_seqlens, batch):
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed documents), got batch {batch}")


def _segments(cu_seqlens, batch, length):
    if cu_seqlens is None:
        return None
    _check_packed(cu_seqlens, batch)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the sequence length {length}")
    return list(zip(bounds[:-1], bounds[1:]))


def _is_silu(activation) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return activation is not None


def _activate(y, activation):
    return F.silu(y) if _is_silu(activation) else y


def causal_conv1d_reference(x, weight, bias=None, activation=None, cu_seqlens=None, initial_state=None):
    """Plain loop over taps and documents: the definition. Returns y only."""
    batch, length, channels = x.shape
    k = weight.shape[1]
    segments = _segments(cu_seqlens, batch, length) or [(0, length)]
    rows = range(batch) if cu_seqlens is None else [0] * len(segments)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    y = torch.zeros_like(x, dtype=acc_dtype)
    for n, (row, (start, end)) in enumerate(zip(rows, segments if cu_seqlens is not None else segments * batch)):
        history = (initial_state[n].to(acc_dtype).t() if initial_state is not None
                   else x.new_zeros(k, channels, dtype=acc_dtype))  # [K, C], oldest first
        seq = torch.cat([history, x[row, start:end].to(acc_dtype)], dim=0)
        for t in range(end - start):
            acc = bias.to(acc_dtype).clone() if bias is not None else x.new_zeros(channels, dtype=acc_dtype)
            for i in range(k):
                acc = acc + weight[:, i].to(acc_dtype) * seq[t + 1 + i]
            y[row, start + t] = acc
    return _activate(y, activation).to(x.dtype)


def _torch_conv(x, weight, bias, activation, history, output_final_state):
    """One sequence batch [B, T, C] with optional history [B, C, K]."""
    k = weight.shape[1]
    xt = x.transpose(1, 2)  # [B, C, T]
    if history is None:
        padded = F.pad(xt, (k - 1, 0))
    else:
        padded = torch.cat([history[..., 1:].to(xt.dtype), xt], dim=-1)
    y = F.conv1d(padded, weight.unsqueeze(1), bias, groups=weight.shape[0]).transpose(1, 2)
    final = None
    if output_final_state:
        full = torch.cat([history if history is not None else xt.new_zeros(*xt.shape[:2], k), xt], dim=-1)
        final = full[..., -k:]
    return _activate(y, activation), final


def _torch_causal_conv1d(x, weight, bias, activation, cu_seqlens, initial_state, output_final_state):
    """The torch backend: one conv of the batch, or one per packed document."""
    segments = _segments(cu_seqlens, x.shape[0], x.shape[1])
    if segments is None:
        return _torch_conv(x, weight, bias, activation, initial_state, output_final_state)
    outs, finals = [], []
    for n, (start, end) in enumerate(segments):
        hist = initial_state[n:n + 1] if initial_state is not None else None
        y, final = _torch_conv(x[:, start:end], weight, bias, activation, hist, output_final_state)
        outs.append(y)
        finals.append(final)
    return torch.cat(outs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)


def _resolve_backend(backend, x, with_states):
    if backend not in BACKENDS:
        raise ValueError(f"unknown short-conv backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if x.is_cuda and _triton_causal_conv1d is not None and not with_states:
        return "triton"
    return "fla" if (x.is_cuda and _fla_causal_conv1d is not None) else "torch"


def causal_conv1d(x, weight, bias=None, activation=None, cu_seqlens=None, initial_state=None,
                  output_final_state=False, backend="auto", *, sections: int = 1, history: int = 0):
    """Depthwise causal conv of x [B, T, C]. Returns (y [B, T, C], final_state [N, C, K] or None); with
    ``sections`` S > 1 (dividing C), y is [B, T, S, C/S], each section contiguous on the triton backend.
    ``history`` H: x's first H rows are only the window of the later ones (a shared prefix's last rows, in place
    of a state): y has T - H rows, and the history rows get the gradient of their reads."""
    channels = x.shape[-1]
    if sections < 1 or channels % sections:
        raise ValueError(f"sections {sections} must divide the {channels} channels")
    if history and not 0 < history < x.shape[1]:
        raise ValueError(f"history {history} must be shorter than the sequence ({x.shape[1]})")
    if history and (cu_seqlens is not None or initial_state is not None or output_final_state):
        raise ValueError("history rows take the place of an initial state: no cu_seqlens or states with them")
    backend = _resolve_backend(backend, x, initial_state is not None or output_final_state)
    if backend == "triton":
        if _triton_causal_conv1d is None:
            raise RuntimeError("short-conv backend 'triton' needs triton (pip install '.[gpu]')")
        if initial_state is not None or output_final_state:
            raise ValueError("short-conv backend 'triton' takes no states: use 'fla' or 'torch'")
        _check_packed(cu_seqlens, x.shape[0])  # the bounds themselves stay on the device: reading them would sync
        return _triton_causal_conv1d(x, weight, bias, _is_silu(activation), cu_seqlens, sections, history), None
    if backend == "fla":
        if _fla_causal_conv1d is None:
            raise RuntimeError("short-conv backend 'fla' needs flash-linear-attention (pip install '.[gpu]')")
        y, final = _fla_causal_conv1d(x=x, weight=weight, bias=bias, initial_state=initial_state,
                                      output_final_state=output_final_state, activation=activation,
                                      cu_seqlens=cu_seqlens, backend="triton")
    else:
        y, final = _torch_causal_conv1d(x, weight, bias, activation, cu_seqlens, initial_state, output_final_state)
    y = y[:, history:] if history else y
    return (y.unflatten(-1, (sections, channels // sections)) if sections > 1 else y), final
