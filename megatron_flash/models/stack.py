"""The hybrid stack: this pipeline stage's layers of the pattern, plus the final norm on the last stage."""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_flash import patterns
from megatron_flash.layers.base import MixerInputs
from megatron_flash.layers.norm import add_and_norm
from megatron_flash.models import specs


class HybridStack(MegatronModule):
    """Layers ``[start, end)`` of ``config.layer_pattern`` for pipeline stage ``pp_rank`` of ``pp_size``.

    Layer numbers are global and 1-based (megatron's convention), so parameter names carry the layer's position in
    the whole model only through ``layer_number``; checkpoints use it to place layers across PP layouts.
    """

    def __init__(self, config, pp_rank: int, pp_size: int, post_process: bool, use_te: bool = False):
        super().__init__(config=config)
        start, end = patterns.stage_boundaries(config.num_layers, pp_size, config.pipeline_stage_layers)[pp_rank]
        self.layer_offset = start
        layers = []
        for i in range(start, end):
            with config.init_rng(i):
                layers.append(build_module(specs.layer_spec(config.layer_pattern[i], use_te), config=config,
                                           layer_number=i + 1))
        self.layers = torch.nn.ModuleList(layers)
        self.final_norm = (build_module(specs.final_norm_spec(use_te), config=config, hidden_size=config.hidden_size,
                                        eps=config.layernorm_epsilon) if post_process else None)
        self.input_tensor = None

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """Pipeline stages after the first receive their input here (megatron's schedules call this)."""
        self.input_tensor = input_tensor

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Layers under their global index in the checkpoint, so it loads under any pipeline split.

        As in megatron's TransformerBlock: the dict keys stay this stage's module names (``layers.{local}.``, what
        ``load_state_dict`` expects), only the sharded keys get the global index.
        """
        sharded = {}
        for local, layer in enumerate(self.layers):
            module_prefix, global_prefix = f"{prefix}layers.{local}.", f"{prefix}layers.{layer.layer_number - 1}."
            layer_sharded = layer.sharded_state_dict(module_prefix, sharded_offsets, metadata)
            replace_prefix_for_sharding(layer_sharded, module_prefix, global_prefix)
            sharded.update(layer_sharded)
        if self.final_norm is not None:
            sharded.update(sharded_state_dict_default(
                self.final_norm, f"{prefix}final_norm.", sharded_offsets, metadata,
                tp_group=parallel_state.get_tensor_model_parallel_group()))
        return sharded

    def forward(self, hidden_states, inputs: MixerInputs) -> torch.Tensor:
        if self.input_tensor is not None:
            hidden_states = self.input_tensor
        recompute = self.config.recompute_granularity == "full" and self.training
        # each layer returns its residual add undone, for the next norm to do in its kernel (HybridLayer.forward)
        residual, pending = hidden_states, None
        for layer in self.layers:
            if recompute:  # keep only each layer's inputs; rerun the layer in backward
                residual, pending = tensor_parallel.checkpoint(partial(layer, inputs=inputs), False, residual, pending)
            else:
                residual, pending = layer(residual, pending, inputs)
        if self.final_norm is not None:
            return add_and_norm(self.final_norm, residual, pending)[1]
        # the next pipeline stage receives one tensor
        return residual if pending is None else residual + pending
