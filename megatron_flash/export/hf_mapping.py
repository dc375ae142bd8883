"""The one table between Megatron parameter names and NVIDIA's released Hugging Face names, used both ways.

Megatron names are those of ``model.sharded_state_dict()`` at TP=1 (global layer indices ``decoder.layers.{i}.``),
i.e. full logical tensors. HF names are those of ``megatron_flash/hf/modeling_nemotron_flash.py`` (the released
layout). A :class:`Rule` maps a group of Megatron tensors to a group of HF tensors with a pair of inverse functions;
:data:`GLOBAL_RULES`, :data:`UNTIED_RULES` and :data:`LAYER_RULES` (per pattern character) are the whole mapping.
:func:`megatron_to_hf` and :func:`hf_to_megatron` walk the same table, so the two directions cannot drift apart.

Fused Megatron tensors and their released pieces (d: head dim, H: heads, P: Mamba2 head dim, N: state size):

* attention ``linear_qkv`` rows per query group g: [q of the group's H/G heads, k_g, v_g] <-> q/k/v_proj;
* FFN ``linear_fc1`` = [gate; up] <-> gate_proj / up_proj;
* DeltaNet ``in_proj`` [q; k; v; b] <-> q/k/v/b_proj, ``conv_weight`` [q; k; v] <-> q/k/v_conv1d [H*d, 1, K];
* Mamba2 ``in_proj`` [z; x; dt] and ``bc_proj_weight`` [B; C] <-> ``in_proj`` [z, x, B, C, dt];
  ``conv_x_*`` and ``conv_bc_*`` <-> ``conv1d`` over [x, B, C];
* the embedding (and untied output layer) lose their vocabulary padding rows on export and get zero rows back on
  import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from megatron_flash import patterns


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the tensor, field or folder."""


# --------------------------------------------------------------------------------------------------------------
# Dimensions shared by both sides
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """The sizes the mapping needs, derivable from a Megatron config or from a released config.json alike."""

    layer_pattern: str  # one character per layer (megatron_flash.patterns), 'S' for sliding-window attention
    hidden: int
    vocab_size: int  # real vocabulary (HF rows)
    padded_vocab_size: int  # Megatron rows
    heads: int  # attention and DeltaNet heads
    kv_heads: int  # attention query groups
    head_dim: int  # attention and DeltaNet head dim
    ffn: int
    mamba_heads: int
    mamba_head_dim: int
    mamba_state: int  # N, one B/C group
    tied: bool

    @classmethod
    def from_megatron(cls, config, vocab_size: int, tied: bool) -> "Dims":
        """From a megatron_flash NemotronFlashConfig; refuses what the released layout cannot hold."""
        from megatron_flash.models.model import padded_vocab_size

        problems = []
        head_dim = config.hidden_size // config.num_attention_heads
        if config.hidden_size % config.num_attention_heads:
            problems.append(f"hidden_size {config.hidden_size} not divisible by num_attention_heads "
                            f"{config.num_attention_heads}")
        if config.kv_channels != head_dim:
            problems.append(f"kv_channels {config.kv_channels} != hidden_size / num_attention_heads = {head_dim}")
        if "D" in config.layer_pattern and config.deltanet_head_dim != head_dim:
            problems.append(f"deltanet_head_dim {config.deltanet_head_dim} != hidden_size / num_attention_heads")
        if "M" in config.layer_pattern and config.mamba_num_groups != 1:
            problems.append(f"mamba_num_groups {config.mamba_num_groups} (the released Mamba2 has one B/C group)")
        if problems:
            raise ConversionError("this Megatron model has no released-layout equivalent: " + "; ".join(problems))
        return cls(
            layer_pattern=config.layer_pattern, hidden=config.hidden_size, vocab_size=vocab_size,
            padded_vocab_size=padded_vocab_size(vocab_size), heads=config.num_attention_heads,
            kv_heads=config.num_query_groups, head_dim=head_dim, ffn=config.ffn_hidden_size,
            mamba_heads=config.mamba_heads, mamba_head_dim=config.mamba_head_dim, mamba_state=config.mamba_state_dim,
            tied=tied)

    @classmethod
    def from_hf(cls, config) -> "Dims":
        """From a released-layout NemotronFlashConfig (megatron_flash/hf)."""
        from megatron_flash.models.model import padded_vocab_size

        inner = config.mamba_expand * config.hidden_size
        return cls(
            layer_pattern=patterns.from_layer_types(config.layer_types, config.sliding_window,
                                                    config.global_attn_idx or ()),
            hidden=config.hidden_size, vocab_size=config.vocab_size,
            padded_vocab_size=padded_vocab_size(config.vocab_size), heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads, head_dim=config.hidden_size // config.num_attention_heads,
            ffn=config.intermediate_size or config.ffn_expand_ratio * config.hidden_size,
            mamba_heads=inner // config.mamba2_headdim, mamba_head_dim=config.mamba2_headdim,
            mamba_state=config.mamba_d_state, tied=bool(config.tie_word_embeddings))

    @property
    def mamba_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim


