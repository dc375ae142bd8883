"""FFN mixer: megatron-core's MLP (SwiGLU through gated_linear_unit) as a layer of its own."""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP

from megatron_flash.layers.base import READS_RESIDUAL, WRITES_RESIDUAL, MixerInputs, mark_weight_norm


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

    def forward(self, hidden_states: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        out, bias = super().forward(hidden_states)
        return out if bias is None else out + bias
