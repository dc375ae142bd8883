#!/usr/bin/env python3
"""Throughput of tools/preprocess_data.py on a real corpus: documents/s and tokens/s, in total and per worker.

By default the corpus is the Python standard library of this machine (data_prep/build_sample_corpus.py) and the
tokenizer a byte-level BPE trained on it with tools/train_tokenizer.py, so the benchmark runs anywhere without
network; pass --corpus and --tokenizer-type/--tokenizer-model to measure your own data and tokenizer (e.g. the
Mistral-NeMo-Minitron tokenizer folder). Each worker count is run --repeat times on the same input into a fresh
output; the best run is reported. Times are wall-clock for the whole run, including starting the worker
processes and loading the tokenizer in each (about a second), so use a corpus of tens of MB or more.

    python benchmarks/bench_preprocess.py --size-mb 50 --workers 1 2 4 8
    python benchmarks/bench_preprocess.py --corpus /data/shard.jsonl.zst \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Mistral-NeMo-Minitron-8B-Base --workers 16

Prints a table and, with --json, one JSON object per worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.build_sample_corpus import build_corpus  # noqa: E402
from megatron_flash.data import preprocess  # noqa: E402
from megatron_flash.data import train_tokenizer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", default=None, help="input files/folders/globs (default: stdlib corpus)")
    parser.add_argument("--size-mb", type=float, default=20.0, help="size of the generated stdlib corpus")
    parser.add_argument("--tokenizer-type", default=None, choices=("HuggingFaceTokenizer", "SentencePieceTokenizer"))
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocab of the tokenizer trained when none given")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--json", action="store_true", help="also print one JSON object per worker count")
    parser.add_argument("--keep", default=None, help="keep the corpus/tokenizer/outputs in this folder")
    args = parser.parse_args(argv)

    work = args.keep or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(work, exist_ok=True)
    try:
        corpus = args.corpus
        if corpus is None:
            manifest = build_corpus(os.path.join(work, "corpus"), size_mb=args.size_mb)
            corpus = [os.path.join(work, "corpus", name) for name in manifest["train_files"]]
            print(f"corpus: Python {manifest['python']} stdlib, {manifest['train']['documents']} documents, "
                  f"{manifest['train']['bytes'] / 1e6:.1f} MB", file=sys.stderr)
        tokenizer_type, tokenizer_model = args.tokenizer_type, args.tokenizer_model
        if tokenizer_type is None:
            tokenizer_type, tokenizer_model = "HuggingFaceTokenizer", os.path.join(work, "tokenizer")
            started = time.monotonic()
            train_tokenizer.main(["--input", *corpus, "--tokenizer-type", tokenizer_type, "--output", tokenizer_model,
                                  "--vocab-size", str(args.vocab_size), "--max-mb", "20", "--workers", "2"])
            print(f"trained a {args.vocab_size}-token byte-level BPE in {time.monotonic() - started:.1f} s",
                  file=sys.stderr)

        print(f"{'workers':>7} {'docs/s':>10} {'tokens/s':>12} {'MB/s':>7} {'docs/s/worker':>14} "
              f"{'tokens/s/worker':>16} {'seconds':>8}")
        for workers in args.workers:
            best = None
            for attempt in range(args.repeat):
                out = os.path.join(work, f"out_w{workers}_{attempt}")
                config = preprocess.PreprocessConfig(
                    inputs=corpus, output_prefix=out, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                    append_eod=True, workers=workers, batch_lines=args.batch_size, progress=False, overwrite=True)
                summary = preprocess.run(config)
                if best is None or summary.elapsed_s < best.elapsed_s:
                    best = summary
            seconds = best.elapsed_s
            tokens = sum(best.tokens.values())
            row = {"workers": workers, "documents": best.documents, "tokens": tokens, "input_mb": best.input_bytes / 1e6,
                   "seconds": round(seconds, 3), "docs_per_s": best.documents / seconds,
                   "tokens_per_s": tokens / seconds, "mb_per_s": best.input_bytes / 1e6 / seconds,
                   "docs_per_s_per_worker": best.documents / seconds / workers,
                   "tokens_per_s_per_worker": tokens / seconds / workers,
                   "tokenizer": f"{tokenizer_type}:{tokenizer_model}"}
            print(f"{workers:>7} {row['docs_per_s']:>10,.0f} {row['tokens_per_s']:>12,.0f} {row['mb_per_s']:>7.2f} "
                  f"{row['docs_per_s_per_worker']:>14,.0f} {row['tokens_per_s_per_worker']:>16,.0f} {seconds:>8.2f}")
            if args.json:
                print(json.dumps(row))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