# --------------------------------------------------------------------------------------------------------------
# Tensor transforms (each with its inverse)
# --------------------------------------------------------------------------------------------------------------

Transform = Callable[[Sequence[torch.Tensor], Dims], Sequence[torch.Tensor]]


def identity(tensors: Sequence[torch.Tensor], dims: Dims) -> Sequence[torch.Tensor]:
    return list(tensors)


def split_per_group(tensor: torch.Tensor, groups: int, sizes: Sequence[int]) -> list:
    """Rows grouped as [part_0 (sizes[0]), part_1, ...] per group -> each part over all groups."""
    if tensor.shape[0] != groups * sum(sizes):
        raise ConversionError(f"expected {groups} x {sum(sizes)} = {groups * sum(sizes)} rows, got {tensor.shape[0]}")
    per_group = tensor.reshape(groups, sum(sizes), *tensor.shape[1:])
    return [part.reshape(groups * size, *tensor.shape[1:]) for part, size in
            zip(per_group.split(list(sizes), dim=1), sizes)]


def merge_per_group(parts: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """The inverse of :func:`split_per_group`."""
    for part in parts:
        if part.shape[0] % groups:
            raise ConversionError(f"{part.shape[0]} rows do not split into {groups} groups")
    grouped = [part.reshape(groups, part.shape[0] // groups, *part.shape[1:]) for part in parts]
    merged = torch.cat(grouped, dim=1)
    return merged.reshape(-1, *merged.shape[2:])


def _strip_vocab(tensors, dims):
    (weight,) = tensors
    if weight.shape[0] != dims.padded_vocab_size:
        raise ConversionError(f"expected {dims.padded_vocab_size} (padded vocabulary) rows, got {weight.shape[0]}")
    return [weight[:dims.vocab_size]]


def _pad_vocab(tensors, dims):
    (weight,) = tensors
    if weight.shape[0] != dims.vocab_size:
        raise ConversionError(f"expected {dims.vocab_size} (vocab_size) rows, got {weight.shape[0]}")
    padding = weight.new_zeros(dims.padded_vocab_size - dims.vocab_size, *weight.shape[1:])
    return [torch.cat([weight, padding])]


def _qkv_sizes(dims):
    return [dims.heads // dims.kv_heads * dims.head_dim, dims.head_dim, dims.head_dim]


def _split_qkv(tensors, dims):
    return split_per_group(tensors[0], dims.kv_heads, _qkv_sizes(dims))


def _merge_qkv(tensors, dims):
    return [merge_per_group(tensors, dims.kv_heads)]


def _split_fc1(tensors, dims):
    return split_per_group(tensors[0], 1, [dims.ffn, dims.ffn])


def _merge_fc1(tensors, dims):
    return [torch.cat(list(tensors))]


def _deltanet_sections(dims):
    return [dims.heads * dims.head_dim] * 3


def _split_deltanet_in_proj(tensors, dims):
    return split_per_group(tensors[0], 1, _deltanet_sections(dims) + [dims.heads])


def _merge_deltanet_in_proj(tensors, dims):
    return [torch.cat(list(tensors))]


def _split_deltanet_conv(tensors, dims):
    return [w.unsqueeze(1) for w in split_per_group(tensors[0], 1, _deltanet_sections(dims))]


def _merge_deltanet_conv(tensors, dims):
    return [torch.cat([_squeeze_conv(w) for w in tensors])]


def _squeeze_conv(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 3 or weight.shape[1] != 1:
        raise ConversionError(f"expected a depthwise conv weight [C, 1, K], got {list(weight.shape)}")
    return weight.squeeze(1)


def _mamba_in_proj_to_hf(tensors, dims):
    in_proj, bc_proj = tensors
    z, x, dt = split_per_group(in_proj, 1, [dims.mamba_inner, dims.mamba_inner, dims.mamba_heads])
    return [torch.cat([z, x, bc_proj, dt])]


def _mamba_in_proj_to_megatron(tensors, dims):
    (in_proj,) = tensors
    inner, bc, heads = dims.mamba_inner, 2 * dims.mamba_state, dims.mamba_heads
    if in_proj.shape[0] != 2 * inner + bc + heads:
        raise ConversionError(f"expected 2 x {inner} + {bc} + {heads} rows [z, x, B, C, dt], got {in_proj.shape[0]}")
    z, x, bc_proj, dt = in_proj.split([inner, inner, bc, heads])
    return [torch.cat([z, x, dt]), bc_proj.clone()]


def _mamba_conv_to_hf(tensors, dims):
    conv_x, conv_bc = tensors
    return [torch.cat([conv_x, conv_bc]).unsqueeze(1)]


def _mamba_conv_to_megatron(tensors, dims):
    x, bc = _squeeze_conv(tensors[0]).split([dims.mamba_inner, 2 * dims.mamba_state])
    return [x.clone(), bc.clone()]


def _mamba_conv_bias_to_hf(tensors, dims):
    return [torch.cat(list(tensors))]


def _mamba_conv_bias_to_megatron(tensors, dims):
    x, bc = tensors[0].split([dims.mamba_inner, 2 * dims.mamba_state])
    return [x.clone(), bc.clone()]


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Megatron tensors ``megatron`` <-> HF tensors ``hf`` (names relative to a prefix), through inverse functions."""

    megatron: tuple
    hf: tuple
    to_hf: Transform = identity
    to_megatron: Transform = identity


def _same(megatron: str, hf: str) -> Rule:
    return Rule((megatron,), (hf,))


GLOBAL_RULES = (
    Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), _strip_vocab, _pad_vocab),
    _same("meta_tokens", "model.memory_tokens"),
    _same("decoder.final_norm.weight", "model.final_layernorm.weight"),
)
UNTIED_RULES = (Rule(("output_layer.weight",), ("lm_head.weight",), _strip_vocab, _pad_vocab),)

_ATTENTION = ("self_attn", "input_layernorm", (
    Rule(("mixer.linear_qkv.weight",), ("q_proj.weight", "k_proj.weight", "v_proj.weight"), _split_qkv, _merge_qkv),
    _same("mixer.linear_proj.weight", "o_proj.weight"),
))

# pattern character -> (released module name, released norm name, rules; "mixer." names are Megatron's)
LAYER_RULES = {
    "D": ("gla", "input_layernorm", (
        Rule(("mixer.in_proj.weight",), ("q_proj.weight", "k_proj.weight", "v_proj.weight", "b_proj.weight"),
             _split_deltanet_in_proj, _merge_deltanet_in_proj),
        Rule(("mixer.conv_weight",), ("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"),
             _split_deltanet_conv, _merge_deltanet_conv),
        _same("mixer.o_norm_weight", "o_norm.weight"),
        _same("mixer.out_proj.weight", "o_proj.weight"),
    )),
    "M": ("mamba", "input_layernorm", (
        Rule(("mixer.in_proj.weight", "mixer.bc_proj_weight"), ("in_proj.weight",),
             _mamba_in_proj_to_hf, _mamba_in_proj_to_megatron),
        Rule(("mixer.conv_x_weight", "mixer.conv_bc_weight"), ("conv1d.weight",),
             _mamba_conv_to_hf, _mamba_conv_to_megatron),
        Rule(("mixer.conv_x_bias", "mixer.conv_bc_bias"), ("conv1d.bias",),
             _mamba_conv_bias_to_hf, _mamba_conv_bias_to_megatron),
        _same("mixer.dt_bias", "dt_bias"),
        _same("mixer.A_log", "A_log"),
        _same("mixer.D", "D"),
        _same("mixer.norm_weight", "norm.weight"),
        _same("mixer.out_proj.weight", "out_proj.weight"),
    )),
    "A": _ATTENTION,
    "S": _ATTENTION,
    "F": ("ffn", "pre_ffn_layernorm", (
        Rule(("mixer.linear_fc1.weight",), ("gate_proj.weight", "up_proj.weight"), _split_fc1, _merge_fc1),
        _same("mixer.linear_fc2.weight", "down_proj.weight"),
    )),
}


@dataclass(frozen=True)
class BoundRule:
    """A rule with full names for one model."""

    megatron: tuple
    hf: tuple
    rule: Rule


def bound_rules(dims: Dims) -> Iterator[BoundRule]:
    """Every rule of the model described by ``dims``, with full Megatron and HF names."""
    for rule in GLOBAL_RULES + (() if dims.tied else UNTIED_RULES):
        yield BoundRule(rule.megatron, rule.hf, rule)
    for i, char in enumerate(dims.layer_pattern):
        module, norm, rules = LAYER_RULES[char]
        meg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        yield BoundRule((f"{meg}norm.weight",), (f"{hf}{norm}.weight",), Rule(("norm.weight",), (f"{norm}.weight",)))
        for rule in rules:
            yield BoundRule(tuple(meg + n for n in rule.megatron), tuple(f"{hf}{module}.{n}" for n in rule.hf), rule)


def _convert(state: Mapping[str, torch.Tensor], dims: Dims, to_hf: bool, progress: Optional[Callable]) -> dict:
    rules = list(bound_rules(dims))
    sources = [r.megatron if to_hf else r.hf for r in rules]
    expected = {name for names in sources for name in names}
    ignored = {"lm_head.weight"} if (dims.tied and not to_hf) else set()  # a tied alias some writers include
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected - ignored)
    side = "Megatron" if to_hf else "Hugging Face"
    if missing or unexpected:
        raise ConversionError(f"{side} state does not match the model (pattern {dims.layer_pattern}, "
                              f"{'tied' if dims.tied else 'untied'} embeddings): missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    out = {}
    iterator = progress(rules) if progress is not None else rules
    for bound in iterator:
        names_in, names_out = (bound.megatron, bound.hf) if to_hf else (bound.hf, bound.megatron)
        fn = bound.rule.to_hf if to_hf else bound.rule.to_megatron
        try:
            results = fn([state[n] for n in names_in], dims)
        except (ConversionError, RuntimeError) as exc:
            shapes = {n: list(state[n].shape) for n in names_in}
            raise ConversionError(f"cannot convert {shapes} to {list(names_out)}: {exc}") from exc
        for name, tensor in zip(names_out, results, strict=True):
            out[name] = tensor.contiguous()
    return out


def megatron_to_hf(state: Mapping[str, torch.Tensor], dims: Dims, progress: Optional[Callable] = None) -> dict:
    """Full Megatron tensors (global names) -> released HF tensors. ``progress`` wraps the list of rules (tqdm)."""
    return _convert(state, dims, True, progress)


def hf_to_megatron(state: Mapping[str, torch.Tensor], dims: Dims, progress: Optional[Callable] = None) -> dict:
    """Released HF tensors -> full Megatron tensors (global names); the inverse of :func:`megatron_to_hf`."""
    if dims.tied and "lm_head.weight" in state and not torch.equal(state["lm_head.weight"],
                                                                     state["model.embed_tokens.weight"]):
        raise ConversionError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    return _convert(state, dims, False, progress)


# --------------------------------------------------------------------------------------------------------------
# Config fields
# --------------------------------------------------------------------------------------------------------------

# Megatron config field <-> released config.json field, same value on both sides. Besides these: vocab_size
# (unpadded), tie_word_embeddings, the FFN width (ffn_expand_ratio / intermediate_size) and the layer pattern
# (layer_types, sliding_window, global_attn_idx); see megatron_flash.export.convert.
CONFIG_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_key_value_heads"),
    ("num_meta_tokens", "num_memory_tokens"),
    ("layernorm_epsilon", "rms_norm_eps"),
    ("mamba_state_dim", "mamba_d_state"),
    ("mamba_conv_kernel", "mamba_d_conv"),
    ("mamba_expand", "mamba_expand"),
    ("mamba_head_dim", "mamba2_headdim"),
    ("deltanet_conv_kernel", "d_conv"),
)
# Informative only: not part of the function the model computes.
INFORMATIVE_CONFIG_FIELDS = (("init_method_std", "initializer_range"),)
