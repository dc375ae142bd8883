#!/usr/bin/env python3
"""Aging-evolution search of Nemotron-Flash hybrid architectures under a decode-latency target.

    python tools/search_arch.py --workdir runs/search --latency-table latency_h100.json --latency-target-ms 9.5 \\
        --population 16 --sample-size 4 --cycles 10 --per-cycle 10 --parallel 8 \\
        -- --data-path 1.0 data/fineweb_text_document --tokenizer-model tok/ --seq-length 2048 \\
           --micro-batch-size 8 --global-batch-size 64 --train-iters 500 --eval-iters 20 --lr 1e-3 --bf16

Everything after ``--`` is passed to the trainer for every candidate (megatron_flash.pretrain flags; --preset and
--pattern are set per candidate; evaluation runs after the last iteration). Rerunning the same command resumes
the search in --workdir. Outputs: search_state.json, candidates/<id>/, results.csv, results.md, pareto.png.
See docs/design_tools.md and megatron_flash/design/evolution.py.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flash import patterns  # noqa: E402
from megatron_flash.design import candidates, evolution, latency, space  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/search_arch.py", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                epilog="Trainer flags go after '--'.")
    p.add_argument("--workdir", required=True, help="search folder (state, candidates, results); reruns resume")
    p.add_argument("--latency-table", required=True, help="JSON from tools/profile_latency.py table")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--latency-target-ms", type=float,
                        help="decode-step latency budget (ms per token, as predicted by the table)")
    target.add_argument("--latency-target-like", metavar="PATTERN@HIDDEN",
                        help="budget = the table's prediction for this model, e.g. the released 1B: "
                             "'DFMFAFMF DFMFAFMF DFMFDFMF@2048'")

    g = p.add_argument_group("search space")
    g.add_argument("--hidden-sizes", default="1024:2560:256",
                   help="candidate hidden sizes: start:stop:step or a list (default 1024:2560:256); each "
                        "architecture gets the largest one that meets the latency target")
    g.add_argument("--mixers", default="DAM", help="mixer types: D DeltaNet, A attention, M Mamba2 (S: sliding)")
    g.add_argument("--ratios", default="0:1,1:1,1:2,1:3", help="mixer ratios within a block")
    g.add_argument("--ffn-counts", default="0,1,2", help="FFNs after each mixer")
    g.add_argument("--num-stages", type=int, default=3)
    g.add_argument("--min-blocks", type=int, default=1, help="fewest blocks per stage")
    g.add_argument("--max-blocks", type=int, default=8, help="most blocks per stage")
    g.add_argument("--max-operators", type=int, default=30, help="layers (mixers + FFNs) at most")

    g = p.add_argument_group("evolution")
    g.add_argument("--population", type=int, default=16)
    g.add_argument("--sample-size", type=int, default=4, help="members sampled to pick each parent")
    g.add_argument("--cycles", type=int, default=10, help="rounds of children (may be raised on resume)")
    g.add_argument("--per-cycle", type=int, default=10, help="children per cycle (the paper: 10, in parallel)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--allow-option-changes", action="store_true",
                   help="resume even if the space, options or trainer flags differ from the state's")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="no batch of candidates starts after this many minutes (running ones finish); the search "
                        "then exits with status 3 and the same command resumes it")
    candidates.add_launcher_args(p)
    return p


def _pairs(text: str, flag: str):
    try:
        out = []
        for item in text.replace(" ", "").split(","):
            a, b = item.split(":")
            out.append((int(a), int(b)))
        return tuple(out)
    except ValueError:
        raise space.SpaceError(f"{flag} {text!r}: give a:b pairs separated by commas, e.g. 0:1,1:1,1:2") from None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trainer_args = argv[:cut], argv[cut + 1:]
    start = time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        parser.error(f"--time-budget-min must be positive, got {args.time_budget_min:g}")
    if not trainer_args:
        print("error: give the trainer flags after '--' (data, batch, --train-iters, --eval-iters, ...)",
              file=sys.stderr)
        return 2
    try:
        table = latency.LatencyTable.load(args.latency_table)
        target_ms = args.latency_target_ms
        if args.latency_target_like:
            pattern, _, hidden = args.latency_target_like.rpartition("@")
            if not pattern or not hidden.isdigit():
                raise space.SpaceError(f"--latency-target-like {args.latency_target_like!r}: give PATTERN@HIDDEN")
            target_ms = table.predict(pattern, int(hidden))
            print(f"[search] latency target {target_ms:.4f} ms: the table's prediction for {pattern} @ {hidden}")
        search_space = space.SearchSpace(
            mixers=tuple(args.mixers.upper()), ratios=_pairs(args.ratios, "--ratios"),
            ffn_counts=tuple(int(x) for x in args.ffn_counts.split(",")), num_stages=args.num_stages,
            min_blocks=args.min_blocks, max_blocks=args.max_blocks, max_operators=args.max_operators,
            hidden_sizes=space.parse_hidden_sizes(args.hidden_sizes))
        search = evolution.EvolutionSearch(
            args.workdir, search_space, table, target_ms, trainer_args, population=args.population,
            sample_size=args.sample_size, cycles=args.cycles, per_cycle=args.per_cycle, seed=args.seed,
            launcher=candidates.launcher_from_args(args), allow_option_changes=args.allow_option_changes)
        best = search.run(deadline=start + 60 * args.time_budget_min if args.time_budget_min is not None else None)
    except (space.SpaceError, latency.LatencyError, patterns.PatternError, evolution.SearchError,
            candidates.CandidateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if search.stopped_early:
        return 3
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
