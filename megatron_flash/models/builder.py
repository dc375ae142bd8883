"""Build a config and model from a preset name, a pattern and overrides: what the trainer, tools and tests use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_flash import presets
from megatron_flash.config import NemotronFlashConfig, make_config
from megatron_flash.models.model import NemotronFlashModel


@dataclass
class ModelSpec:
    """A resolved model description: the stack's config and the language-model fields."""

    config: NemotronFlashConfig
    vocab_size: int
    tie_embeddings: bool


def resolve(preset: str | dict = "tiny", pattern: str | None = None, **overrides) -> ModelSpec:
    """Preset fields (a preset's name, or the fields themselves: ``--preset-file``), then ``pattern``, then
    ``overrides`` (megatron TransformerConfig or our config fields).

    Parallel sizes are taken from parallel_state when it is initialized, unless given.
    """
    fields = presets.preset_fields(preset)
    if pattern is not None:
        fields["layer_pattern"] = pattern
    fields.update(overrides)
    model_fields = {k: fields.pop(k) for k in presets.MODEL_FIELDS}
    if parallel_state.model_parallel_is_initialized():
        fields.setdefault("tensor_model_parallel_size", parallel_state.get_tensor_model_parallel_world_size())
        fields.setdefault("pipeline_model_parallel_size", parallel_state.get_pipeline_model_parallel_world_size())
    if fields.get("pipeline_model_parallel_size", 1) > 1:
        fields.setdefault("pipeline_dtype", fields.get("params_dtype", torch.float32))
    return ModelSpec(make_config(**fields), **model_fields)


def build_model(spec: ModelSpec, max_sequence_length: int, use_te: bool = False) -> NemotronFlashModel:
    """This rank's part of the model (pipeline stage from parallel_state), on this rank's GPU when there is one."""
    model = NemotronFlashModel(
        spec.config, spec.vocab_size, max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=spec.tie_embeddings, use_te=use_te)
    # Parameters megatron does not allocate itself (norms, meta tokens, SSM scalars) start on the CPU.
    return model.cuda(torch.cuda.current_device()) if torch.cuda.is_available() else model
