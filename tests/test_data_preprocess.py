"""tools/preprocess_data.py: round trip through megatron's IndexedDataset, determinism across worker counts, bad
input handling, and outputs that only appear when complete."""

import filecmp
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy
import pytest

from megatron_flash.data import preprocess
from megatron_flash.data.indexed_output import PARTIAL_SUFFIX, AtomicIndexedWriter, is_complete
from megatron_flash.data.records import BadRecordError
from tests.test_data_fixtures import (REPO, jsonl_texts, read_documents, sample_corpus, tokenizer, tokenizer_args,
                                      train_files)

# Every test here may start tokenizer worker processes: never let one hang the suite.
pytestmark = pytest.mark.timeout(120)


def run_tool(*args):
    return preprocess.main([*map(str, args), "--no-progress-bar"])


def outputs(prefix):
    return [prefix + ".bin", prefix + ".idx"]


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_round_trip_equals_direct_tokenization(tmp_path, kind):
    source = train_files()[0]
    assert run_tool("--input", source, "--output-prefix", tmp_path / "out", "--append-eod",
                    *tokenizer_args(kind)) == 0
    prefix = str(tmp_path / "out_text_document")
    tok = tokenizer(kind)
    expected = [tok.tokenize(text) + [tok.eod] for text in jsonl_texts(source)]
    assert read_documents(prefix) == expected
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(prefix).index.dtype == numpy.uint16  # vocab 1024: megatron's optimal dtype
    report = json.load(open(str(tmp_path / "out") + preprocess.REPORT_SUFFIX))
    assert report["documents"] == len(expected) and report["skipped_total"] == 0
    assert report["tokens"]["text"] == sum(map(len, expected))


@pytest.mark.timeout(120)
def test_one_and_four_workers_write_identical_bytes(tmp_path):
    # Small batches so that four workers really interleave many tasks.
    common = ["--input", *train_files(), "--append-eod", "--batch-size", "2", *tokenizer_args("sp")]
    assert run_tool(*common, "--output-prefix", tmp_path / "w1", "--workers", "1") == 0
    assert run_tool(*common, "--output-prefix", tmp_path / "w4", "--workers", "4") == 0
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(f"{tmp_path}/w1_text_document{suffix}", f"{tmp_path}/w4_text_document{suffix}",
                           shallow=False)
    texts = [t for f in train_files() for t in jsonl_texts(f)]
    assert len(read_documents(f"{tmp_path}/w4_text_document")) == len(texts)


GOOD = ["first good document", "second good document\nwith two lines", "  third, with leading spaces",
        "fourth ✓ unicode", "fifth"]


def _bad_corpus(folder):
    """A .jsonl with every kind of bad line between good ones, plus .gz and .zst files of good lines."""
    import zstandard

    lines = [
        json.dumps({"text": GOOD[0]}).encode(),                      # 1 good
        b'{"text": "unterminated',                                   # 2 invalid JSON
        json.dumps({"body": "no text key"}).encode(),                # 3 missing key
        json.dumps({"text": 42}).encode(),                           # 4 non-string key
        b'{"text": "caf\xe9 latin-1"}',                              # 5 invalid UTF-8
        json.dumps({"text": GOOD[1]}).encode(),                      # 6 good
        json.dumps({"text": ""}).encode(),                           # 7 empty text
        b"",                                                         # 8 blank line: ignored, not an error
        json.dumps({"text": None}).encode(),                         # 9 null: non-string
        json.dumps(["a", "list"]).encode(),                          # 10 not an object
        b'{"text": "lone \\ud800 surrogate"}',                       # 11 invalid UTF-8 (surrogate escape)
        json.dumps({"text": "   \n\t "}).encode(),                   # 12 whitespace only: empty text
        json.dumps({"text": GOOD[2]}).encode(),                      # 13 good
        json.dumps({"text": ["nested"]}).encode(),                   # 14 non-string key
    ]
    (folder / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(folder / "b.jsonl.gz", "wb") as fh:
        fh.write((json.dumps({"text": GOOD[3]}) + "\n").encode())
    (folder / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps({"text": GOOD[4], "id": 5}) + "\n").encode()))
    expected = {2: "invalid_json", 3: "missing_key", 4: "non_string_key", 5: "invalid_utf8", 7: "empty_text",
                9: "non_string_key", 10: "not_an_object", 11: "invalid_utf8", 12: "empty_text", 14: "non_string_key"}
    return folder, expected


