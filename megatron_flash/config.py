"""The model configuration: megatron's TransformerConfig plus the hybrid layers' fields."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_flash import patterns


@dataclass
class NemotronFlashConfig(TransformerConfig):
    """Everything that defines a Nemotron-Flash model besides vocabulary size.

    Megatron's own fields keep their meaning (``hidden_size``, ``ffn_hidden_size``, ``num_attention_heads``,
    ``num_query_groups`` = KV heads, ``kv_channels`` = attention head dim, ``layernorm_epsilon``...).
    """

    layer_pattern: str = "DFMFAF"
    # Seed of CPU initialization (use_cpu_initialization): each layer draws from its own stream, so a model is
    # initialized the same under any TP/PP layout
    init_seed: int = 1234
    # layers per pipeline stage; set from '|' in layer_pattern, else an even split
    pipeline_stage_layers: Optional[list] = None
    num_meta_tokens: int = 256
    # the FFN computes the meta tokens' rows once per micro-batch (layers/shared_prefix.py): exact, since every
    # sequence starts with them; off for A/B measurements
    share_meta_rows: bool = True
    # DeltaNet and Mamba2 run the meta prefix once per micro-batch and every sequence's text from the states it
    # leaves (layers/shared_prefix.py): exact; off for A/B measurements
    share_meta_prefix_in_mixers: bool = True
    # in training, the layers above take their meta rows' results from one pass per optimizer step instead of
    # computing them in every micro-batch (layers/shared_prefix.py: MetaPrefix): exact; off for A/B measurements
    meta_prefix_once_per_step: bool = True
    sliding_window: Optional[int] = None  # for 'S' layers

    # DeltaNet (fla's DeltaNet defaults): heads = num_attention_heads
    deltanet_head_dim: int = 128
    deltanet_conv_kernel: int = 4
    deltanet_norm_eps: float = 1e-5
    delta_rule_backend: str = "auto"  # auto | fla | torch
    short_conv_backend: str = "auto"  # DeltaNet's and Mamba2's short convs: ops.short_conv.BACKENDS

    # Mamba2
    mamba_state_dim: int = 128
    mamba_head_dim: int = 64
    mamba_expand: int = 2
    mamba_num_groups: int = 1
    mamba_conv_kernel: int = 4
    mamba_norm_eps: float = 1e-5
    # megatron's MambaMixer default; with mamba_ssm's SSD on an H200 the 1B Mamba2 layer is 7% faster at 128 than at
    # 64 and keeps 1.5 GiB less (docs/performance.md, "Mamba2 SSD backends"); 256 saves more memory but is slower
    mamba_chunk_size: int = 128
    ssd_backend: str = "auto"  # auto | mamba_ssm | fla | torch | torch_compile

    # Output layer: recompute the logits in backward instead of keeping softmax - onehot (2 bytes per token and
    # vocabulary row); see ops/linear_cross_entropy.py
    recompute_logits: bool = False

    def __post_init__(self):
        self.pipeline_stage_layers = patterns.explicit_stage_sizes(self.layer_pattern) or self.pipeline_stage_layers
        self.layer_pattern = patterns.parse(self.layer_pattern)
        if self.num_layers != len(self.layer_pattern):
            raise ValueError(
                f"num_layers={self.num_layers} but layer_pattern {self.layer_pattern!r} has "
                f"{len(self.layer_pattern)} layers")
        if "S" in self.layer_pattern and not self.sliding_window:
            raise ValueError("layer_pattern has sliding-window attention (S) but sliding_window is not set")
        super().__post_init__()

    @contextlib.contextmanager
    def init_rng(self, stream: int):
        """Parameters created inside draw from the CPU RNG seeded by (init_seed, stream).

        With use_cpu_initialization megatron builds each full matrix from the CPU RNG and then takes this rank's
        shard, so per-layer streams make initialization independent of the TP/PP layout.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed * 1_000_003 + stream)
            yield

    @property
    def deltanet_heads(self) -> int:
        return self.num_attention_heads

    @property
    def mamba_inner_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_heads(self) -> int:
        return self.mamba_inner_size // self.mamba_head_dim


def make_config(
    *,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    layer_pattern: str,
    **overrides,
) -> NemotronFlashConfig:
    """A config with the architecture's fixed choices (RMSNorm, SwiGLU, no biases, no dropout) filled in."""
    head_dim = hidden_size // num_attention_heads
    fields = dict(
        num_layers=len(patterns.parse(layer_pattern)),
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        kv_channels=head_dim,
        deltanet_head_dim=head_dim,
        layer_pattern=layer_pattern,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        # read by megatron's MLP.forward only, which FFNMixer.forward runs for settings other than bias-free SwiGLU
        # (that one is ops.swiglu): there it picks megatron's fused activations, compiled on GPUs, eager on the CPU
        bias_activation_fusion=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    fields.update(overrides)
    return NemotronFlashConfig(**fields)
