"""Tokenize JSONL/Parquet corpora into megatron ``{prefix}_{key}_document.bin/.idx`` files (engine and CLI).

``tools/preprocess_data.py`` is the command-line entry point; Megatron-LM's flags are kept so that its users need
not relearn anything. How it works:

* the main process reads records (raw JSONL lines or Parquet rows) in input order and cuts them into batches;
* ``--workers`` processes decode, parse, validate (see :mod:`megatron_flash.data.records`) and tokenize a whole
  batch per call (:meth:`Tokenizer.tokenize_batch`), returning flat token arrays;
* results are consumed strictly in submission order, with a bounded number in flight (``Pool.imap`` would read the
  whole input ahead), so the output is byte-identical for any number of workers;
* outputs are written under ``.partial`` names and renamed when complete (:mod:`.indexed_output`); a rerun skips
  keys whose outputs are complete;
* bad records are skipped and reported with file and line, or stop the run under ``--strict``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy

from megatron_flash.data import inputs, records
from megatron_flash.data.indexed_output import AtomicIndexedWriter, is_complete, token_dtype
from megatron_flash.data.records import BLANK, BadRecordError, Issue
from megatron_flash.data.tokenizer import TOKENIZER_TYPES, TokenizerError, build_tokenizer

logger = logging.getLogger("preprocess_data")

REPORT_SUFFIX = "_preprocess_report.json"
MAX_STORED_ISSUES = 100_000  # the report keeps this many issue lines; the counts are always exact


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's naming: ``{output_prefix}_{key}_document`` (document-level, no sentence splitting)."""
    return f"{output_prefix}_{key}_document"


@dataclass
class PreprocessConfig:
    inputs: List[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None
    json_keys: Tuple[str, ...] = ("text",)
    append_eod: bool = False
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    log_interval: int = 10_000
    batch_lines: int = 512
    batch_bytes: int = 4 << 20
    max_reported: int = 50
    progress: Optional[bool] = None  # None: a progress bar only on a terminal


@dataclass
class Summary:
    files: List[str]
    outputs: Dict[str, str]
    written_keys: List[str]
    records: int = 0
    documents: int = 0
    blank_lines: int = 0
    input_bytes: int = 0
    tokens: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, int] = field(default_factory=dict)
    issues: List[Issue] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "files": self.files, "outputs": self.outputs, "written_keys": self.written_keys,
            "records": self.records, "documents": self.documents, "blank_lines": self.blank_lines,
            "input_bytes": self.input_bytes, "tokens": self.tokens, "skipped": self.skipped,
            "skipped_total": self.skipped_total, "elapsed_s": round(self.elapsed_s, 3),
            "issues": [i.to_dict() for i in self.issues],
        }


# ---------------------------------------------------------------------------------------------------------------
# Worker side: one tokenizer per process, one call per batch.
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Task:
    path: str
    items: List[Tuple[int, inputs.RawRecord]]
    read_error: Optional[Tuple[int, str]] = None  # (line, message): the file could not be read past this line


@dataclass
class _BatchResult:
    tokens: Dict[str, numpy.ndarray]
    lengths: Dict[str, numpy.ndarray]
    documents: int
    records: int
    blank: int
    nbytes: int
    issues: List[Issue]


_WORKER: dict = {}


def _init_worker(tokenizer_args: dict, keys: Sequence[str], append_eod: bool, dtype) -> None:
    # One core per worker: the Rust tokenizer's own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C and SLURM's SIGTERM (sent to every process of the job step) are the parent's to handle: it stops
    # submitting, lets the workers finish the few batches in flight and exit, then removes the partial outputs.
    # A worker that died mid-batch would leave the pool waiting for that batch's result forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _WORKER["tokenizer"] = build_tokenizer(**tokenizer_args)
    _WORKER["keys"] = tuple(keys)
    _WORKER["append_eod"] = append_eod
    _WORKER["dtype"] = dtype


def _raw_size(raw: inputs.RawRecord, keys: Sequence[str]) -> int:
    if isinstance(raw, (bytes, bytearray)):
        return len(raw) + 1
    return sum(len(v) if isinstance(v, (str, bytes)) else 0 for v in (raw.get(k) for k in keys))


