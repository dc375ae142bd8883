"""ModuleSpecs per layer type. Transformer Engine vs local (plain torch) is a spec choice, made here only.

``layer_spec(char)`` gives the spec of one layer of the pattern (see megatron_flash.patterns). The local specs use
megatron's ColumnParallelLinear / RowParallelLinear, our SP-capable RMSNorm and SDPA core attention; the TE specs
swap in TE's linears, norm and fused attention where Transformer Engine is installed.
"""

from __future__ import annotations

import importlib.util

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_flash.layers.attention import AttentionMixer, SDPAttention
from megatron_flash.layers.base import HybridLayer, HybridLayerSubmodules
from megatron_flash.layers.deltanet import DeltaNetMixer, DeltaNetSubmodules
from megatron_flash.layers.ffn import FFNMixer
from megatron_flash.layers.mamba2 import Mamba2Mixer, Mamba2Submodules
from megatron_flash.layers.norm import RMSNorm


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _modules(use_te: bool) -> dict:
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear, TEDotProductAttention, TENorm, TERowParallelLinear)
        return dict(column=TEColumnParallelLinear, row=TERowParallelLinear, norm=TENorm,
                    core_attention=TEDotProductAttention)
    return dict(column=ColumnParallelLinear, row=RowParallelLinear, norm=RMSNorm, core_attention=SDPAttention)


def mixer_spec(char: str, use_te: bool = False) -> ModuleSpec:
    """The mixer of one pattern character: D, M, A/S or F."""
    m = _modules(use_te)
    if char == "D":
        return ModuleSpec(module=DeltaNetMixer, submodules=DeltaNetSubmodules(in_proj=m["column"], out_proj=m["row"]))
    if char == "M":
        return ModuleSpec(module=Mamba2Mixer, submodules=Mamba2Submodules(in_proj=m["column"], out_proj=m["row"]))
    if char in "AS":
        # Per-layer sliding windows are SDPAttention's (TE's window is one config value for every layer).
        core = SDPAttention if char == "S" else m["core_attention"]
        return ModuleSpec(module=AttentionMixer, submodules=SelfAttentionSubmodules(
            linear_qkv=m["column"], core_attention=core, linear_proj=m["row"]))
    if char == "F":
        return ModuleSpec(module=FFNMixer, submodules=MLPSubmodules(linear_fc1=m["column"], linear_fc2=m["row"]))
    raise ValueError(f"no mixer for layer character {char!r}")


def layer_spec(char: str, use_te: bool = False) -> ModuleSpec:
    return ModuleSpec(module=HybridLayer, submodules=HybridLayerSubmodules(
        norm=_modules(use_te)["norm"], mixer=mixer_spec(char, use_te)))


def final_norm_spec(use_te: bool = False):
    return _modules(use_te)["norm"]
