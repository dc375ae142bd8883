#!/usr/bin/env python3
"""Depth-width study: models of matched parameter count across depths, their latency, short-training loss, and the
fit L(D, W, N) = L0 + a D^-alpha + b W^-beta + c N^-gamma with its extrapolation error on held-out points.

    python tools/depth_width_study.py --workdir runs/depth_width --latency-table latency_h100.json \\
        --depths 6,12,18,24,30 --param-budgets 300e6,600e6 --train-iters-list 500,1000,2000 --parallel 8 \\
        -- --data-path 1.0 data/fineweb_text_document --tokenizer-model tok/ --seq-length 2048 \\
           --micro-batch-size 8 --global-batch-size 64 --eval-iters 20 --lr 1e-3 --bf16

Depth D = blocks of one mixer and ``--ffns-per-block`` FFNs, the mixers cycling through ``--mixer-cycle``
(e.g. "A": a Llama-like stack; "DMAM": the released model's mix). For each depth and parameter budget the width
(a multiple of --width-multiple) whose parameter count is closest to the budget is used; every such model is
trained for each --train-iters-list length (N = iterations x global batch x sequence length tokens). Reruns skip
finished runs; --fit-only refits study.csv. Outputs: study.csv, fit.json, loss_vs_latency.png.
"""

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flash.design import candidates, latency, scaling  # noqa: E402

COLUMNS = ("name", "depth", "width", "parameters", "budget", "iterations", "tokens", "latency_ms", "pattern",
           "status", "loss", "heldout")


def _numbers(text: str, cast=float) -> list:
    try:
        return [cast(float(x)) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise SystemExit(f"error: {text!r} is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/depth_width_study.py", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0], epilog="Trainer flags go after '--'.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--latency-table", required=True, help="JSON from tools/profile_latency.py table")
    p.add_argument("--depths", default="6,12,18,24,30", help="depths in blocks")
    p.add_argument("--param-budgets", default="300e6,600e6", help="parameter counts to match (one model per depth "
                                                                   "and budget)")
    p.add_argument("--train-iters-list", default="500,1000,2000", help="training lengths (sets N)")
    p.add_argument("--mixer-cycle", default="A", help="mixer of block i is mixer_cycle[i %% len]")
    p.add_argument("--ffns-per-block", type=int, default=1)
    p.add_argument("--width-multiple", type=int, help="widths are multiples of this (default: the head dim)")
    p.add_argument("--min-width", type=int, help="smallest width tried (default: --width-multiple)")
    p.add_argument("--max-width", type=int, default=8192)
    p.add_argument("--holdout", default="largest-tokens",
                   help="points left out of the fit: largest-tokens, largest-depth or random:FRACTION")
    p.add_argument("--fit-only", action="store_true", help="refit and replot study.csv without training")
    candidates.add_launcher_args(p)
    return p


def pattern_for(depth: int, mixer_cycle: str, ffns: int) -> str:
    return " ".join(mixer_cycle[i % len(mixer_cycle)] + "F" * ffns for i in range(depth))


def trainer_shape(trainer_args: list) -> tuple:
    """(global batch, sequence length) the trainer will use with these flags."""
    from megatron_flash.training import arguments

    for flag in ("--train-iters", "--train-tokens"):
        if flag in trainer_args:
            raise SystemExit(f"error: {flag} is set per run by --train-iters-list; leave it out of the trainer flags")
    args = arguments.parse_args(list(trainer_args) + ["--train-iters", "1"], world_size=1)
    return args.global_batch_size, args.seq_length


def plan(args, table, trainer_args) -> list:
    rule = table.rule
    multiple = args.width_multiple or rule.head_dim
    widths = [w for w in range(args.min_width or multiple, args.max_width + 1, multiple) if _valid(rule, w)]
    gbs, seq = trainer_shape(trainer_args)
    rows, cache = [], {}
    for depth in _numbers(args.depths, int):
        pattern = pattern_for(depth, args.mixer_cycle.upper(), args.ffns_per_block)

        def params_of(w, pattern=pattern):
            if (pattern, w) not in cache:
                cache[pattern, w] = rule.parameter_count(pattern, w)
            return cache[pattern, w]

        for budget in _numbers(args.param_budgets):
            width, params = scaling.matched_width(params_of, budget, widths)
            for iters in _numbers(args.train_iters_list, int):
                rows.append({"name": f"d{depth}_w{width}_i{iters}", "depth": depth, "width": width,
                             "parameters": params, "budget": budget, "iterations": iters,
                             "tokens": iters * gbs * seq, "latency_ms": table.predict(pattern, width),
                             "pattern": pattern.replace(" ", "")})
    return rows


def _valid(rule, width) -> bool:
    try:
        rule.heads(width)
        return True
    except ValueError:
        return False


