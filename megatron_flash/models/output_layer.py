"""The output layer: vocabulary logits from unit-L2 rows of its weight, or the fused loss, inside one module call."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_flash.ops.linear_cross_entropy import linear_cross_entropy
from megatron_flash.ops.rms_norm import unit_rows


class OutputLayer(tensor_parallel.ColumnParallelLinear):
    """``logits = h @ (W / ||W||_row)^T`` over this TP rank's vocabulary rows, as in the released model; with
    ``labels``, the per-token loss of those logits instead (output layer and vocab-parallel cross-entropy fused in
    chunks, ops/linear_cross_entropy.py: the [tokens, vocabulary] logits never exist in full).

    The weight is the layer's own, or the input embedding's when the two are tied on one pipeline stage (passed
    in). Either way it is read inside this module's call, where megatron's forward pre-hook waits for the weight's
    all-gather under ``--overlap-param-gather``. Padding rows of the vocabulary (past ``vocab_size``) get -inf
    logits and are left out of the softmax.
    """

    def __init__(self, config, hidden_size: int, padded_vocab_size: int, vocab_size: int,
                 skip_weight_param_allocation: bool):
        super().__init__(hidden_size, padded_vocab_size, config=config, init_method=config.init_method, bias=False,
                         skip_bias_add=False, gather_output=False,
                         skip_weight_param_allocation=skip_weight_param_allocation)
        self.vocab_size = vocab_size
        self.recompute_logits = config.recompute_logits

    def forward(self, hidden: torch.Tensor, weight: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``hidden`` [s, b, h] -> logits [s, b, vocab / TP], or with ``labels`` [b, s] the losses [b, s]."""
        weight = unit_rows(self.weight if weight is None else weight)
        if labels is None:
            logits, _ = super().forward(hidden, weight=weight)
            return self._mask_vocab_padding(logits)
        seq, batch, width = hidden.shape
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)  # all-reduces its gradient over TP
        loss = linear_cross_entropy(
            hidden.reshape(seq * batch, width), weight, labels.t().reshape(-1), self.vocab_size,
            vocab_start=parallel_state.get_tensor_model_parallel_rank() * weight.shape[0],
            group=parallel_state.get_tensor_model_parallel_group(), recompute_logits=self.recompute_logits)
        return loss.view(seq, batch).t()

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Padding rows get -inf logits: the softmax (and so the loss) is exactly that of the real vocabulary."""
        per_rank = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * per_rank
        if first + per_rank <= self.vocab_size:
            return logits
        is_padding = torch.arange(first, first + per_rank, device=logits.device) >= self.vocab_size
        return logits.masked_fill(is_padding, float("-inf"))
