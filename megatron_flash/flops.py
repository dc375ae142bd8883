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

The meta positions count for every sequence, except in the layers that compute them once per micro-batch
(layers/shared_prefix.py): there they count once per ``micro_batch`` sequences (the FFN), plus, in DeltaNet's and
Mamba2's input projections, the kernel - 1 rows of the text's conv window that each sequence projects again; once
per ``micro_batch * prefix_microbatches`` sequences where an optimizer step of ``prefix_microbatches``
micro-batches computes them once (MetaPrefix; that pass's attention over the meta rows, once per step, is not
counted).
"""

from __future__ import annotations

from typing import NamedTuple

from megatron_flash.layers.shared_prefix import meta_rows_shareable

CHUNK = 64


def forward_flops_per_token(config, vocab_size: int, seq_length: int, micro_batch: int = 1,
                            packed: bool = False, prefix_microbatches: int = 1) -> float:
    """Forward FLOPs per (text) token at sequence length ``seq_length`` (meta tokens add their share) in training
    micro-batches of ``micro_batch`` rows (packed: one row of documents), ``prefix_microbatches`` of them sharing
    one computation of the meta prefix."""
    return (layer_flops_per_token(config, seq_length, micro_batch, packed, prefix_microbatches)
            + output_flops_per_token(config, vocab_size))


def output_flops_per_token(config, vocab_size: int) -> float:
    """The output layer's (meta positions are dropped before it)."""
    return 2 * config.hidden_size * vocab_size


class MixerRowFlops(NamedTuple):
    """A DeltaNet or Mamba2 layer's forward FLOPs per row, by the rows they apply to."""
    input_projections: float  # per row the layer projects
    output_projection: float  # per row it outputs
    sequence: float  # short convs and scan, per row it outputs


def mixer_flops_per_row(config, char: str) -> MixerRowFlops:
    """DeltaNet's (``char`` "D") or Mamba2's ("M"). A layer that runs the meta prefix once projects kernel - 1
    rows more than it outputs per sequence: the text starts on the prefix's last rows, its short convs' window."""
    h = config.hidden_size
    if char == "D":
        heads, d, kernel = config.deltanet_heads, config.deltanet_head_dim, config.deltanet_conv_kernel
        return MixerRowFlops(input_projections=2 * h * heads * (3 * d + 1), output_projection=2 * heads * d * h,
                             sequence=2 * kernel * 3 * heads * d + heads * (6 * d * d + 2 * CHUNK * d))
    if char == "M":
        inner, heads, p, n = config.mamba_inner_size, config.mamba_heads, config.mamba_head_dim, \
            config.mamba_state_dim
        groups, kernel = config.mamba_num_groups, config.mamba_conv_kernel
        return MixerRowFlops(input_projections=2 * h * (2 * inner + heads + 2 * groups * n),
                             output_projection=2 * inner * h,
                             sequence=(2 * kernel * (inner + 2 * groups * n)
                                       + heads * (4 * p * n + 2 * config.mamba_chunk_size * (n + p))))
    raise ValueError(f"layer {char!r} is not a DeltaNet ('D') or Mamba2 ('M') layer")


def rows_per_sequence(config, seq_length: int, shared: bool, sequences_per_prefix: int) -> float:
    """Rows a layer computes per sequence, meta rows included: every one, or where it ``shared`` the meta rows,
    the text and its share of one computation of them per ``sequences_per_prefix`` sequences."""
    return seq_length + config.num_meta_tokens / (sequences_per_prefix if shared else 1)


def layer_shares_meta_rows(config, layer_flag: bool, micro_batch: int, packed: bool) -> bool:
    """Whether a layer whose config flag is ``layer_flag`` computes the meta rows once in these micro-batches."""
    return layer_flag and meta_rows_shareable(config, micro_batch, packed, training=True)


def mixer_rows(config, char: str, seq_length: int, micro_batch: int = 1, packed: bool = False,
               prefix_microbatches: int = 1):
    """(rows projected, rows output) per sequence of a DeltaNet or Mamba2 layer, meta rows included: with the
    prefix once per micro-batch (or per ``prefix_microbatches`` of them), its share of the meta rows, and the
    kernel - 1 window rows projected again."""
    shared = layer_shares_meta_rows(config, config.share_meta_prefix_in_mixers, micro_batch, packed)
    output = rows_per_sequence(config, seq_length, shared, micro_batch * prefix_microbatches)
    kernel = config.deltanet_conv_kernel if char == "D" else config.mamba_conv_kernel
    return output + (kernel - 1 if shared else 0), output


def layer_flops_per_token(config, seq_length: int, micro_batch: int = 1, packed: bool = False,
                          prefix_microbatches: int = 1) -> float:
    """The decoder layers', per text token (meta positions are computed too, but only text tokens are counted)."""
    h = config.hidden_size
    total_len = seq_length + config.num_meta_tokens
    ffn_len = rows_per_sequence(config, seq_length,
                                layer_shares_meta_rows(config, config.share_meta_rows, micro_batch, packed),
                                micro_batch * prefix_microbatches)

    flops = 0.0
    for char in config.layer_pattern:
        if char == "F":
            flops += 2 * 3 * h * config.ffn_hidden_size * ffn_len
        elif char in "AS":
            hd, nq, nkv = config.kv_channels, config.num_attention_heads, config.num_query_groups
            context = (total_len + 1) / 2
            if char == "S" and config.sliding_window:
                context = min(context, config.sliding_window)
            per_row = 2 * h * hd * (nq + 2 * nkv) + 2 * nq * hd * h + 2 * 2 * nq * hd * context
            flops += per_row * total_len
        elif char in "DM":
            per_row = mixer_flops_per_row(config, char)
            projected, output = mixer_rows(config, char, seq_length, micro_batch, packed, prefix_microbatches)
            flops += per_row.input_projections * projected + (per_row.output_projection + per_row.sequence) * output
    return flops / seq_length


def train_flops_per_token(config, vocab_size: int, seq_length: int, recompute_layers: bool = False,
                          recompute_logits: bool = False, micro_batch: int = 1, packed: bool = False,
                          prefix_microbatches: int = 1) -> float:
    """Forward, two backward passes, and the recomputed forwards: layer recompute reruns the decoder layers only
    (megatron's checkpointing wraps the layers, not the output layer)."""
    return (3.0 * forward_flops_per_token(config, vocab_size, seq_length, micro_batch, packed, prefix_microbatches)
            + (layer_flops_per_token(config, seq_length, micro_batch, packed) if recompute_layers else 0.0)
            + (output_flops_per_token(config, vocab_size) if recompute_logits else 0.0))
