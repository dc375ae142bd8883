"""Shared, cached test inputs for the data-pipeline tests (test_data_*.py); this module holds no tests itself.

Everything is made at run time in one temporary folder per test process, without network: a sample corpus from
the Python standard library (data_prep/build_sample_corpus.py) and two tiny tokenizers trained on it with
tools/train_tokenizer.py (a SentencePiece model and a HuggingFace byte-level BPE folder).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 1024


@functools.lru_cache(maxsize=None)
def workdir() -> str:
    path = tempfile.mkdtemp(prefix="mf_data_tests_")
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.lru_cache(maxsize=None)
def sample_corpus() -> str:
    """Folder with train-0000{0,1}-of-00002.jsonl and valid.jsonl, about 400 KB of stdlib text in all."""
    from data_prep.build_sample_corpus import build_corpus

    folder = os.path.join(workdir(), "corpus")
    build_corpus(folder, size_mb=0.4, valid_fraction=0.1, train_shards=2)
    return folder


def train_files() -> list:
    folder = sample_corpus()
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("train-"))


@functools.lru_cache(maxsize=None)
def hf_tokenizer_dir() -> str:
    from megatron_flash.data.train_tokenizer import main

    out = os.path.join(workdir(), "hf_tokenizer")
    assert main(["--input", sample_corpus(), "--tokenizer-type", "HuggingFaceTokenizer",
                 "--vocab-size", str(VOCAB_SIZE), "--output", out]) == 0
    return out


@functools.lru_cache(maxsize=None)
def sp_model() -> str:
    from megatron_flash.data.train_tokenizer import main

    prefix = os.path.join(workdir(), "sp", "spm")
    assert main(["--input", sample_corpus(), "--tokenizer-type", "SentencePieceTokenizer",
                 "--vocab-size", str(VOCAB_SIZE), "--output", prefix]) == 0
    return prefix + ".model"


def tokenizer_args(kind: str) -> list:
    if kind == "hf":
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_dir()]
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model()]


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str):
    from megatron_flash.data.tokenizer import build_tokenizer

    if kind == "hf":
        return build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir())
    return build_tokenizer("SentencePieceTokenizer", sp_model())


def jsonl_texts(path: str, key: str = "text") -> list:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)[key] for line in fh if line.strip()]


def read_documents(prefix: str) -> list:
    """Every document of a megatron prefix as a list of ints, read with megatron's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    docs = [dataset[i].tolist() for i in range(len(dataset))]
    assert len(dataset.document_indices) - 1 == len(docs)  # one sequence per document
    return docs


@functools.lru_cache(maxsize=None)
def tokenized_sample(kind: str = "sp") -> dict:
    """The sample corpus tokenized (train shards and valid) with --append-eod: {name: prefix}."""
    from megatron_flash.data.preprocess import main

    out = os.path.join(workdir(), f"tokenized_{kind}")
    prefixes = {}
    for name, path in [("train0", train_files()[0]), ("train1", train_files()[1]),
                       ("valid", os.path.join(sample_corpus(), "valid.jsonl"))]:
        assert main(["--input", path, "--output-prefix", os.path.join(out, name), "--append-eod",
                     "--no-progress-bar", *tokenizer_args(kind)]) == 0
        prefixes[name] = os.path.join(out, f"{name}_text_document")
    return prefixes
