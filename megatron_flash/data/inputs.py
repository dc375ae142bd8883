"""Finding input files and reading their records (JSONL lines or Parquet rows) with file/line positions.

Supported inputs: ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` and ``.parquet``; ``.json``/``.json.gz``/``.json.zst``
(one object a line, Megatron-LM's habit) when named explicitly or by a glob. ``--input`` may be a file, a folder
(searched recursively; ``.json`` files there are left alone, since folders often hold ``manifest.json``-like
metadata) or a glob; files are processed in sorted path order so outputs do not depend on the listing order.

Records are yielded raw: a JSONL line as ``bytes`` (decoding and JSON parsing happen in the worker processes, where
bad lines are classified), a Parquet row as a ``dict`` of the requested columns. Line/row numbers are 1-based.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from typing import Iterator, List, Optional, Sequence, Tuple, Union

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
FOLDER_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst") + PARQUET_SUFFIXES  # what a folder scan picks up

RawRecord = Union[bytes, dict]


class InputError(ValueError):
    """Inputs that cannot be used at all (nothing matches, unsupported format, unreadable file)."""


def is_supported(path: str) -> bool:
    return path.lower().endswith(SUPPORTED_SUFFIXES)


def is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def find_input_files(specs: Union[str, Sequence[str]]) -> List[str]:
    """Expand files, folders and globs into a sorted, de-duplicated list of supported files.

    Raises InputError naming the spec that matched nothing or the explicit file of unsupported type.
    """
    if isinstance(specs, str):
        specs = [specs]
    found = []
    for spec in specs:
        if os.path.isdir(spec):
            matches = [
                os.path.join(root, name)
                for root, _, names in os.walk(spec, followlinks=True)
                for name in names
                if name.lower().endswith(FOLDER_SUFFIXES)
            ]
            if not matches:
                raise InputError(f"input folder {spec!r} has no {'/'.join(FOLDER_SUFFIXES)} files")
        elif os.path.exists(spec):  # a regular file, or a named pipe streaming one
            if not is_supported(spec):
                raise InputError(f"input file {spec!r} is not one of {', '.join(SUPPORTED_SUFFIXES)}")
            matches = [spec]
        else:
            matches = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p) and is_supported(p)]
            if not matches:
                raise InputError(f"input {spec!r} is not a file or folder and matches no supported files as a glob")
        found.extend(matches)
    unique = sorted({os.path.normpath(p) for p in found})
    return unique


def _open_jsonl(path: str) -> io.BufferedIOBase:
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        # read_across_frames: files written by concatenating zstd frames (common for sharded dumps) read whole.
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def iter_jsonl_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """(line number, raw line bytes without the newline) for each line of a (compressed) JSONL file."""
    with _open_jsonl(path) as fh:
        for number, line in enumerate(fh, start=1):
            yield number, line.rstrip(b"\r\n")


def parquet_columns(path: str) -> List[str]:
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


def iter_parquet_rows(path: str, columns: Sequence[str], batch_rows: int = 8192) -> Iterator[Tuple[int, dict]]:
    """(row number, {column: value}) for each row; only ``columns`` that exist in the file are read."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    number = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=present):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def iter_records(path: str, keys: Sequence[str]) -> Iterator[Tuple[int, RawRecord]]:
    """(line or row number, raw record) for any supported file."""
    if is_parquet(path):
        return iter_parquet_rows(path, keys)
    return iter_jsonl_lines(path)


def input_size_bytes(paths: Sequence[str]) -> Optional[int]:
    """Total uncompressed size when every input is plain JSONL (progress bar total), else None."""
    total = 0
    for path in paths:
        if not path.lower().endswith((".jsonl", ".json")) or not os.path.isfile(path):
            return None
        total += os.path.getsize(path)
    return total