def test_bad_lines_are_skipped_reported_and_good_lines_kept(tmp_path, capsys):
    folder, expected = _bad_corpus(tmp_path / "in" if (tmp_path / "in").mkdir() is None else None)
    assert run_tool("--input", folder, "--output-prefix", tmp_path / "out", "--append-eod", "--workers", "2",
                    *tokenizer_args("sp")) == 0
    tok = tokenizer("sp")
    assert read_documents(f"{tmp_path}/out_text_document") == [tok.tokenize(t) + [tok.eod] for t in GOOD]

    out = capsys.readouterr().out
    report = json.load(open(f"{tmp_path}/out{preprocess.REPORT_SUFFIX}"))
    bad_file = str(folder / "a.jsonl")
    reported = {(i["file"], i["line"]): i["reason"] for i in report["issues"]}
    assert reported == {(bad_file, line): reason for line, reason in expected.items()}
    assert report["skipped_total"] == len(expected) and report["blank_lines"] == 1
    assert report["documents"] == len(GOOD)
    for line, reason in expected.items():
        assert f"{bad_file}:{line}: {reason}:" in out  # the printed summary names file, line and reason
    assert "field 'text' is int, not a string" in out and "field 'text' is missing" in out


def test_strict_stops_at_first_bad_line_and_leaves_no_output(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    folder, _ = _bad_corpus(tmp_path / "in")
    config = preprocess.PreprocessConfig(inputs=[str(folder)], output_prefix=str(tmp_path / "out"),
                                         tokenizer_type="SentencePieceTokenizer",
                                         tokenizer_model=tokenizer("sp").path, strict=True, progress=False)
    with pytest.raises(BadRecordError) as exc:
        preprocess.run(config)
    assert exc.value.issue.line == 2 and exc.value.issue.reason == "invalid_json"
    assert f"{folder / 'a.jsonl'}:2: invalid_json" in str(exc.value)

    assert run_tool("--input", folder, "--output-prefix", tmp_path / "out", "--strict", *tokenizer_args("sp")) == 1
    assert f"{folder / 'a.jsonl'}:2: invalid_json" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["in"]  # no .bin/.idx, no .partial, no report


def test_parquet_and_multiple_keys_stay_aligned(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["alpha doc", "beta doc", None, "delta doc"],
                      "title": ["A", "", "C", "D"]})
    pq.write_table(table, tmp_path / "docs.parquet")
    assert run_tool("--input", tmp_path / "docs.parquet", "--output-prefix", tmp_path / "out",
                    "--json-keys", "text", "title", *tokenizer_args("hf")) == 0
    tok = tokenizer("hf")
    # row 2 has an empty title, row 3 a null text: both rows are dropped from both outputs
    assert read_documents(f"{tmp_path}/out_text_document") == [tok.tokenize(t) for t in ("alpha doc", "delta doc")]
    assert read_documents(f"{tmp_path}/out_title_document") == [tok.tokenize(t) for t in ("A", "D")]
    report = json.load(open(f"{tmp_path}/out{preprocess.REPORT_SUFFIX}"))
    assert {(i["line"], i["reason"]) for i in report["issues"]} == {(2, "empty_text"), (3, "non_string_key")}

    with pytest.raises(BadRecordError, match="no column"):
        preprocess.run(preprocess.PreprocessConfig(
            inputs=[str(tmp_path / "docs.parquet")], output_prefix=str(tmp_path / "x"), json_keys=("body",),
            tokenizer_type="SentencePieceTokenizer", tokenizer_model=tokenizer("sp").path, strict=True,
            progress=False))


def test_atomic_writer_exposes_outputs_only_on_commit(tmp_path):
    prefix = str(tmp_path / "ds")
    with AtomicIndexedWriter(prefix, numpy.uint16) as writer:
        writer.add_document(numpy.array([1, 2, 3]))
        assert not any(os.path.exists(p) for p in outputs(prefix))
        assert os.path.exists(prefix + ".bin" + PARTIAL_SUFFIX)
        writer.commit()
    assert is_complete(prefix) and read_documents(prefix) == [[1, 2, 3]]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]

    # An error inside the block removes the partial files and keeps the previous complete pair.
    with pytest.raises(RuntimeError):
        with AtomicIndexedWriter(prefix, numpy.uint16) as writer:
            writer.add_document(numpy.array([9, 9]))
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"] and read_documents(prefix) == [[1, 2, 3]]

    # What a kill between the two renames, or a truncated copy, leaves behind is not "complete".
    os.truncate(prefix + ".bin", 2)
    assert not is_complete(prefix)
    os.remove(prefix + ".idx")
    assert not is_complete(prefix)


def test_rerun_skips_complete_outputs_and_redoes_incomplete_ones(tmp_path, capsys):
    args = ["--input", train_files()[0], "--output-prefix", tmp_path / "out", "--append-eod", *tokenizer_args("sp")]
    assert run_tool(*args) == 0
    prefix = f"{tmp_path}/out_text_document"
    expected = read_documents(prefix)
    stamps = [os.stat(p).st_mtime_ns for p in outputs(prefix)]
    capsys.readouterr()
    assert run_tool(*args) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert [os.stat(p).st_mtime_ns for p in outputs(prefix)] == stamps

    # A stale .partial and a truncated .bin (as a killed copy would leave) are redone, not trusted.
    open(prefix + ".bin" + PARTIAL_SUFFIX, "wb").write(b"junk")
    os.truncate(prefix + ".bin", 10)
    assert run_tool(*args) == 0
    assert read_documents(prefix) == expected
    assert not os.path.exists(prefix + ".bin" + PARTIAL_SUFFIX)
    assert run_tool(*args, "--overwrite") == 0 and read_documents(prefix) == expected