def _tokenize_texts(tokenizer, texts: List[str]) -> List[Optional[List[int]]]:
    """Batched tokenization; if the batch call raises, tokenize one by one so only the culprit is lost (None)."""
    try:
        return tokenizer.tokenize_batch(texts)
    except Exception:  # noqa: BLE001 - isolate the failing text below
        out = []
        for text in texts:
            try:
                out.append(tokenizer.tokenize(text))
            except Exception:  # noqa: BLE001
                out.append(None)
        return out


def _encode_task(task: _Task) -> _BatchResult:
    tokenizer, keys, append_eod, dtype = (_WORKER[k] for k in ("tokenizer", "keys", "append_eod", "dtype"))
    issues: List[Issue] = []
    kept_lines: List[int] = []
    texts_per_key: List[List[str]] = [[] for _ in keys]
    blank = nbytes = 0
    for line, raw in task.items:
        nbytes += _raw_size(raw, keys)
        parsed = records.parse_record(raw, keys)
        if isinstance(parsed, tuple):
            if parsed[0] == BLANK:
                blank += 1
            else:
                issues.append(Issue(task.path, line, *parsed))
            continue
        kept_lines.append(line)
        for column, text in zip(texts_per_key, parsed):
            column.append(text)

    ids_per_key = [_tokenize_texts(tokenizer, texts) for texts in texts_per_key]
    keep = []
    for row, line in enumerate(kept_lines):
        problem = None
        for key, ids in zip(keys, ids_per_key):
            if ids[row] is None:
                problem = (records.TOKENIZER_ERROR, f"tokenizer failed on field {key!r}")
            elif not ids[row]:
                problem = (records.NO_TOKENS, f"field {key!r} tokenized to no tokens")
            if problem:
                break
        if problem:
            issues.append(Issue(task.path, line, *problem))
        else:
            keep.append(row)
    issues.sort(key=lambda issue: issue.line)
    if task.read_error is not None:
        issues.append(Issue(task.path, task.read_error[0], records.READ_ERROR, task.read_error[1]))

    eod = [tokenizer.eod] if append_eod else []
    tokens, lengths = {}, {}
    for key, ids in zip(keys, ids_per_key):
        docs = [ids[row] + eod for row in keep]
        lengths[key] = numpy.fromiter((len(d) for d in docs), dtype=numpy.int64, count=len(docs))
        tokens[key] = numpy.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(lengths[key].sum()))
    return _BatchResult(tokens, lengths, len(keep), len(task.items) - blank, blank, nbytes, issues)


# ---------------------------------------------------------------------------------------------------------------
# Main process: read in order, keep a bounded window of batches in flight, write in order.
# ---------------------------------------------------------------------------------------------------------------
def _tasks(files: Sequence[str], keys: Sequence[str], batch_lines: int, batch_bytes: int) -> Iterator[_Task]:
    for path in files:
        items, size, last_line = [], 0, 0
        try:
            for line, raw in inputs.iter_records(path, keys):
                items.append((line, raw))
                last_line = line
                size += _raw_size(raw, keys)
                if len(items) >= batch_lines or size >= batch_bytes:
                    yield _Task(path, items)
                    items, size = [], 0
        except Exception as err:  # noqa: BLE001 - corrupt archive, I/O error: keep what was read, report the rest
            yield _Task(path, items, read_error=(last_line + 1, f"{type(err).__name__}: {err}"))
            continue
        if items:
            yield _Task(path, items)


