#!/usr/bin/env python3
"""Decode latency of Nemotron-Flash configurations, and the per-operator lookup table the search uses.

    # lookup table for the 1B widths on this GPU (CUDA graphs, bf16), checked against whole models:
    python tools/profile_latency.py table --preset nemotron_flash_1b --widths 1024:2560:256 --output latency.json

    # one configuration: batch-1 decode of N tokens, large-batch throughput, and the table's prediction error
    python tools/profile_latency.py model --preset nemotron_flash_1b --new-tokens 8192 --throughput-batch 256 \\
        --table latency.json

    # tables measured in pieces (e.g. a few widths per job) joined into one
    python tools/profile_latency.py merge latency_a.json latency_b.json --output latency.json

    # predict from a table without building anything (add --measure to compare with a measurement)
    python tools/profile_latency.py predict --table latency.json --pattern "DFMFAFMF DFMFAFMF DFMFDFMF" --hidden 2048

Models are built with the Hugging Face modeling code (it has the decode path) from a pattern and a hidden size;
the other widths follow the preset's proportions (megatron_flash.design.space.WidthRule). Without a GPU the steps
run eagerly on the CPU. See docs/design_tools.md and megatron_flash/design/latency.py.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_flash import patterns, presets  # noqa: E402
from megatron_flash.design import latency, space  # noqa: E402


def _setting_args(p: argparse.ArgumentParser, new_tokens: int) -> None:
    g = p.add_argument_group("decode setting")
    g.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    g.add_argument("--prompt-length", type=int, default=1, help="prompt tokens before generation (after the meta "
                                                                 "tokens)")
    g.add_argument("--new-tokens", type=int, default=new_tokens,
                   help="generated tokens N: steps are timed at context meta + prompt + N/2")
    g.add_argument("--timed-steps", type=int, default=64, help="steps per timing")
    g.add_argument("--repeats", type=int, default=5, help="timings per measurement (the median is kept)")
    g.add_argument("--warmup", type=int, default=2, help="untimed timings first")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="time eager steps on the GPU too (CUDA graphs are used on GPUs by default)")
    g.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model widths")
    g.add_argument("--preset", default="nemotron_flash_1b", choices=sorted(presets.PRESETS),
                   help="preset whose proportions give the widths (head dim, KV heads, FFN ratio, Mamba2 state)")
    g.add_argument("--vocab-size", type=int, help="override the preset's vocabulary")
    g.add_argument("--num-meta-tokens", type=int, help="override the preset's meta tokens")
    g.add_argument("--sliding-window", type=int, help="window of S (sliding-window attention) layers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/profile_latency.py", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("table", help="measure the per-operator lookup table", allow_abbrev=False)
    _model_args(t)
    t.add_argument("--widths", default="1024:2560:256", help="hidden sizes: start:stop:step or a list")
    t.add_argument("--operators", default="DMAF", help="operators to measure (D, M, A, S, F)")
    t.add_argument("--layers-per-measurement", type=int, default=4,
                   help="k: each operator is timed in models of k and 2k layers of it")
    t.add_argument("--validate-pattern", action="append", default=None, metavar="PATTERN[@HIDDEN]",
                   help="measure this model directly and report the table's error (repeatable; default: the "
                        "preset's pattern at the smallest, middle and largest width)")
    t.add_argument("--no-validate", action="store_true", help="skip the direct measurements")
    t.add_argument("--output", required=True, help="table JSON")
    _setting_args(t, new_tokens=8192)

    m = sub.add_parser("model", help="decode latency and throughput of one configuration", allow_abbrev=False)
    _model_args(m)
    m.add_argument("--pattern", help="layer pattern (default: the preset's)")
    m.add_argument("--hidden", type=int, help="hidden size (default: the preset's)")
    m.add_argument("--throughput-batch", type=int, default=0, help="also measure decode throughput at this batch")
    m.add_argument("--table", help="also report this lookup table's prediction and its error")
    m.add_argument("--output", help="write the figures as JSON")
    _setting_args(m, new_tokens=8192)

    g = sub.add_parser("merge", help="join tables measured at different widths (same device and setting)",
                       allow_abbrev=False)
    g.add_argument("tables", nargs="+", help="table JSON files")
    g.add_argument("--output", required=True)

    r = sub.add_parser("predict", help="predict from a lookup table", allow_abbrev=False)
    r.add_argument("--table", required=True)
    r.add_argument("--pattern", required=True)
    r.add_argument("--hidden", type=int, nargs="+", required=True)
    r.add_argument("--measure", action="store_true", help="also measure the model directly (on this machine)")
    r.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    return p


def _rule(args) -> space.WidthRule:
    return space.WidthRule.from_preset(args.preset, vocab_size=args.vocab_size, num_meta_tokens=args.num_meta_tokens,
                                       sliding_window=args.sliding_window)


def _setting(args) -> latency.DecodeSetting:
    return latency.DecodeSetting(batch=args.batch, prompt_length=args.prompt_length, new_tokens=args.new_tokens,
                                 timed_steps=args.timed_steps, repeats=args.repeats, warmup=args.warmup,
                                 cuda_graphs=args.cuda_graphs)


def _dtype(args, device) -> torch.dtype:
    return latency.parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))


def _cases(specs, default_pattern, widths) -> list:
    if not specs:
        mid = widths[len(widths) // 2]
        return [(default_pattern, w) for w in sorted({widths[0], mid, widths[-1]})]
    out = []
    for spec in specs:
        pattern, _, hidden = spec.partition("@")
        out.append((patterns.parse(pattern), int(hidden) if hidden else widths[len(widths) // 2]))
    return out


def cmd_table(args) -> int:
    device = latency.default_device()
    rule = _rule(args)
    widths = space.parse_hidden_sizes(args.widths)
    setting = _setting(args)
    dtype = _dtype(args, device)
    print(f"[latency] {latency.device_name(device)} | {dtype} | batch {setting.batch} | context "
          f"{setting.context(rule.num_meta_tokens)} | CUDA graphs {setting.cuda_graphs and device.type == 'cuda'} "
          f"| widths {list(widths)} | operators {args.operators}")
    # Each width is saved to OUTPUT.partial as it is measured; a rerun after a crash or a time limit resumes there.
    partial = args.output + ".partial"
    resume_from = latency.LatencyTable.load(partial) if os.path.exists(partial) else None
    if resume_from is not None:
        print(f"[latency] found {partial} (widths {resume_from.widths}); resuming from it")
    try:
        table = latency.measure_table(rule, widths, tuple(args.operators.upper()), setting, dtype, device,
                                      args.layers_per_measurement, resume_from=resume_from,
                                      on_width=lambda t: t.save(partial))
    except latency.LatencyError as exc:
        if resume_from is None:
            raise
        raise latency.LatencyError(f"{partial}: {exc}; delete it to measure from scratch") from None
    if not args.no_validate:
        cases = _cases(args.validate_pattern, presets.get_preset(args.preset)["layer_pattern"], table.widths)
        cases = [(p, h) for p, h in cases if set(patterns.parse(p)) <= set(table.ops)]
        rows = latency.validate(table, cases, dtype, device)
        if rows:
            worst = max(abs(r["error"]) for r in rows)
            print(f"[latency] prediction error over {len(rows)} models: max |error| {worst:.1%}")
    table.save(args.output)
    if os.path.exists(partial):
        os.remove(partial)
    print(f"[latency] wrote {args.output}")
    return 0


def cmd_model(args) -> int:
    device = latency.default_device()
    rule = _rule(args)
    preset = presets.get_preset(args.preset)
    pattern = patterns.parse(args.pattern or preset["layer_pattern"])
    hidden = args.hidden or preset["hidden_size"]
    setting = _setting(args)
    dtype = _dtype(args, device)
    graphs = setting.cuda_graphs and device.type == "cuda"
    latency.warm_up(rule, hidden, dtype, device)
    step = latency.measure_model(rule, pattern, hidden, setting, dtype, device)
    out = {"device": latency.device_name(device), "dtype": str(dtype), "pattern": pattern, "hidden": hidden,
           "parameters": rule.parameter_count(pattern, hidden), "cuda_graphs": graphs, "batch": setting.batch,
           "context": setting.context(rule.num_meta_tokens), "new_tokens": setting.new_tokens,
           "decode_ms_per_token": step, "decode_ms_total": step * setting.new_tokens}
    print(f"[latency] {pattern} @ {hidden} ({out['parameters'] / 1e6:.1f}M params) on {out['device']}, {dtype}, "
          f"{'CUDA graphs' if graphs else 'eager'}: {step:.4f} ms per token at batch {setting.batch} -> "
          f"{out['decode_ms_total']:.1f} ms for {setting.new_tokens} tokens")
    if args.throughput_batch:
        big = latency.DecodeSetting(**{**setting.__dict__, "batch": args.throughput_batch})
        tps = latency.throughput_tokens_per_s(rule, pattern, hidden, big, dtype, device)
        out.update(throughput_batch=args.throughput_batch, throughput_tokens_per_s=tps)
        print(f"[latency] throughput at batch {args.throughput_batch}: {tps:,.0f} tokens/s")
    if args.table:
        table = latency.LatencyTable.load(args.table)
        predicted = table.predict(pattern, hidden)
        out.update(table_predicted_ms=predicted, table_error=predicted / step - 1)
        print(f"[latency] table {args.table} ({table.device}) predicts {predicted:.4f} ms: error "
              f"{predicted / step - 1:+.1%}")
        if table.setting.get("context") != out["context"] or table.setting.get("batch") != setting.batch:
            print("[latency] note: the table was measured at another context / batch; compare like with like")
    if args.output:
        latency.write_json_atomic(args.output, out)
    return 0


def cmd_merge(args) -> int:
    merged = latency.merge_tables([latency.LatencyTable.load(path) for path in args.tables])
    merged.save(args.output)
    print(f"[latency] wrote {args.output}: widths {merged.widths}, operators {', '.join(sorted(merged.ops))}")
    return 0


def cmd_predict(args) -> int:
    table = latency.LatencyTable.load(args.table)
    for hidden in args.hidden:
        parts = table.breakdown(args.pattern, hidden)
        total = sum(parts.values())
        detail = ", ".join(f"{k} {v:.4f}" for k, v in parts.items())
        line = f"[latency] {patterns.parse(args.pattern)} @ {hidden}: {total:.4f} ms per token ({detail})"
        if not table.covers(hidden):
            line += f" [extrapolated: table widths {table.widths[0]}..{table.widths[-1]}]"
        print(line)
    if args.measure:
        for hidden in args.hidden:
            table.rule.check(hidden)
        rows = latency.validate(table, [(args.pattern, h) for h in args.hidden])
        print(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return {"table": cmd_table, "model": cmd_model, "merge": cmd_merge, "predict": cmd_predict}[args.command](args)
    except (latency.LatencyError, space.SpaceError, patterns.PatternError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
