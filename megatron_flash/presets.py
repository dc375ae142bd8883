"""Named model shapes. The single source of truth for the released models' architecture hyper-parameters."""

from __future__ import annotations

import json

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


def preset_fields(preset: str | dict) -> dict:
    """A copy of a preset's fields, given its name or (``--preset-file``) the fields themselves."""
    return dict(preset) if isinstance(preset, dict) else get_preset(preset)


# Fields of a model shape that are not config fields: models.builder.resolve hands them to the model.
MODEL_FIELDS = ("vocab_size", "tie_embeddings")
# Fields every model shape states (the rest default as in megatron_flash.config.NemotronFlashConfig).
REQUIRED_FIELDS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "layer_pattern",
                   "vocab_size", "num_meta_tokens", "tie_embeddings")


class PresetError(ValueError):
    """A model-shape file that cannot be used; the message names the file and the field."""


def load_preset_file(path: str) -> dict:
    """Model fields from a JSON file: a preset's fields (as in PRESETS), or a file that holds them under
    "preset_fields" (an architecture-search candidate.json, a paper_findings run.json).

    Unknown and missing fields are errors: a typo would otherwise train a different model than the file says.
    """
    from dataclasses import fields as dataclass_fields

    from megatron_flash import patterns
    from megatron_flash.config import NemotronFlashConfig

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise PresetError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PresetError(f"{path}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    fields = data.get("preset_fields", data) if isinstance(data, dict) else None
    if not isinstance(fields, dict):
        raise PresetError(f"{path}: expected a JSON object of model fields (or one under \"preset_fields\")")
    missing = [k for k in REQUIRED_FIELDS if k not in fields]
    if missing:
        raise PresetError(f"{path}: missing field(s) {', '.join(missing)}")
    known = {f.name for f in dataclass_fields(NemotronFlashConfig)} | set(MODEL_FIELDS)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PresetError(f"{path}: unknown field(s) {', '.join(unknown)} (model fields are those of "
                          f"megatron_flash.config.NemotronFlashConfig, plus {' and '.join(MODEL_FIELDS)})")
    for key in REQUIRED_FIELDS:
        value, wanted = fields[key], {"layer_pattern": str, "tie_embeddings": bool}.get(key, int)
        if not isinstance(value, wanted) or (wanted is int and (isinstance(value, bool) or value < 0)):
            kind = "a non-negative integer" if wanted is int else f"a {wanted.__name__}"
            raise PresetError(f"{path}: field {key} must be {kind}, got {value!r}")
    try:
        patterns.parse(fields["layer_pattern"])
    except patterns.PatternError as exc:
        raise PresetError(f"{path}: field layer_pattern: {exc}") from None
    return dict(fields)
