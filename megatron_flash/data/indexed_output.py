"""Writing megatron ``.bin``/``.idx`` pairs so that only complete outputs ever carry their final names.

megatron's :class:`~megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` writes straight to the paths it is
given; a job killed half-way would leave a ``.bin`` (and maybe an ``.idx``) that ``IndexedDataset.exists`` accepts.
:class:`AtomicIndexedWriter` lets the builder write ``<final>.partial`` files, flushes them to disk, and renames
``.bin`` then ``.idx`` into place only after ``finalize``. A pair counts as complete (:func:`is_complete`) only when
both final files exist and the index agrees with the data file's size, so a rerun redoes anything less.
"""

from __future__ import annotations

import os
from typing import Sequence, Type

import numpy

from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

PARTIAL_SUFFIX = ".partial"


def token_dtype(vocab_size: int) -> Type[numpy.number]:
    """The .bin token dtype for a vocabulary (uint16 below 65500 ids, else int32), as megatron chooses it."""
    return DType.optimal_dtype(vocab_size)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:  # some file systems do not allow fsync on directories; the rename is still atomic
        pass


def is_complete(prefix: str) -> bool:
    """Whether ``prefix.bin``/``prefix.idx`` exist and the index accounts for exactly the bytes of the data file."""
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    if not (os.path.isfile(bin_path) and os.path.isfile(idx_path)):
        return False
    try:
        dataset = IndexedDataset(prefix, mmap=False)
        expected = int(dataset.sequence_lengths.sum(dtype=numpy.int64)) * DType.size(dataset.index.dtype)
        del dataset
    except Exception:  # noqa: BLE001 - any unreadable index means "not complete"
        return False
    return os.path.getsize(bin_path) == expected


def count_tokens(prefix: str) -> tuple:
    """(documents, tokens) of a complete prefix, read from its .idx only."""
    dataset = IndexedDataset(prefix, mmap=False)
    documents = len(dataset.document_indices) - 1
    tokens = int(dataset.sequence_lengths.sum(dtype=numpy.int64))
    del dataset
    return documents, tokens


def remove_outputs(prefix: str) -> None:
    for path in (get_bin_path(prefix), get_idx_path(prefix)):
        for candidate in (path, path + PARTIAL_SUFFIX):
            if os.path.exists(candidate):
                os.remove(candidate)


class AtomicIndexedWriter:
    """An IndexedDatasetBuilder writing ``prefix.bin/.idx`` under temporary names until :meth:`commit`.

    Use as a context manager: leaving the block with an exception (or without commit) deletes the partial files.
    """

    def __init__(self, prefix: str, dtype: Type[numpy.number]):
        self.prefix = prefix
        self.dtype = dtype
        self.bin_path, self.idx_path = get_bin_path(prefix), get_idx_path(prefix)
        self.bin_tmp, self.idx_tmp = self.bin_path + PARTIAL_SUFFIX, self.idx_path + PARTIAL_SUFFIX
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.builder = IndexedDatasetBuilder(self.bin_tmp, dtype=dtype)
        self.documents = 0
        self.tokens = 0
        self._committed = False

    def add_document(self, tokens: numpy.ndarray) -> None:
        self.builder.add_document(tokens, [len(tokens)])
        self.documents += 1
        self.tokens += len(tokens)

    def add_documents(self, flat_tokens: numpy.ndarray, lengths: Sequence[int]) -> None:
        """Add consecutive documents given as one flat token array and their lengths."""
        start = 0
        for length in lengths:
            self.add_document(flat_tokens[start:start + length])
            start += length

    def add_index(self, prefix: str) -> None:
        """Append a whole existing prefix (megatron's add_index: copies its .bin, extends the index)."""
        self.builder.add_index(prefix)

    def commit(self) -> None:
        self.builder.finalize(self.idx_tmp)
        _fsync(self.bin_tmp)
        _fsync(self.idx_tmp)
        # An older pair stays usable until now; drop its .idx first so that no new-.bin/old-.idx mix ever looks
        # finished, and rename .idx last: until it appears under its final name, IndexedDataset.exists() is False.
        if os.path.exists(self.idx_path):
            os.remove(self.idx_path)
        os.replace(self.bin_tmp, self.bin_path)
        os.replace(self.idx_tmp, self.idx_path)
        _fsync_dir(self.idx_path)
        self._committed = True

    def abort(self) -> None:
        if self._committed:
            return
        try:
            self.builder.data_file.close()
        except Exception:  # noqa: BLE001
            pass
        for path in (self.bin_tmp, self.idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "AtomicIndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

