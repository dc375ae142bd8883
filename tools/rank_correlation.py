#!/usr/bin/env python3
"""Spearman rank correlation between the rankings of architectures under two training budgets (the paper's check
that short-training perplexity is a good proxy: 0.888).

Compare two result tables (CSV with a key column and a metric column, e.g. two search results.csv or the files
this tool writes), matched on --key::

    python tools/rank_correlation.py --results-a short/results.csv --results-b long/results.csv

or train the architectures of a search's results.csv under both budgets first (real trainer; reruns resume)::

    python tools/rank_correlation.py --train --candidates runs/search/results.csv --top 10 \\
        --workdir runs/rank_check --latency-table latency_h100.json --train-iters-a 500 --train-iters-b 5000 \\
        --parallel 8 -- --data-path 1.0 data/fineweb_text_document --tokenizer-model tok/ --seq-length 2048 \\
        --micro-batch-size 8 --global-batch-size 64 --eval-iters 20 --lr 1e-3 --bf16
"""

import argparse
import csv
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flash.design import candidates, evolution, latency  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/rank_correlation.py", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0], epilog="Trainer flags (--train) go after '--'.")
    p.add_argument("--results-a", help="results CSV of budget A")
    p.add_argument("--results-b", help="results CSV of budget B")
    p.add_argument("--key", default="pattern,hidden", help="columns that identify an architecture")
    p.add_argument("--metric", default="valid_loss",
                   help="column ranked (lower is better; valid_loss and valid_ppl give the same ranking)")
    g = p.add_argument_group("training both budgets (--train)")
    g.add_argument("--train", action="store_true")
    g.add_argument("--candidates", help="a search's results.csv: its architectures (status done) are trained")
    g.add_argument("--top", type=int, help="only the best N of --candidates (default: all)")
    g.add_argument("--workdir", help="folder for the runs and the two result tables")
    g.add_argument("--latency-table", help="the search's latency table (gives the widths rule)")
    g.add_argument("--train-iters-a", type=int, help="budget A (the short, proxy budget)")
    g.add_argument("--train-iters-b", type=int, help="budget B (the longer budget)")
    candidates.add_launcher_args(p)
    return p


def read_table(path: str, key: list, metric: str) -> dict:
    if not os.path.exists(path):
        raise SystemExit(f"error: {path}: no such file")
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in key + [metric] if rows and c not in rows[0]]
    if missing:
        raise SystemExit(f"error: {path} has no column {', '.join(missing)} (columns: {', '.join(rows[0])})")
    out = {}
    for r in rows:
        value = r.get(metric, "")
        if value in ("", None) or not math.isfinite(float(value)):
            continue
        out[tuple(r[k] for k in key)] = float(value)
    return out


def compare(a: dict, b: dict) -> dict:
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise SystemExit(f"error: {len(common)} architectures appear in both tables with a finite metric; need >= 2")
    va, vb = [a[k] for k in common], [b[k] for k in common]
    rho = evolution.spearman(va, vb)
    ra, rb = evolution.rankdata(va), evolution.rankdata(vb)
    return {"spearman": rho, "architectures": len(common), "only_a": len(set(a) - set(b)),
            "only_b": len(set(b) - set(a)), "rows": [(k, x, y, p, q) for k, x, y, p, q in zip(common, va, vb, ra, rb)]}


def train_both(args, trainer_args) -> tuple:
    for name in ("candidates", "workdir", "latency_table", "train_iters_a", "train_iters_b"):
        if getattr(args, name) is None:
            raise SystemExit(f"error: --train needs --{name.replace('_', '-')}")
    if not trainer_args:
        raise SystemExit("error: give the trainer flags after '--' (data, batch, --eval-iters, ...)")
    for flag in ("--train-iters", "--train-tokens"):
        if flag in trainer_args:
            raise SystemExit(f"error: {flag} is set by --train-iters-a/-b; leave it out of the trainer flags")
    with open(args.candidates, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "done"]
    rows.sort(key=lambda r: float(r["valid_loss"]))
    rows = rows[:args.top] if args.top else rows
    if len(rows) < 2:
        raise SystemExit(f"error: {args.candidates} has {len(rows)} finished architectures; need >= 2")
    rule = latency.LatencyTable.load(args.latency_table).rule
    launcher = candidates.launcher_from_args(args)
    paths = []
    for label, iters in (("a", args.train_iters_a), ("b", args.train_iters_b)):
        jobs = {f"{r['id']}": {"pattern": r["pattern"], "hidden": int(r["hidden"]),
                               "trainer_args": list(trainer_args) + ["--train-iters", str(iters)]} for r in rows}
        print(f"[rank] budget {label}: {iters} iterations x {len(jobs)} architectures")
        results = candidates.train_many(os.path.join(args.workdir, f"budget_{label}"), jobs, rule, launcher)
        path = os.path.join(args.workdir, f"results_{label}.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "pattern", "hidden", "train_iters", "status", "valid_loss", "valid_ppl"])
            for name, job in jobs.items():
                res = results.get(name, {})
                writer.writerow([name, job["pattern"], job["hidden"], iters, res.get("status", "missing"),
                                 res.get("valid_loss", ""), res.get("valid_ppl", "")])
        paths.append(path)
    return tuple(paths)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trainer_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if args.train:
        try:
            path_a, path_b = train_both(args, trainer_args)
        except (latency.LatencyError, candidates.CandidateError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        if not (args.results_a and args.results_b):
            print("error: give --results-a and --results-b, or --train (see --help)", file=sys.stderr)
            return 2
        path_a, path_b = args.results_a, args.results_b
    key = [k.strip() for k in args.key.split(",") if k.strip()]
    report = compare(read_table(path_a, key, args.metric), read_table(path_b, key, args.metric))
    print(f"{'architecture':<40s} {'A ' + args.metric:>14s} {'rank A':>7s} {'B ' + args.metric:>14s} {'rank B':>7s}")
    for k, x, y, p, q in sorted(report["rows"], key=lambda row: row[3]):
        print(f"{' @ '.join(k)[:40]:<40s} {x:14.4f} {p:7.1f} {y:14.4f} {q:7.1f}")
    extra = ""
    if report["only_a"] or report["only_b"]:
        extra = f" ({report['only_a']} only in A, {report['only_b']} only in B: left out)"
    print(f"Spearman rank correlation: {report['spearman']:.3f} over {report['architectures']} architectures{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