def write_csv(path: str, rows: list) -> None:
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def read_csv(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("depth", "width", "parameters", "iterations", "tokens"):
            r[k] = int(float(r[k]))
        for k in ("budget", "latency_ms"):
            r[k] = float(r[k])
        r["loss"] = float(r["loss"]) if r.get("loss") not in (None, "") else None
    return rows


def fit_and_plot(workdir: str, rows: list, holdout: str) -> dict:
    done = [dict(r, loss=float(r["loss"])) for r in rows if r.get("loss") is not None]
    report = {"points": len(done), "holdout": holdout}
    try:
        fit, errors = scaling.holdout_error(done, holdout)
        held = {r["name"] for r in scaling.split_holdout(done, holdout)[1]}
        for r in rows:
            r["heldout"] = int(r["name"] in held)
        full = scaling.fit_scaling_law(*([d[k] for d in done] for k in ("depth", "width", "tokens", "loss")))
        report.update(fit=fit.to_dict(), formula=fit.formula(), heldout_error=errors, fit_all_points=full.to_dict())
        print(f"[fit] {fit.formula()} (rmse {fit.rmse:.4f} on {fit.points} points)")
        print(f"[fit] held out ({holdout}, {errors['points']} points): mean |error| {errors['mean_abs_error']:.4f}, "
              f"max {errors['max_abs_error']:.4f}, mean relative {errors['mean_rel_error']:.2%}")
    except scaling.FitError as exc:
        report["skipped"] = f"{exc} (holdout {holdout}: {len(done)} finished runs in all)"
        print(f"[fit] skipped: {report['skipped']}")
    latency.write_json_atomic(os.path.join(workdir, "fit.json"), report)
    plot(os.path.join(workdir, "loss_vs_latency.png"), done)
    return report


def plot(path: str, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, group) in enumerate(sorted(_groups(rows).items())):
        budget, tokens = key
        group.sort(key=lambda r: r["latency_ms"])
        ax.plot([r["latency_ms"] for r in group], [r["loss"] for r in group], "o-", color=f"C{i % 10}",
                label=f"{budget / 1e6:.3g}M params, {tokens / 1e6:.3g}M tokens")
        for r in group:
            ax.annotate(f"D{r['depth']}", (r["latency_ms"], r["loss"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
    ax.set_xlabel("predicted decode latency (ms / token)")
    ax.set_ylabel("validation loss")
    ax.set_title("depth-width study (labels: depth in blocks)")
    if rows:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _groups(rows: list) -> dict:
    out = {}
    for r in rows:
        out.setdefault((r["budget"], r["tokens"]), []).append(r)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trainer_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    csv_path = os.path.join(args.workdir, "study.csv")
    if args.fit_only:
        if not os.path.exists(csv_path):
            print(f"error: --fit-only: {csv_path} does not exist", file=sys.stderr)
            return 2
        rows = read_csv(csv_path)
        fit_and_plot(args.workdir, rows, args.holdout)
        write_csv(csv_path, rows)
        return 0
    if not trainer_args:
        print("error: give the trainer flags after '--' (data, batch, --eval-iters, ...)", file=sys.stderr)
        return 2
    try:
        table = latency.LatencyTable.load(args.latency_table)
        rows = plan(args, table, trainer_args)
        for r in rows:
            if not table.covers(r["width"]):
                print(f"[plan] note: width {r['width']} is outside the latency table's widths {table.widths}; its "
                      f"latency is extrapolated")
            print(f"[plan] {r['name']}: {r['pattern']} | {r['parameters'] / 1e6:.2f}M params (budget "
                  f"{r['budget'] / 1e6:.3g}M) | {r['tokens']:,} tokens | {r['latency_ms']:.3f} ms")
        jobs = {r["name"]: {"pattern": r["pattern"], "hidden": r["width"], "depth": r["depth"],
                            "trainer_args": list(trainer_args) + ["--train-iters", str(r["iterations"])]}
                for r in rows}
        results = candidates.train_many(os.path.join(args.workdir, "runs"), jobs, table.rule,
                                        candidates.launcher_from_args(args))
    except (latency.LatencyError, candidates.CandidateError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in rows:
        res = results.get(r["name"], {})
        r["status"] = res.get("status", "missing")
        r["loss"] = res.get("valid_loss")
    write_csv(csv_path, rows)
    fit_and_plot(args.workdir, rows, args.holdout)
    write_csv(csv_path, rows)
    print(f"[study] {sum(r['loss'] is not None for r in rows)}/{len(rows)} runs done; {csv_path}, "
          f"{os.path.join(args.workdir, 'fit.json')}, {os.path.join(args.workdir, 'loss_vs_latency.png')}")
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
