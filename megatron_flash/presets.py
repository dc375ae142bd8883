"""Named model shapes. The single source of truth for the released models' architecture hyper-parameters."""

from __future__ import annotations

# D DeltaNet, M Mamba2, A attention, F FFN (see megatron_flash.patterns)
NEMOTRON_FLASH_1B_PATTERN = "DFMFAFMF DFMFAFMF DFMFDFMF"
NEMOTRON_FLASH_3B_PATTERN = "DFMFAFMF DFMFAFMF DFMFAFMF DFMFDFMF DFMF"

PRESETS = {
    "nemotron_flash_1b": dict(
        hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16, num_query_groups=4,
        layer_pattern=NEMOTRON_FLASH_1B_PATTERN, vocab_size=131072, num_meta_tokens=256,
        tie_embeddings=True,
    ),
    "nemotron_flash_3b": dict(
        hidden_size=3072, ffn_hidden_size=9216, num_attention_heads=24, num_query_groups=6,
        layer_pattern=NEMOTRON_FLASH_3B_PATTERN, vocab_size=131072, num_meta_tokens=256,
        tie_embeddings=True,
    ),
    # Every layer type, runs in seconds on a CPU.
    "tiny": dict(
        hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
        layer_pattern="DFMFAF", vocab_size=512, num_meta_tokens=8, tie_embeddings=True,
        mamba_state_dim=16, mamba_head_dim=16, mamba_chunk_size=16,
    ),
}

# Released parameter counts (NVIDIA's modeling code built with these configurations).
RELEASED_PARAMETER_COUNTS = {"nemotron_flash_1b": 965_389_440, "nemotron_flash_3b": 2_749_998_624}


def get_preset(name: str) -> dict:
    """A copy of the named preset's fields; unknown names list the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
