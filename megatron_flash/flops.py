"""FLOPs per token of a Nemotron-Flash model, for MFU.

Counted per token of one forward pass (a multiply-add is 2 FLOPs); training counts 3x (forward, backward for
activations, backward for weights), plus one more forward of the layers when they are recomputed
(``--recompute-activations``) and of the output layer when its logits are (``--recompute-logits``). Written down
per operation so that docs/performance.md can cite it:

* every projection matrix W [out, in]: 2 * out * in (q/k/v/b, in_proj, bc_proj, out projections, FFN, output layer);
* attention scores and values, causal: 2 * 2 * heads * head_dim * (average context) where the average context of
  a causal sequence of length S is (S + 1) / 2, or the window when it is shorter;
* DeltaNet, chunked form (chunk C = 64): per head 6 * d^2 (state read for q, state read for k, rank-1 state update)
  + 2 * C * d (intra-chunk attention, causal half of C x C);
* Mamba2 SSD, chunked (chunk C): per head 4 * P * N (state update and output read) + 2 * C * (N + P) (intra-chunk);
* depthwise convolutions: 2 * kernel per channel; norms, activations and softmax are not counted (as in the
  usual 6N accounting they are < 1%).

The meta positions count for every sequence, except in the FFN when it computes them once per micro-batch
(layers/shared_prefix.py): there they count once per ``micro_batch`` sequences.
"""

from __future__ import annotations

from megatron_flash.layers.shared_prefix import shares_meta_rows

CHUNK = 64


def forward_flops_per_token(config, vocab_size: int, seq_length: int, micro_batch: int = 1,
                            packed: bool = False) -> float:
    """Forward FLOPs per (text) token at sequence length ``seq_length`` (meta tokens add their share) in training
    micro-batches of ``micro_batch`` rows (packed: one row of documents)."""
    return (layer_flops_per_token(config, seq_length, micro_batch, packed)
            + output_flops_per_token(config, vocab_size))


def output_flops_per_token(config, vocab_size: int) -> float:
    """The output layer's (meta positions are dropped before it)."""
    return 2 * config.hidden_size * vocab_size


def layer_flops_per_token(config, seq_length: int, micro_batch: int = 1, packed: bool = False) -> float:
    """The decoder layers', per text token (meta positions are computed too, but only text tokens are counted)."""
    h = config.hidden_size
    total_len = seq_length + config.num_meta_tokens
    ffn_len = (seq_length + config.num_meta_tokens / micro_batch
               if shares_meta_rows(config, micro_batch, packed, training=True) else total_len)
    flops = ffn_flops = 0.0
    for char in config.layer_pattern:
        if char == "F":
            ffn_flops += 2 * 3 * h * config.ffn_hidden_size
        elif char in "AS":
            hd, nq, nkv = config.kv_channels, config.num_attention_heads, config.num_query_groups
            flops += 2 * h * hd * (nq + 2 * nkv) + 2 * nq * hd * h
            context = (total_len + 1) / 2
            if char == "S" and config.sliding_window:
                context = min(context, config.sliding_window)
            flops += 2 * 2 * nq * hd * context
        elif char == "D":
            heads, d = config.deltanet_heads, config.deltanet_head_dim
            flops += 2 * h * heads * (3 * d + 1) + 2 * heads * d * h
            flops += 2 * config.deltanet_conv_kernel * 3 * heads * d
            flops += heads * (6 * d * d + 2 * CHUNK * d)
        elif char == "M":
            inner, heads, p, n = config.mamba_inner_size, config.mamba_heads, config.mamba_head_dim, \
                config.mamba_state_dim
            groups = config.mamba_num_groups
            flops += 2 * h * (2 * inner + heads + 2 * groups * n) + 2 * inner * h
            flops += 2 * config.mamba_conv_kernel * (inner + 2 * groups * n)
            flops += heads * (4 * p * n + 2 * config.mamba_chunk_size * (n + p))
    return (flops * total_len + ffn_flops * ffn_len) / seq_length


def train_flops_per_token(config, vocab_size: int, seq_length: int, recompute_layers: bool = False,
                          recompute_logits: bool = False, micro_batch: int = 1, packed: bool = False) -> float:
    """Forward, two backward passes, and the recomputed forwards: layer recompute reruns the decoder layers only
    (megatron's checkpointing wraps the layers, not the output layer)."""
    return (3.0 * forward_flops_per_token(config, vocab_size, seq_length, micro_batch, packed)
            + (layer_flops_per_token(config, seq_length, micro_batch, packed) if recompute_layers else 0.0)
            + (output_flops_per_token(config, vocab_size) if recompute_logits else 0.0))
