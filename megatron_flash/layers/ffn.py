"""FFN mixer: megatron-core's MLP (SwiGLU through gated_linear_unit) as a layer of its own."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP

from megatron_flash.layers.base import READS_RESIDUAL, WRITES_RESIDUAL, MixerInputs, mark_weight_norm
from megatron_flash.models.layout import shard_of


class FFNMixer(MLP):
    """down(silu(gate(x)) * up(x)).

    megatron fuses gate and up into ``linear_fc1``; each TP rank holds [gate_r; up_r], so the full matrix
    read in TP-rank order is not [gate; up]. The ``glu_stacked`` attribute tells layout code (checkpoint
    conversion, tests) to split each shard in two halves.
    """

    def __init__(self, config, layer_number: int, submodules, pg_collection=None):
        super().__init__(config, submodules)
        self.layer_number = layer_number
        self.linear_fc1.weight.glu_stacked = True
        mark_weight_norm(self.linear_fc1.weight, READS_RESIDUAL)
        mark_weight_norm(self.linear_fc2.weight, WRITES_RESIDUAL)
        if config.use_cpu_initialization and config.perform_initialization:
            self._init_fc1_as_full_matrix()

    @torch.no_grad()
    def _init_fc1_as_full_matrix(self):
        """megatron draws the full [2*ffn, h] fc1 and splits it contiguously, so under TP each rank's gate/up
        halves come from other rows than at TP=1. Draw the logical [gate; up] instead and take this rank's shard,
        so CPU initialization is the same under every TP size."""
        weight = self.linear_fc1.weight
        tp = parallel_state.get_tensor_model_parallel_world_size()
        full = torch.empty(weight.shape[0] * tp, weight.shape[1], dtype=torch.float32)
        self.config.init_method(full)
        weight.copy_(shard_of(full, weight, tp, parallel_state.get_tensor_model_parallel_rank()))

    def forward(self, hidden_states: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        out, bias = super().forward(hidden_states)
        return out if bias is None else out + bias
