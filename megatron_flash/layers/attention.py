"""Attention mixer: megatron-core SelfAttention (GQA, RoPE) with a core attention on torch SDPA.

Without Transformer Engine megatron's local DotProductAttention materializes the full score matrix and supports
neither packed sequences nor sliding windows. :class:`SDPAttention` takes its place in the local spec: causal,
optional sliding window (layers marked 'S' in the pattern) and document masks from ``packed_seq_params``, through
``torch.nn.functional.scaled_dot_product_attention`` (flash kernel on GPU for plain causal attention).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_flash.layers.base import READS_RESIDUAL, WRITES_RESIDUAL, MixerInputs, mark_weight_norm
from megatron_flash.ops.rope import apply_rope, rope_angles


def window_of(config, layer_number: int) -> Optional[int]:
    """The sliding window of a (1-based) layer, None for full attention."""
    return config.sliding_window if config.layer_pattern[layer_number - 1] == "S" else None


def attention_mask(seq_len: int, device, window: Optional[int] = None,
                   cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean [s, s] mask, True where a query may attend: causal, within ``window``, within its document."""
    pos = torch.arange(seq_len, device=device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    if cu_seqlens is not None:
        doc = torch.bucketize(pos, cu_seqlens[1:].to(device), right=True)
        allowed &= doc[:, None] == doc[None, :]
    return allowed


class SDPAttention(MegatronModule):
    """Core attention (q, k, v -> context) over torch SDPA, a drop-in for megatron's DotProductAttention."""

    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal, attention_type="self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by SDPAttention")
        self.window = window_of(config, layer_number)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask_: Optional[torch.Tensor] = None,
                attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn].

        Packed ("thd") inputs come without the batch dimension: [t, np, hn] -> [t, np * hn].
        """
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        if query.dim() == 3:
            return self.forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), attention_mask_,
                                packed_seq_params=packed_seq_params).squeeze(1)
        sq, b, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        if attention_mask_ is not None:
            mask, causal = ~attention_mask_, False  # megatron's convention: True = masked out
        elif self.window is None and cu is None:
            mask, causal = None, True
        else:
            mask, causal = attention_mask(sq, query.device, self.window, cu), False
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=k.shape[1] != heads)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


class AttentionMixer(SelfAttention):
    """Causal self-attention as a mixer: GQA, RoPE on every head, full or sliding window.

    RoPE is applied here, fused (ops/rope.py), not by megatron's SelfAttention.forward, whose RoPE without Transformer
    Engine is unfused: forward hands megatron no angles and keeps them for :meth:`get_query_key_value_tensors`, the
    hook megatron calls for q, k and v (SelfAttention.forward takes no other per-call input that could carry them).
    """

    def __init__(self, config, layer_number: int, submodules, pg_collection=None):
        super().__init__(config, submodules, layer_number, attn_mask_type=AttnMaskType.causal,
                         pg_collection=pg_collection)
        mark_weight_norm(self.linear_qkv.weight, READS_RESIDUAL)
        mark_weight_norm(self.linear_proj.weight, WRITES_RESIDUAL)
        self._rope_angles = self._cu_seqlens = None  # this forward's RoPE angle table [n, 1, 1, d], documents

    def forward(self, hidden_states: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        self._rope_angles, self._cu_seqlens = inputs.rotary_pos_emb, None
        if inputs.packed_seq_params is not None:
            self._cu_seqlens = inputs.packed_seq_params.cu_seqlens_q
        try:
            out, bias = super().forward(hidden_states, attention_mask=inputs.attention_mask, rotary_pos_emb=None,
                                        packed_seq_params=inputs.packed_seq_params)
        finally:
            self._rope_angles = self._cu_seqlens = None
        return out if bias is None else out + bias

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        """megatron's q [s, b, heads, d], k, v [s, b, kv heads, d], with RoPE applied to q and k."""
        query, key, value = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                                output_gate=output_gate, split_qkv=split_qkv)
        if self._rope_angles is not None:
            angles = rope_angles(self._rope_angles, query.shape[0], self._cu_seqlens)
            query, key = apply_rope(query, angles), apply_rope(key, angles)
        return query, key, value