def _ordered(pool, tasks: Iterator[_Task], in_flight: int) -> Iterator[_BatchResult]:
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode_task, (task,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    # fork starts workers in milliseconds with megatron/torch already imported; spawn elsewhere.
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class _Progress:
    """tqdm bar (documents/s and MB/s) on a terminal, plus a log line every ``log_interval`` documents."""

    def __init__(self, total_bytes: Optional[int], log_interval: int, enabled: Optional[bool]):
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
                        disable=(not enabled) if enabled is not None else None, dynamic_ncols=True)
        self.log_interval = max(1, log_interval)
        self.start = time.monotonic()
        self.documents = 0
        self.nbytes = 0
        self.next_log = self.log_interval

    def update(self, documents: int, nbytes: int) -> None:
        self.documents += documents
        self.nbytes += nbytes
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.update(nbytes)
        self.bar.set_postfix_str(f"{self.documents / elapsed:,.0f} docs/s", refresh=False)
        if self.documents >= self.next_log:
            logger.info("processed %d documents (%.0f docs/s, %.2f MB/s)", self.documents,
                        self.documents / elapsed, self.nbytes / elapsed / 1e6)
            self.next_log = (self.documents // self.log_interval + 1) * self.log_interval

    def close(self) -> None:
        self.bar.close()


def run(config: PreprocessConfig) -> Summary:
    """Tokenize ``config.inputs`` into one ``.bin/.idx`` pair per JSON key; returns what was done.

    Raises InputError/TokenizerError/ValueError for unusable arguments before any output is opened, and
    BadRecordError at the first bad record in strict mode (nothing is left under a final name then).
    """
    start = time.monotonic()
    keys = tuple(config.json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise ValueError(f"--json-keys must be distinct and non-empty, got {list(keys)}")
    if config.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {config.workers}")
    files = inputs.find_input_files(config.inputs)
    tokenizer_args = {"tokenizer_type": config.tokenizer_type, "tokenizer_model": config.tokenizer_model,
                      "vocab_size": config.vocab_size}
    tokenizer = build_tokenizer(**tokenizer_args)
    dtype = token_dtype(tokenizer.vocab_size)
    _check_parquet_columns(files, keys, config.strict)

    outputs = {key: output_prefix_for(config.output_prefix, key) for key in keys}
    todo = [key for key in keys if config.overwrite or not is_complete(outputs[key])]
    summary = Summary(files=files, outputs=outputs, written_keys=todo)
    for key in keys:
        if key not in todo:
            logger.info("output for key %r is complete, skipping: %s.bin/.idx", key, outputs[key])
    if not todo:
        summary.elapsed_s = time.monotonic() - start
        return summary

    logger.info("tokenizing %d file(s) with %s (vocab %d, %s tokens) on %d worker(s) -> %s",
                len(files), tokenizer, tokenizer.vocab_size, numpy.dtype(dtype).name, config.workers,
                ", ".join(outputs[k] for k in todo))
    writers = {key: AtomicIndexedWriter(outputs[key], dtype) for key in todo}
    progress = _Progress(inputs.input_size_bytes(files), config.log_interval, config.progress)
    try:
        pool = _pool_context().Pool(config.workers, initializer=_init_worker,
                                    initargs=(tokenizer_args, keys, config.append_eod, dtype))
        try:
            tasks = _tasks(files, keys, config.batch_lines, config.batch_bytes)
            for result in _ordered(pool, tasks, in_flight=4 * config.workers):
                if result.issues and config.strict:
                    raise BadRecordError(result.issues[0])
                for key, writer in writers.items():
                    writer.add_documents(result.tokens[key], result.lengths[key])
                _account(summary, result)
                progress.update(result.documents, result.nbytes)
        finally:
            # Close and join, also on errors and signals, never terminate(): its SIGTERM can land on a worker that
            # holds the result queue's lock, and the pool's task handler then waits for that lock forever (a CI
            # hang under --strict). _ordered bounds the work in flight, so this returns within a few batches.
            pool.close()
            pool.join()
        for key, writer in writers.items():
            writer.commit()
            summary.tokens[key] = writer.tokens
    finally:
        progress.close()
        for writer in writers.values():
            writer.abort()  # no-op after commit
    summary.elapsed_s = time.monotonic() - start
    _write_report(config.output_prefix + REPORT_SUFFIX, summary)
    return summary


def _account(summary: Summary, result: _BatchResult) -> None:
    summary.records += result.records
    summary.documents += result.documents
    summary.blank_lines += result.blank
    summary.input_bytes += result.nbytes
    for issue in result.issues:
        summary.skipped[issue.reason] = summary.skipped.get(issue.reason, 0) + 1
        if len(summary.issues) < MAX_STORED_ISSUES:
            summary.issues.append(issue)


def _check_parquet_columns(files: Sequence[str], keys: Sequence[str], strict: bool) -> None:
    for path in files:
        if not inputs.is_parquet(path):
            continue
        missing = [k for k in keys if k not in inputs.parquet_columns(path)]
        if missing and strict:
            raise BadRecordError(Issue(path, 1, records.MISSING_KEY, f"Parquet file has no column(s) {missing}"))
        if missing:
            logger.warning("%s has no column(s) %s: its rows will be skipped as missing_key", path, missing)


def _write_report(path: str, summary: Summary) -> None:
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(summary.to_dict(), fh, indent=1)
    os.replace(tmp, path)


def format_summary(summary: Summary, max_reported: int = 50) -> str:
    lines = []
    if not summary.written_keys:
        lines.append("all outputs already complete; nothing to do (use --overwrite to redo): "
                     + ", ".join(summary.outputs.values()))
        return "\n".join(lines)
    rate = summary.documents / max(summary.elapsed_s, 1e-9)
    lines.append(f"done in {summary.elapsed_s:.1f} s: {summary.records} records from {len(summary.files)} file(s), "
                 f"{summary.documents} documents kept ({rate:,.0f} docs/s, "
                 f"{summary.input_bytes / max(summary.elapsed_s, 1e-9) / 1e6:.2f} MB/s)")
    for key in summary.written_keys:
        lines.append(f"  {summary.outputs[key]}.bin/.idx: {summary.tokens.get(key, 0)} tokens")
    if summary.blank_lines:
        lines.append(f"  {summary.blank_lines} blank line(s) ignored")
    if summary.skipped_total:
        counts = ", ".join(f"{reason}={n}" for reason, n in sorted(summary.skipped.items()))
        lines.append(f"skipped {summary.skipped_total} bad record(s): {counts}")
        for issue in summary.issues[:max_reported]:
            lines.append(f"  {issue}")
        if summary.skipped_total > max_reported:
            lines.append(f"  ... {summary.skipped_total - max_reported} more, all listed (up to "
                         f"{MAX_STORED_ISSUES}) in the report file")
    else:
        lines.append("no bad records")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line (Megatron-LM's tools/preprocess_data.py flags)
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize .jsonl/.jsonl.gz/.jsonl.zst/.parquet documents into megatron "
                    "{output_prefix}_{key}_document.bin/.idx files.",
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, nargs="+",
                       help="input file(s), folder(s) (searched recursively) or glob(s)")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="fields to tokenize; one output per key (default: text)")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first bad record instead of skipping and reporting it")

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None,
                       help="HuggingFace folder / tokenizer.json, or SentencePiece .model")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")

    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="path prefix; writes {prefix}_{key}_document.bin/.idx and {prefix}" + REPORT_SUFFIX)
    group.add_argument("--overwrite", action="store_true", help="redo outputs that are already complete")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    group.add_argument("--batch-size", type=int, default=512, help="records per worker task (default 512)")
    group.add_argument("--log-interval", type=int, default=10_000, help="log progress every N documents")
    group.add_argument("--max-reported", type=int, default=50, help="bad records printed in the summary")
    group.add_argument("--no-progress-bar", action="store_true", help="never draw the tqdm bar")
    return parser


