"""FFN mixer: megatron-core's MLP (SwiGLU through gated_linear_unit) as a layer of its own."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP

from megatron_flash.layers.base import READS_RESIDUAL, WRITES_RESIDUAL, MixerInputs, mark_weight_norm
from megatron_flash.layers.shared_prefix import apply_once_to_shared_prefix
from megatron_flash.models.layout import initialize_as_full, stack_sections
from megatron_flash.ops.swiglu import swiglu


class FFNMixer(MLP):
    """down(silu(gate(x)) * up(x)).

    megatron fuses gate and up into ``linear_fc1``; each TP rank holds [gate_r; up_r], so the full matrix
    read in TP-rank order is not [gate; up]: it is stacked from two sections (models.layout.stack_sections).
    """

    def __init__(self, config, layer_number: int, submodules, pg_collection=None):
        super().__init__(config, submodules)
        self.layer_number = layer_number
        fc1 = self.linear_fc1.weight
        stack_sections(fc1, [fc1.shape[0] // 2] * 2)
        mark_weight_norm(self.linear_fc1.weight, READS_RESIDUAL)
        mark_weight_norm(self.linear_fc2.weight, WRITES_RESIDUAL)
        if config.use_cpu_initialization and config.perform_initialization:
            # megatron draws the full [2*ffn, h] fc1 and splits it contiguously, so under TP each rank's gate/up
            # halves would come from other rows than at TP=1
            initialize_as_full(fc1, config.init_method, parallel_state.get_tensor_model_parallel_world_size(),
                               parallel_state.get_tensor_model_parallel_rank())
        # ops.swiglu's backward reads y and g once where megatron's bias_swiglu_impl reads them twice; any setting
        # outside plain bias-free SwiGLU (a bias, a clamp or offset, TE's activation, an fp8-stored input) stays
        # with megatron's MLP.forward
        self.plain_swiglu = (config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
                             and not config.add_bias_linear and not config.use_te_activation_func
                             and config.activation_func_clamp_value is None and config.glu_linear_offset == 0.0
                             and not config.activation_func_fp8_input_store)

    def forward(self, hidden_states: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        # the meta tokens' rows once per micro-batch: at micro-batch 16, 5.5% of the FFN's work (~40% of a 1B step)
        # is those rows repeated in every sequence
        prefix, meta_prefix = inputs.shared_rows(self.config.share_meta_rows) if inputs else (0, None)
        return apply_once_to_shared_prefix(self._ffn, hidden_states, prefix, meta_prefix, self.layer_number)

    def _ffn(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.plain_swiglu:
            fc1_out, _ = self.linear_fc1(hidden_states)
            out, bias = self.linear_fc2(swiglu(fc1_out))
        else:
            out, bias = super().forward(hidden_states)
        return out if bias is None else out + bias