def _stream_until_partial(fifo, prefix, texts, on_partial):
    """Write ``texts`` into the named pipe the tool reads, wait until its .partial output exists, call on_partial."""
    with open(fifo, "w") as writer:  # blocks until the tool opens the pipe
        for text in texts:
            writer.write(json.dumps({"text": text}) + "\n")
        writer.flush()
        deadline = time.monotonic() + 60
        while not os.path.exists(prefix + ".bin" + PARTIAL_SUFFIX) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.path.exists(prefix + ".bin" + PARTIAL_SUFFIX)
        time.sleep(0.3)  # let it write some documents
        on_partial()


def _rerun_completes(tmp_path, prefix, texts):
    os.remove(tmp_path / "stream.jsonl")
    (tmp_path / "stream.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert run_tool("--input", tmp_path / "stream.jsonl", "--output-prefix", tmp_path / "out", "--append-eod",
                    *tokenizer_args("sp")) == 0
    assert is_complete(prefix) and len(read_documents(prefix)) == len(texts)


@pytest.mark.timeout(120)
def test_sigkilled_run_leaves_nothing_that_looks_finished(tmp_path):
    """The real tool in a subprocess, fed through a named pipe so that it is mid-run, deterministically, when
    SIGKILL arrives: only .partial files may remain, and the rerun completes."""
    fifo, prefix, texts = tmp_path / "stream.jsonl", f"{tmp_path}/out_text_document", jsonl_texts(train_files()[0])
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(fifo), "--output-prefix",
         str(tmp_path / "out"), "--append-eod", "--batch-size", "1", "--no-progress-bar", *tokenizer_args("sp")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _stream_until_partial(fifo, prefix, texts, lambda: (proc.kill(), proc.wait(timeout=60)))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    _rerun_completes(tmp_path, prefix, texts)


@pytest.mark.timeout(120)
def test_sigterm_cleans_partial_files(tmp_path, capsys):
    """SIGTERM (SLURM's time limit) unwinds the run: no final outputs, no .partial files, exit status 130."""
    import threading

    fifo, prefix, texts = tmp_path / "stream.jsonl", f"{tmp_path}/out_text_document", jsonl_texts(train_files()[0])
    os.mkfifo(fifo)
    feeder = threading.Thread(target=_stream_until_partial,
                              args=(fifo, prefix, texts, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    feeder.start()
    try:
        status = run_tool("--input", fifo, "--output-prefix", tmp_path / "out", "--append-eod", "--batch-size", "1",
                          *tokenizer_args("sp"))
    finally:
        feeder.join(timeout=60)
    assert status == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["stream.jsonl"]
    _rerun_completes(tmp_path, prefix, texts)


@pytest.mark.timeout(120)
def test_sigterm_to_the_whole_job_step_cleans_up_and_exits(tmp_path):
    """SLURM signals every process of the step, workers included: they finish their batches, the tool unwinds."""
    fifo, prefix, texts = tmp_path / "stream.jsonl", f"{tmp_path}/out_text_document", jsonl_texts(train_files()[0])
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(fifo), "--output-prefix",
         str(tmp_path / "out"), "--append-eod", "--batch-size", "1", "--workers", "2", "--no-progress-bar",
         *tokenizer_args("sp")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _stream_until_partial(fifo, prefix, texts, lambda: (os.killpg(proc.pid, signal.SIGTERM), proc.wait(timeout=60)))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert sorted(os.listdir(tmp_path)) == ["stream.jsonl"]
    _rerun_completes(tmp_path, prefix, texts)


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    cases = [
        (["--input", tmp_path / "nothing*.jsonl", *tokenizer_args("sp")], "matches no supported files"),
        (["--input", train_files()[0], "--tokenizer-type", "NullTokenizer"], "needs --vocab-size"),
        (["--input", train_files()[0], "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
          tmp_path / "missing.model"], "does not exist"),
        (["--input", train_files()[0], "--workers", "0", *tokenizer_args("sp")], "--workers must be at least 1"),
        (["--input", train_files()[0], "--json-keys", "text", "text", *tokenizer_args("sp")], "duplicates"),
        (["--input", train_files()[0], "--tokenizer-type", "BertWordPieceCase"], "invalid choice"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            run_tool(*args, "--output-prefix", tmp_path / "out")
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert os.path.isdir(sample_corpus())