def _validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.log_interval < 1:
        parser.error(f"--log-interval must be at least 1, got {args.log_interval}")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys has duplicates: {args.json_keys}")
    if args.tokenizer_type == "NullTokenizer":
        if args.vocab_size is None:
            parser.error("--tokenizer-type NullTokenizer needs --vocab-size")
    elif not args.tokenizer_model:
        parser.error(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    elif not os.path.exists(args.tokenizer_model):
        parser.error(f"--tokenizer-model {args.tokenizer_model!r} does not exist")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    existing = out_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        parser.error(f"--output-prefix {args.output_prefix!r}: {existing!r} is not writable")
    try:
        inputs.find_input_files(args.input)
    except inputs.InputError as err:
        parser.error(f"--input: {err}")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size, json_keys=tuple(args.json_keys),
        append_eod=args.append_eod, workers=args.workers, strict=args.strict, overwrite=args.overwrite,
        log_interval=args.log_interval, batch_lines=args.batch_size, max_reported=args.max_reported,
        progress=False if args.no_progress_bar else None,
    )


def _raise_on_sigterm(signum, frame):  # noqa: ARG001
    # SLURM's time limit sends SIGTERM: unwind normally so the .partial files are removed.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its index reader logs every file it opens
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        summary = run(config_from_args(args))
    except BadRecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (inputs.InputError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: partial outputs removed, nothing was renamed into place", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(summary, args.max_reported))
    return 0
