"""Tokenizers for pretraining data: megatron-core's text tokenizer, plus fast batched encoding.

:func:`build_tokenizer` returns a :class:`Tokenizer`, a subclass of megatron-core's ``GPTTokenizer``
(``megatron.core.tokenizers.text``), so everything megatron's GPTDataset and the trainer use is megatron's own code
(``vocab_size``, ``eod``, ``unique_identifiers``, ``detokenize``, ...). What this module adds:

* ``tokenize_batch(texts)``: one call into the Rust ``tokenizers`` backend or into SentencePiece for many documents,
  the hot loop of ``tools/preprocess_data.py``. ``tokenize`` goes through the same path, so the preprocessing tool and
  direct tokenization agree by construction (the tests also compare against megatron's own per-text path).
* ``pad`` and ``bos`` that never raise: a tokenizer without a pad token reports megatron's "no pad" id (-1), one
  without a BOS token reports ``None``; megatron's wrapper raises or returns -1/None depending on the library.
* loading is checked and offline: the path must exist locally and errors name it; HF folders load with
  ``use_fast=True`` (megatron's default is the slow tokenizer, which transformers 5 no longer has for most models).

Types (Megatron-LM's ``--tokenizer-type`` names):

* ``HuggingFaceTokenizer``: a local folder with ``tokenizer.json`` (+ ``tokenizer_config.json``), e.g. the
  Mistral-NeMo-Minitron tokenizer the Nemotron-Flash models use, or a path to a ``tokenizer.json`` file.
* ``SentencePieceTokenizer``: a ``.model`` file.
* ``NullTokenizer``: ids written as space-separated integers, ``vocab_size`` ids plus EOD; for mock data and tests.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence

from megatron.core.tokenizers.text.models import GPTTokenizer

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "NullTokenizer")

# megatron.core.datasets.megatron_dataset._PAD_TOKEN_ID: "no pad token", an id no dataset contains.
NO_PAD_ID = -1

_LIBRARY_FOR_TYPE = {
    "HuggingFaceTokenizer": "huggingface",
    "SentencePieceTokenizer": "sentencepiece",
    "NullTokenizer": "null",
}


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the given type/path (message names both)."""


class Tokenizer(GPTTokenizer):
    """megatron-core's GPT text tokenizer with batched encoding and total ``pad``/``bos``."""

    def __init__(self, tokenizer_type: str, path: Optional[str], config: dict, **kwargs) -> None:
        super().__init__(path=path, config=config, **kwargs)
        self.tokenizer_type = tokenizer_type
        self._encode_many = self._pick_batch_encoder()
        if self.eod is None or self.eod < 0:
            raise TokenizerError(
                f"{tokenizer_type} at {path!r} defines no end-of-document token (eos_token): GPT pretraining data "
                f"needs one. Add 'eos_token' to its tokenizer_config.json (or special_tokens_map.json)."
            )

    # -- encoding -----------------------------------------------------------------------------------------------
    def _pick_batch_encoder(self):
        library = self._tokenizer
        if self.library == "huggingface":
            backend = getattr(library.tokenizer, "_tokenizer", None)  # tokenizers.Tokenizer of a fast tokenizer
            if backend is None or library.include_special_tokens:
                return lambda texts: [library.text_to_ids(t) for t in texts]
            # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets, which ids do not need.
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return lambda texts: [enc.ids for enc in encode(list(texts), add_special_tokens=False)]
        if self.library == "sentencepiece":
            sp = library.tokenizer
            # megatron's SentencePieceTokenizer only deviates from plain encode() in legacy mode (special tokens
            # added in the wrapper) or when it re-inserts whitespace the model would drop.
            if library.legacy or (library.removed_extra_spaces and not library.ignore_extra_whitespaces):
                return lambda texts: [library.text_to_ids(t) for t in texts]
            return lambda texts: sp.encode(list(texts))
        return lambda texts: [library.text_to_ids(t) for t in texts]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text, without BOS/EOS; equal to ``[self.tokenize(t) for t in texts]``."""
        if not texts:
            return []
        return [list(ids) for ids in self._encode_many(texts)]

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_batch([text])[0]

    def detokenize(self, ids: Iterable[int]) -> str:
        return super().detokenize([int(i) for i in ids])

    # -- special tokens that megatron's wrappers do not define for every library --------------------------------
    @property
    def pad(self) -> int:
        try:
            pad = super().pad
        except (AttributeError, NotImplementedError):
            return NO_PAD_ID
        return NO_PAD_ID if pad is None or pad < 0 else pad

    @property
    def bos(self) -> Optional[int]:
        try:
            bos = super().bos
        except (AttributeError, NotImplementedError):
            return None
        return None if bos is None or bos < 0 else bos

    @property
    def unique_identifiers(self) -> OrderedDict:
        ids = super().unique_identifiers
        ids["tokenizer_type"] = self.tokenizer_type
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.tokenizer_type}, {self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _hf_folder(tokenizer_model: str) -> str:
    """The folder AutoTokenizer should load: the path itself, or the folder of a ``tokenizer.json`` file."""
    if os.path.isdir(tokenizer_model):
        if not any(os.path.isfile(os.path.join(tokenizer_model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            raise TokenizerError(
                f"HuggingFaceTokenizer folder {tokenizer_model!r} has neither tokenizer.json nor tokenizer_config.json"
            )
        return tokenizer_model
    if os.path.isfile(tokenizer_model):
        if os.path.basename(tokenizer_model) != "tokenizer.json":
            raise TokenizerError(
                f"HuggingFaceTokenizer expects a folder or a file named tokenizer.json, got {tokenizer_model!r}"
            )
        return os.path.dirname(os.path.abspath(tokenizer_model))
    raise TokenizerError(f"HuggingFaceTokenizer path {tokenizer_model!r} does not exist (only local paths are loaded)")


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
    **kwargs,
) -> Tokenizer:
    """Build a :class:`Tokenizer`.

    Args:
        tokenizer_type: one of :data:`TOKENIZER_TYPES` (Megatron-LM's names).
        tokenizer_model: local folder / ``tokenizer.json`` (HuggingFace) or ``.model`` file (SentencePiece).
        vocab_size: NullTokenizer only: number of regular ids (EOD is ``vocab_size``).
        kwargs: passed to megatron's library wrapper, e.g. ``eos_token="</s>"`` for a bare tokenizer.json.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    config = {"library": _LIBRARY_FOR_TYPE[tokenizer_type], "model_type": "gpt"}

    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or int(vocab_size) < 1:
            raise TokenizerError("NullTokenizer needs a positive vocab_size (--vocab-size)")
        return Tokenizer(tokenizer_type, None, config, vocab_size=int(vocab_size), **kwargs)

    if not tokenizer_model:
        raise TokenizerError(f"{tokenizer_type} needs a tokenizer model path (--tokenizer-model)")
    if tokenizer_type == "SentencePieceTokenizer":
        if not os.path.isfile(tokenizer_model):
            raise TokenizerError(f"SentencePiece model file {tokenizer_model!r} does not exist")
        return Tokenizer(tokenizer_type, tokenizer_model, config, **kwargs)

    folder = _hf_folder(tokenizer_model)
    kwargs.setdefault("use_fast", True)
    try:
        return Tokenizer(tokenizer_type, folder, config, **kwargs)
    except TokenizerError:
        raise
    except ValueError as err:  # megatron wraps AutoTokenizer failures in ValueError
        raise TokenizerError(f"cannot load HuggingFaceTokenizer from {folder!r}: {err}") from err
