"""Pretraining data: tokenizers, tokenized-corpus tools and megatron-core dataset construction.

* :func:`build_tokenizer` (:mod:`.tokenizer`): megatron-core text tokenizers (HuggingFace, SentencePiece, Null).
* :func:`build_pretraining_datasets` (:mod:`.datasets`): train/valid/test GPTDatasets from a Megatron blend.
* :mod:`.preprocess`, :mod:`.merge`, :mod:`.train_tokenizer`: the engines of ``tools/*.py``.

The names are imported lazily: ``import megatron.core`` takes seconds, and tools such as the tokenizer trainer or
the sample-corpus builder do not need it.
"""

import importlib

_EXPORTS = {
    "Tokenizer": "megatron_flash.data.tokenizer",
    "build_tokenizer": "megatron_flash.data.tokenizer",
    "build_pretraining_datasets": "megatron_flash.data.datasets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
