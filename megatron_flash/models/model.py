"""NemotronFlashModel: embedding + meta tokens, the hybrid stack, and a row-normalized output layer."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.enums import ModelType

from megatron_flash.layers.base import MixerInputs
from megatron_flash.layers.shared_prefix import MetaPrefix, shares_meta_rows
from megatron_flash.models import packing
from megatron_flash.models.stack import HybridStack
from megatron_flash.models.output_layer import OutputLayer

# Initialization streams of the non-layer parameters (layers use their index; see NemotronFlashConfig.init_rng).
EMBEDDING_STREAM, OUTPUT_STREAM = 1_000_000, 1_000_001

# The vocabulary is padded so that every TP rank gets an equal slice. Unlike Megatron-LM (128 x TP) the multiple
# does not depend on TP, so the model (and its checkpoints) are the same under any TP size up to 128.
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
    """Smallest multiple of 128 that holds the vocabulary (the padding rows are stripped on export)."""
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


class NemotronFlashModel(LanguageModule):
    """Nemotron-Flash language model on megatron-core.

    * ``config.num_meta_tokens`` learnable meta tokens are prepended to every sequence inside the model; they take
      the first positions (RoPE counts them), are dropped before the output layer and carry no loss.
    * logits = h @ (W / ||W||_row)^T: each vocabulary row of the output weight is L2-normalized, as in the
      released model.
    * Tied input/output embeddings by default (megatron keeps the copy on the last pipeline stage in sync).

    ``forward`` takes [batch, seq] token ids (on every pipeline stage: they set the sequence length) and returns
    per-token losses [batch, seq] when ``labels`` are given (output layer and cross-entropy fused over token
    chunks, so the full logits never exist), else logits [batch, seq, vocab / TP] (this rank's vocabulary slice).
    """

    def __init__(self, config, vocab_size: int, max_sequence_length: int, pre_process: bool = True,
                 post_process: bool = True, share_embeddings_and_output_weights: bool = True,
                 use_te: bool = False, rotary_base: float = 10000.0):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size)
        if self.padded_vocab_size % config.tensor_model_parallel_size:
            raise ValueError(f"padded vocabulary {self.padded_vocab_size} is not divisible by TP size "
                             f"{config.tensor_model_parallel_size}")
        self.max_sequence_length = max_sequence_length
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.num_meta_tokens = config.num_meta_tokens

        if pre_process:
            # Meta tokens are concatenated before the sequence-parallel scatter, so the embedding must not scatter.
            with config.init_rng(EMBEDDING_STREAM):
                self.embedding = LanguageModelEmbedding(config, self.padded_vocab_size, max_sequence_length,
                                                        position_embedding_type="none",
                                                        scatter_to_sequence_parallel=False)
                self.meta_tokens = torch.nn.Parameter(torch.empty(self.num_meta_tokens, config.hidden_size,
                                                                  dtype=config.params_dtype))
                config.init_method(self.meta_tokens)
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, rotary_percent=1.0, rotary_base=rotary_base,
                                              use_cpu_initialization=config.use_cpu_initialization)
        self.decoder = HybridStack(config, parallel_state.get_pipeline_model_parallel_rank(),
                                   parallel_state.get_pipeline_model_parallel_world_size(), post_process, use_te)
        if post_process:
            # The output layer sees the full (gathered) sequence with meta positions dropped: no sequence parallel.
            out_config = dataclasses.replace(config, sequence_parallel=False)
            with config.init_rng(OUTPUT_STREAM):
                self.output_layer = OutputLayer(
                    out_config, config.hidden_size, self.padded_vocab_size, vocab_size,
                    skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def _embed(self, input_ids: torch.Tensor, packed) -> torch.Tensor:
        tokens = self.embedding(input_ids, position_ids=None)  # [s, b, h]
        if packed is not None:
            return packing.expand(tokens, self.meta_tokens, packed)
        meta = self.meta_tokens.to(tokens.dtype).unsqueeze(1).expand(-1, tokens.shape[1], -1)
        hidden = torch.cat([meta, tokens], dim=0)
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        return hidden

    def _record_meta_prefix(self, meta_prefix: MetaPrefix) -> None:
        """The meta tokens through the stack, once, each sharing layer recording its results in ``meta_prefix``."""
        if not (self.pre_process and self.post_process):
            raise ValueError("the meta prefix once per step needs the whole model on one pipeline stage")
        if not meta_prefix.recording:
            raise ValueError("a meta prefix is recorded once, before its micro-batches: pass a new MetaPrefix")
        inputs = MixerInputs(rotary_pos_emb=self.rotary_pos_emb(self.num_meta_tokens), meta_prefix=meta_prefix)
        self.decoder(self.meta_tokens.unsqueeze(1), inputs)  # [m, 1, h]: the results stay in meta_prefix

    def forward(self, input_ids: Optional[torch.Tensor], position_ids=None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                document_boundaries: Optional[torch.Tensor] = None,
                meta_prefix: Optional[MetaPrefix] = None) -> Optional[torch.Tensor]:
        """``document_boundaries``: cu_seqlens of packed documents in a [1, T] row (see models/packing.py);
        each document is then computed as if alone, with its own meta tokens. ``meta_prefix``: the sharing layers'
        results on the meta rows (layers/shared_prefix.py), for a micro-batch whose meta rows they share.

        ``input_ids`` None with a new ``meta_prefix`` records it: the meta tokens run through the stack once, for
        the micro-batches after (``model(None, meta_prefix=MetaPrefix(n))``, then ``model(ids, ...,
        meta_prefix=...)`` n times). A call of the model, so that hooks on it run as for any forward (megatron DDP
        waits there for the overlapped gather of the meta tokens' updated values)."""
        if input_ids is None:
            if meta_prefix is None:
                raise ValueError("input_ids is None: the model records a meta prefix then, and none was given")
            return self._record_meta_prefix(meta_prefix)
        packed = None
        if document_boundaries is not None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"packed documents need a batch of one row, got {input_ids.shape[0]}")
            if self.config.sequence_parallel:
                raise ValueError("packed documents are not supported with sequence parallelism yet")
            packed = packing.layout(document_boundaries, self.num_meta_tokens)
            rope_len = packed.params.max_seqlen_q
        else:
            rope_len = self.num_meta_tokens + input_ids.shape[1]
        shared = shares_meta_rows(self.config, input_ids.shape[0], packed is not None, self.training)
        if meta_prefix is not None:
            if not shared:
                raise ValueError(f"a meta prefix was given for a micro-batch whose meta rows no layer shares "
                                 f"({input_ids.shape[0]} row(s), packed: {packed is not None})")
            meta_prefix.start_microbatch()
        inputs = MixerInputs(attention_mask=attention_mask, rotary_pos_emb=self.rotary_pos_emb(rope_len),
                             packed_seq_params=packed.params if packed is not None else None,
                             shared_prefix=self.num_meta_tokens if shared else 0, meta_prefix=meta_prefix)
        hidden = self._embed(input_ids, packed) if self.pre_process else None
        hidden = self.decoder(hidden, inputs)
        if not self.post_process:
            return hidden
        if self.config.sequence_parallel:
            # Every rank then holds the same full sequence; the backward takes each rank's slice of the
            # (identical) gradient instead of summing it, since the output layer already all-reduces.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        hidden = packing.text_only(hidden, packed) if packed is not None else hidden[self.num_meta_tokens:]
        # tied on one stage: the embedding's weight (a stage without the embedding keeps megatron's synced copy as
        # the output layer's own)
        tied_here = self.pre_process and self.share_embeddings_and_output_weights
        weight = self.embedding.word_embeddings.weight if tied_here else None
        if labels is not None:
            return self.output_layer(hidden, weight=weight, labels=labels)
        return self.output_layer(hidden, weight=weight).transpose(0, 1).contiguous()
