"""Two-GPU correctness and throughput (issue #10): TP=2, PP=2, DP=2 (distributed optimizer) and sequence
parallelism against one GPU, a TP=2 checkpoint resumed at PP=2 and at one GPU, layout throughput and DP scaling.

    python benchmarks/gpu_multi.py [--out DIR] [--parts NAME,...] [--time-budget S] [--smoke] [...]

Every part is one ``pretrain.train`` run on mock data (the same samples in the same order under every layout), in
bf16, initialized on the CPU (``--use-cpu-initialization``: every layout starts from the same weights):

* ``tiny/{1gpu,tp2,pp2,dp2,tp2_sp}``: the tiny preset (every layer type), 6 steps, the weight-normalization
  invariants checked after every step (unit rows/columns of the full fp32 main matrices, TP-gathered and
  DP-assembled; bf16 params equal to the rounded main params: ``megatron_flash.testing.weight_norm_invariants``).
  The PyTorch DeltaNet and Mamba2 paths (no Triton autotuning or compilation for these shapes).
* ``ckpt/tp2_save`` (TP=2, 3 steps, saved), ``ckpt/pp2_resume`` and ``ckpt/1gpu_resume`` (the next 3 steps
  from that checkpoint): the resumed losses against ``tiny/tp2``'s steps 4-6 (continuing at TP=2).
* ``1b/{1gpu,dp2,tp2,pp2,tp2_sp}``: the 1B preset with a short ``--pattern`` (default DFMFAFMF: its first 8 layers,
  every layer type) at ``--seq-length`` 4096, ``--warmup-iters`` + ``--timed-iters`` steps with the invariants
  checked after the first ``--check-iters``; tokens/s and peak memory over the timed steps only (the peak is
  reset when they begin), DP=2 scaling efficiency against one GPU, and sequence parallelism's memory saving.

Launches (``megatron_flash.testing.run_distributed``; process start-up, Triton autotuning and torch.compile are paid
per launch, not per part): ``single`` (1 process: the ``*/1gpu`` references), ``multi`` (2 processes: every 2-GPU
part in turn; megatron's parallel groups are destroyed and rebuilt between parts, the default process group stays),
``resume`` (1 process: ``ckpt/1gpu_resume``). A part that fails ends its launch's processes; the parts after it
start in fresh processes (a new launch), so one failure costs one part, not the rest of the launch. Triton
autotuning results are kept on disk (TRITON_CACHE_AUTOTUNING=1 unless set, as for gpu_suite.py), so the 2-GPU
launch autotunes fla's kernels only for the TP=2 head counts.

Results: DIR/gpu_multi.json, rewritten after every part with a recomputed ``summary`` (comparisons, throughput,
DP scaling, the issue's done-when items; a time limit loses nothing already measured), and a table printed at the
end. Results merge into an existing DIR/gpu_multi.json (a rerun of some ``--parts`` replaces only those). No part
starts after ``--time-budget`` seconds; launches still running at ``--kill-after`` are killed.

``--smoke`` runs every part at toy sizes (on the CPU with gloo where there is no GPU): the tiny preset with the same
pattern stands in for the 1B one.

The Mamba2 scan defaults to the eager PyTorch path (``--ssd-backend torch``): torch.compile would add about a minute
of compilation (once per launch and again for the TP=2 shapes) to save ~90 ms of a ~0.9 s one-GPU step (2 Mamba2
layers, 64k tokens; the layer table in docs/performance.md), and the figures here compare layouts.

Wall time on 2 x H200 (first attempt, 2026-12-01, docs/performance.md): single 300 s on a fresh machine (tiny
77 s and 1B 203 s, mostly first-use costs: fla's autotuning and compilation; 14 steps of 64k tokens take ~15 s);
multi: tiny/tp2 46 s (its launch's first-use costs), the other tiny parts ~5 s each; the 1B layouts were not
reached (estimated ~20 s each plus fla autotuning the TP=2 head counts, ~1-2 min); resume ~25 s (estimated): about
7 min in all. Parts that would start after --time-budget (7.5 min) are skipped and say so; rerun them with --parts
into the same --out (``ckpt/1gpu_resume`` needs ``ckpt/tp2_save`` in the same run).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

RESULTS_FILE = "gpu_multi.json"
TINY_ITERS = 6  # tiny and checkpoint parts: steps per run
CHECKPOINT_AT = 3  # ckpt/tp2_save stops and saves here; the resume parts run the rest
LAUNCHES = {"single": 1, "multi": 2, "resume": 1}  # launch -> processes (one GPU each)


@dataclass(frozen=True)
class Part:
    """One training run: its name ("<model>/<layout>"), launch, model and layout."""

    name: str
    launch: str  # "single" | "multi" | "resume"
    model: str  # "tiny" | "1b"
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    checkpoint: str = ""  # "save" (stop at CHECKPOINT_AT and save) | "load" (resume from that checkpoint)

    @property
    def gpus(self) -> int:
        return LAUNCHES[self.launch]

    def layout_flags(self) -> list[str]:
        flags = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp)]
        if self.sequence_parallel:
            flags.append("--sequence-parallel")
        if self.distributed_optimizer:
            flags.append("--use-distributed-optimizer")
        return flags


# In launch order; within a launch, cheap ones first (a spent time budget skips from the end).
PARTS = [
    Part("tiny/1gpu", "single", "tiny"),
    Part("1b/1gpu", "single", "1b"),
    Part("tiny/tp2", "multi", "tiny", tp=2),
    Part("tiny/pp2", "multi", "tiny", pp=2),
    Part("tiny/dp2", "multi", "tiny", distributed_optimizer=True),
    Part("tiny/tp2_sp", "multi", "tiny", tp=2, sequence_parallel=True),
    Part("ckpt/tp2_save", "multi", "tiny", tp=2, checkpoint="save"),
    Part("ckpt/pp2_resume", "multi", "tiny", pp=2, checkpoint="load"),
    Part("1b/dp2", "multi", "1b", distributed_optimizer=True),
    Part("1b/pp2", "multi", "1b", pp=2),
    Part("1b/tp2", "multi", "1b", tp=2),  # the TP=2 head counts: fla autotunes again
    Part("1b/tp2_sp", "multi", "1b", tp=2, sequence_parallel=True),
    Part("ckpt/1gpu_resume", "resume", "tiny", checkpoint="load"),
]
PARTS_BY_NAME = {p.name: p for p in PARTS}

# Layouts compared with the 1-GPU losses, and the checkpoint comparisons: (part, steps of tiny/tp2 it continues).
LAYOUTS = ("tp2", "pp2", "dp2", "tp2_sp")
CHECKPOINT_PARTS = {"ckpt/tp2_save": (0, CHECKPOINT_AT), "ckpt/pp2_resume": (CHECKPOINT_AT, TINY_ITERS),
                    "ckpt/1gpu_resume": (CHECKPOINT_AT, TINY_ITERS)}


# --- the training runs (inside the launched processes) ---------------------------------------------------------

def part_argv(part: Part, opts, checkpoint_dir: str) -> list[str]:
    """pretrain flags of one part."""
    # No LR warm-up: every step, the first included, moves the weights, so the compared steps test the updates too.
    argv = ["--mock-data", "--bf16", "--use-cpu-initialization", "--eval-iters", "0", "--seed", str(opts.seed),
            "--lr-warmup-iters", "0"] + part.layout_flags()
    if part.model == "tiny":
        argv += ["--preset", "tiny", "--seq-length", str(opts.tiny_seq_length), "--micro-batch-size", "2",
                 "--global-batch-size", "4", "--train-iters", str(TINY_ITERS), "--lr", "3e-3",
                 "--log-interval", str(TINY_ITERS), "--ssd-backend", "torch", "--delta-rule-backend", "torch"]
    else:
        argv += ["--preset", opts.preset, "--pattern", opts.pattern, "--seq-length", str(opts.seq_length),
                 "--micro-batch-size", str(opts.micro_batch_size), "--global-batch-size", str(opts.global_batch_size),
                 "--train-iters", str(opts.warmup_iters + opts.timed_iters), "--lr", str(opts.lr),
                 "--log-interval", str(opts.warmup_iters), "--ssd-backend", opts.ssd_backend]
    if part.checkpoint == "save":
        argv += ["--save", checkpoint_dir, "--exit-interval", str(CHECKPOINT_AT)]
    elif part.checkpoint == "load":
        argv += ["--load", checkpoint_dir]
    return argv


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProbe:
    """``step_callback`` of pretrain.train: the weight-norm invariants after each of the first ``check_steps``
    steps; wall time and peak memory over the ``timed_steps`` steps after ``warmup_steps`` (0: no timing)."""

    def __init__(self, check_steps: int, warmup_steps: int = 0, timed_steps: int = 0):
        self.check_steps, self.warmup_steps, self.timed_steps = check_steps, warmup_steps, timed_steps
        self.steps, self.checks = 0, []
        self.start, self.seconds, self.peak_gib = None, None, None

    def __call__(self, iteration, model, optimizer):
        from megatron_flash.testing import weight_norm_invariants
        from megatron_flash.training.loop_utils import memory_gib

        self.steps += 1
        if self.steps <= self.check_steps:
            self.checks.append(weight_norm_invariants(optimizer))
        if not self.timed_steps:
            return
        if self.steps == self.warmup_steps:
            synchronize()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()
        elif self.steps == self.warmup_steps + self.timed_steps:
            synchronize()
            self.seconds = time.perf_counter() - self.start
            self.peak_gib = memory_gib()


def use_layout(tp: int, pp: int, seed: int) -> None:
    """Replace megatron's parallel groups with those of a TP x PP layout (the default process group stays).

    megatron's destroy_model_parallel only forgets its groups; destroying them frees their communicators (NCCL
    buffers), which would otherwise pile up over the parts.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_flash import runtime

    groups = [g for g in (parallel_state._global_process_group_list or []) if g is not None]
    synchronize()
    dist.barrier()
    parallel_state.destroy_model_parallel()  # destroys its gloo groups itself
    for group in groups:
        if group in dist.distributed_c10d._world.pg_map:
            dist.destroy_process_group(group)
    runtime.initialize(tp, pp, seed=seed, timeout_minutes=5)  # the default group's timeout (testing.py)


def gathered(value) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run_part(part: Part, opts, checkpoint_dir: str) -> dict:
    """Train one part on every rank of the launch; returns the combined result (the same on every rank)."""
    import torch.distributed as dist

    from megatron_flash import pretrain
    from megatron_flash.training import arguments
    from megatron_flash.training.loop_utils import peak_flops_per_second

    argv = part_argv(part, opts, checkpoint_dir)
    args = arguments.parse_args(argv, world_size=dist.get_world_size())
    if part.model == "tiny":
        probe = StepProbe(check_steps=TINY_ITERS)
    else:
        probe = StepProbe(opts.check_iters, opts.warmup_iters, opts.timed_iters)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    allocated_before = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    result = pretrain.train(args, step_callback=probe)
    per_rank = gathered({"checks": probe.checks, "seconds": probe.seconds, "peak_gib": probe.peak_gib,
                         "allocated_before_gib": allocated_before})
    checks = [{"worst_norm_error": max(r["checks"][i]["worst_norm_error"] for r in per_rank),
               "bf16_mismatches": max(r["checks"][i]["bf16_mismatches"] for r in per_rank),
               "checked_matrices_per_rank": [r["checks"][i]["checked_matrices"] for r in per_rank]}
              for i in range(len(probe.checks))]
    out = {"layout": {"gpus": part.gpus, "tp": part.tp, "pp": part.pp, "dp": args.data_parallel_size,
                      "sequence_parallel": part.sequence_parallel,
                      "distributed_optimizer": part.distributed_optimizer},
           "argv": argv, "first_iteration": result["iteration"] - len(result["losses"]) + 1,
           "losses": result["losses"], "checks": checks,
           "allocated_before_gib_per_rank": [round(r["allocated_before_gib"], 3) for r in per_rank]}
    if probe.timed_steps:
        seconds = max(r["seconds"] for r in per_rank)
        tokens_per_s = opts.timed_iters * args.global_batch_size * args.seq_length / seconds
        peak = peak_flops_per_second()
        out["throughput"] = {
            "timed_iters": opts.timed_iters, "tokens_per_iter": args.global_batch_size * args.seq_length,
            "ms_per_iter": 1000 * seconds / opts.timed_iters, "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / part.gpus,
            "mfu": tokens_per_s * result["flops_per_token"] / (part.gpus * peak) if peak else None,
            "peak_gib_per_rank": [round(r["peak_gib"], 3) for r in per_rank],
            "peak_gib": max(r["peak_gib"] for r in per_rank),
            "peak_memory": "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "process RSS (CPU)"}
    return out


def agree(flag: bool) -> bool:
    """Rank 0's decision, on every rank."""
    import torch.distributed as dist

    from megatron_flash import runtime

    value = torch.tensor([1 if flag else 0], device=runtime.device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def worker(launch: str, options: dict) -> None:
    """One launched process: the selected parts of ``launch`` in order (runtime.initialize has run)."""
    import torch.distributed as dist

    from megatron_flash.training import checkpointing

    opts = argparse.Namespace(**options)
    if torch.cuda.is_available():
        # Each layout's shapes compile static, as in a one-layout training run (no dynamic-shape recompile when
        # the TP=2 head counts come after the 1-GPU ones).
        torch._dynamo.config.automatic_dynamic_shapes = False
    recorder = Recorder(opts.out) if dist.get_rank() == 0 else None
    if recorder:
        recorder.update(("launches", launch), {
            "processes": dist.get_world_size(), "backend": dist.get_backend(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
            "started": datetime.datetime.now().isoformat(timespec="seconds")})
    checkpoint_dir = os.path.join(opts.scratch, "ckpt_tp2")
    for part in [p for p in PARTS if p.launch == launch and p.name in opts.parts]:
        if not agree(time.time() < opts.deadline):
            if recorder:
                recorder.update(("parts", part.name), {"skipped": f"--time-budget {opts.time_budget:.0f} s spent"})
            continue
        if part.checkpoint == "load" and checkpointing.latest_iteration(checkpoint_dir) is None:
            if recorder:
                recorder.update(("parts", part.name), {"skipped": "no checkpoint: ckpt/tp2_save did not run"})
            continue
        if recorder:
            recorder.update(("parts", part.name), {"running": True, "launch": launch})
            print(f"[gpu_multi] {part.name}: starting, {time.time() - opts.start:.0f} s in", flush=True)
        start = time.perf_counter()
        use_layout(part.tp, part.pp, opts.seed)
        value = run_part(part, opts, checkpoint_dir)
        value["seconds"] = round(time.perf_counter() - start, 1)
        if recorder:
            recorder.update(("parts", part.name), value)
            print(f"[gpu_multi] {part.name}: {describe(value)}", flush=True)
    dist.barrier()


# --- results file ----------------------------------------------------------------------------------------------

class Recorder:
    """DIR/gpu_multi.json: read, update one entry, recompute the summary, replace the file (one writer at a time:
    the driver between launches, rank 0 during one)."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, RESULTS_FILE)

    def load(self) -> dict:
        if not os.path.exists(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def update(self, key: tuple, value) -> dict:
        results = self.load()
        target = results
        for k in key[:-1]:
            target = target.setdefault(k, {})
        target[key[-1]] = value
        results["summary"] = summarize(results)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, self.path)
        return results


# --- comparisons and report (pure functions of the results) ----------------------------------------------------

def compare_losses(got: list, ref: list, rtol: float) -> dict:
    """|got - ref| <= rtol * |ref| at every step (both lists cover the same steps)."""
    if not got or len(got) != len(ref):
        return {"ok": False, "reason": f"{len(got)} losses against {len(ref)} reference losses"}
    if not all(math.isfinite(x) for x in got + ref):
        return {"ok": False, "reason": "non-finite loss", "losses": got, "reference": ref}
    abs_diffs = [abs(g - r) for g, r in zip(got, ref)]
    rel_diffs = [d / abs(r) if r else math.inf for d, r in zip(abs_diffs, ref)]
    return {"steps": len(got), "max_abs_diff": max(abs_diffs), "max_rel_diff": max(rel_diffs),
            "ok": max(rel_diffs) <= rtol}


def invariant_status(part: dict, norm_tol: float) -> dict:
    checks = part.get("checks", [])
    if not checks:
        return {"ok": False, "reason": "no checked steps"}
    worst = max(c["worst_norm_error"] for c in checks)
    mismatches = max(c["bf16_mismatches"] for c in checks)
    vacuous = any(n == 0 for c in checks for n in c["checked_matrices_per_rank"])
    return {"steps": len(checks), "worst_norm_error": worst, "bf16_mismatches": mismatches,
            "ok": worst <= norm_tol and mismatches == 0 and not vacuous,
            **({"reason": "a rank checked no normalized matrix"} if vacuous else {})}


def _done(part: dict | None) -> bool:
    return bool(part) and "losses" in part


def tracks(part: dict, ref: dict, rtol: float) -> dict:
    """``part``'s losses against ``ref``'s over the steps ``part`` checked the invariants on ("a few training
    steps"); the largest relative difference over all their common steps is added for information."""
    checked = len(part["checks"])
    entry = compare_losses(part["losses"][:checked], ref["losses"][:checked], rtol)
    common = min(len(part["losses"]), len(ref["losses"]))
    if entry["ok"] and common > checked:
        entry["max_rel_diff_all_steps"] = compare_losses(
            part["losses"][:common], ref["losses"][:common], math.inf)["max_rel_diff"]
    return entry


def all_ok(items: list) -> bool | None:
    """True when every item passed, False when one failed, None (not known) when some did not run."""
    if any(item is not None and not item["ok"] for item in items):
        return False
    return None if not items or any(item is None for item in items) else True


def summarize(results: dict) -> dict:
    """Comparisons against the 1-GPU runs, checkpoint continuations, throughput, DP scaling and the issue's
    done-when items, from whatever parts have finished (missing ones read None)."""
    parts = results.get("parts", {})
    thresholds = results["meta"]["thresholds"]
    rtol, norm_tol, target = thresholds["loss_rtol"], thresholds["norm_tol"], thresholds["dp_efficiency_target"]
    summary = {"layouts": {}, "weight_norm": {}, "checkpoint": {}, "sequence_parallel": {}, "throughput": {}}

    for model in ("tiny", "1b"):
        ref = parts.get(f"{model}/1gpu")
        for layout in LAYOUTS:
            name = f"{model}/{layout}"
            part = parts.get(name)
            summary["layouts"][name] = tracks(part, ref, rtol) if _done(part) and _done(ref) else None
    for name, part in parts.items():
        if _done(part):
            summary["weight_norm"][name] = invariant_status(part, norm_tol)

    continued = parts.get("tiny/tp2")
    for name, (first, last) in CHECKPOINT_PARTS.items():
        part = parts.get(name)
        summary["checkpoint"][name] = compare_losses(part["losses"], continued["losses"][first:last], rtol) \
            if _done(part) and _done(continued) else None

    for model in ("tiny", "1b"):
        without, with_sp = parts.get(f"{model}/tp2"), parts.get(f"{model}/tp2_sp")
        if not (_done(without) and _done(with_sp)):
            summary["sequence_parallel"][model] = None
            continue
        entry = {"loss": tracks(with_sp, without, rtol)}
        if "throughput" in without and "throughput" in with_sp:
            off, on = without["throughput"]["peak_gib"], with_sp["throughput"]["peak_gib"]
            entry.update(peak_gib_without=off, peak_gib_with=on, saved_gib=off - on,
                         saved_fraction=(off - on) / off if off else None)
        summary["sequence_parallel"][model] = entry

    for name, part in parts.items():
        if _done(part) and "throughput" in part:
            summary["throughput"][name] = {k: part["throughput"][k] for k in (
                "tokens_per_s", "tokens_per_s_per_gpu", "ms_per_iter", "mfu", "peak_gib")}
    single, dp2 = summary["throughput"].get("1b/1gpu"), summary["throughput"].get("1b/dp2")
    summary["dp_scaling"] = None if not (single and dp2) else {
        "efficiency": dp2["tokens_per_s_per_gpu"] / single["tokens_per_s"], "target": target,
        "ok": dp2["tokens_per_s_per_gpu"] / single["tokens_per_s"] >= target}

    sp_losses = [None if v is None else v["loss"] for v in summary["sequence_parallel"].values()]
    summary["done_when"] = {
        "layouts_track_1gpu_losses": all_ok(list(summary["layouts"].values())),
        "weight_norm_invariants_hold": all_ok([summary["weight_norm"].get(p.name) for p in PARTS]),
        "tp2_checkpoint_resumes_at_pp2_and_1gpu": all_ok(list(summary["checkpoint"].values())),
        "sequence_parallel_same_loss": all_ok(sp_losses),
        "dp2_scaling_efficiency_at_target": None if summary["dp_scaling"] is None else summary["dp_scaling"]["ok"],
    }
    summary["not_run"] = [p.name for p in PARTS if not _done(parts.get(p.name))]
    return summary


def describe(part: dict) -> str:
    """One line of a finished part (printed as each part finishes)."""
    losses = part["losses"]
    text = f"{len(losses)} steps" + (f", losses {losses[0]:.4f} .. {losses[-1]:.4f}" if losses else "")
    if part["checks"]:
        text += (f", worst |norm - 1| {max(c['worst_norm_error'] for c in part['checks']):.1e}, bf16 mismatches "
                 f"{max(c['bf16_mismatches'] for c in part['checks'])}")
    if "throughput" in part:
        t = part["throughput"]
        text += f", {t['tokens_per_s']:,.0f} tokens/s, {t['ms_per_iter']:.0f} ms/iter, peak {t['peak_gib']:.2f} GiB"
    return text + f", {part.get('seconds', 0):.0f} s"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _verdict(entry) -> str:
    return "not run" if entry is None else ("ok" if entry["ok"] else "FAIL")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _flagged(text: str, entry) -> str:
    """A value with '!' when its check failed."""
    return text + ("!" if entry is not None and not entry["ok"] else "")


def format_report(results: dict) -> str:
    """The printed table: every part, then the comparisons and the done-when items ('!': a failed check)."""
    parts, summary = results.get("parts", {}), results.get("summary") or summarize(results)
    lines = []
    opts = results["meta"].get("options")
    if opts:
        lines.append(f"1b/*: {opts['preset']} with --pattern {opts['pattern']}, {opts['global_batch_size']} x "
                     f"{opts['seq_length']} tokens per step (micro-batches of {opts['micro_batch_size']}), Mamba2 "
                     f"scan {opts['ssd_backend']}; tiny/*, ckpt/*: the tiny preset, PyTorch DeltaNet and Mamba2 paths")
    lines += [f"{'part':<18} {'steps':>5} {'loss 1st':>9} {'loss last':>9} {'vs ref':>9} {'|norm-1|':>9} "
             f"{'bf16 mm':>7} {'tokens/s':>10} {'tok/s/GPU':>10} {'ms/iter':>8} {'peak GiB':>8} {'secs':>5}"]
    for p in PARTS:
        part = parts.get(p.name)
        if not _done(part):
            status = "not run" if part is None else part.get("skipped") or (
                f"failed: {_last_line(part['error'])[:160]}" if "error" in part else
                "not started" if part.get("queued") else "running (killed?)")
            lines.append(f"{p.name:<18} {status}")
            continue
        losses, t = part["losses"], part.get("throughput", {})
        cmp = summary["layouts"].get(p.name) or summary["checkpoint"].get(p.name)
        inv = summary["weight_norm"].get(p.name)
        rel = "-" if cmp is None else _flagged(f"{cmp['max_rel_diff']:.1e}" if "max_rel_diff" in cmp else "", cmp)
        norm = "-" if inv is None else _flagged(_fmt(inv.get("worst_norm_error"), ".1e"), inv)
        lines.append(f"{p.name:<18} {len(losses):>5} {_fmt(losses[0] if losses else None, '.4f'):>9} "
                     f"{_fmt(losses[-1] if losses else None, '.4f'):>9} {rel:>9} {norm:>9} "
                     f"{_fmt((inv or {}).get('bf16_mismatches'), 'd'):>7} {_fmt(t.get('tokens_per_s'), ',.0f'):>10} "
                     f"{_fmt(t.get('tokens_per_s_per_gpu'), ',.0f'):>10} {_fmt(t.get('ms_per_iter'), '.0f'):>8} "
                     f"{_fmt(t.get('peak_gib'), '.2f'):>8} {part.get('seconds', 0):>5.0f}")
    lines.append("vs ref: largest relative loss difference from the 1-GPU run over the checked steps (ckpt/*: from "
                 "tiny/tp2's same steps); secs: the whole part, build and compilation included")
    dp = summary["dp_scaling"]
    if dp:
        lines.append(f"DP=2 scaling efficiency (1b): {dp['efficiency']:.1%} (target {dp['target']:.0%})")
    sp = summary["sequence_parallel"].get("1b")
    if sp and "saved_gib" in sp:
        lines.append(f"sequence parallelism (1b, TP=2): peak {sp['peak_gib_without']:.2f} -> {sp['peak_gib_with']:.2f}"
                     f" GiB (saves {sp['saved_gib']:.2f} GiB, {sp['saved_fraction']:.1%}); loss "
                     f"{_verdict(sp['loss'])}")
    for item, ok in summary["done_when"].items():
        lines.append(f"{item}: {'not known (parts missing)' if ok is None else ('yes' if ok else 'NO')}")
    for launch, error in results.get("launch_errors", {}).items():
        lines.append(f"launch {launch} failed: {_last_line(error)}")
    return "\n".join(lines)


# --- driver ----------------------------------------------------------------------------------------------------

SMOKE_DEFAULTS = dict(preset="tiny", seq_length=64, tiny_seq_length=32, micro_batch_size=2, global_batch_size=4,
                      warmup_iters=2, timed_iters=2, check_iters=2, ssd_backend="torch", time_budget=900,
                      kill_after=1200)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_multi_out"), help="folder of gpu_multi.json")
    p.add_argument("--smoke", action="store_true",
                   help="every part at toy sizes (on the CPU with gloo where there is no GPU)")
    p.add_argument("--parts", default=",".join(p.name for p in PARTS), help="comma-separated part names")
    p.add_argument("--time-budget", type=float, default=450.0, help="seconds after which no part starts")
    p.add_argument("--kill-after", type=float, default=565.0, help="seconds after which running launches are killed")
    g = p.add_argument_group("the shortened 1B model (1b/* parts)")
    g.add_argument("--preset", default="nemotron_flash_1b")
    g.add_argument("--pattern", default="DFMFAFMF", help="layer pattern (default: the 1B preset's first 8 layers)")
    g.add_argument("--seq-length", type=int, default=4096)
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=16,
                   help="the same for every layout (default: 8 micro-batches on one GPU and at TP=2 / PP=2, 4 per "
                        "rank at DP=2)")
    g.add_argument("--warmup-iters", type=int, default=4, help="steps before timing (compilation, autotuning)")
    g.add_argument("--timed-iters", type=int, default=10)
    g.add_argument("--check-iters", type=int, default=3,
                   help="steps (from the first) with the invariant checks and the loss comparison")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--ssd-backend", default="torch", help="Mamba2 scan: torch or torch_compile (see above)")
    g = p.add_argument_group("tiny preset and checks")
    g.add_argument("--tiny-seq-length", type=int, default=256)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--loss-rtol", type=float, default=0.02,
                   help="a layout's losses agree with the reference's when within this relative difference (bf16)")
    g.add_argument("--norm-tol", type=float, default=1e-5, help="largest |row/column norm - 1| of the fp32 matrices")
    g.add_argument("--dp-efficiency-target", type=float, default=0.9)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**SMOKE_DEFAULTS)  # flags given on the command line still win
    opts = parser.parse_args(argv)
    opts.parts = [name for name in opts.parts.split(",") if name]
    unknown = [name for name in opts.parts if name not in PARTS_BY_NAME]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; known: {', '.join(PARTS_BY_NAME)}")
    if not 1 <= opts.check_iters <= opts.warmup_iters:
        parser.error(f"--check-iters {opts.check_iters} must be between 1 and --warmup-iters {opts.warmup_iters} "
                     "(checks must stay out of the timed steps)")
    if opts.timed_iters < 1:
        parser.error(f"--timed-iters must be positive, got {opts.timed_iters}")
    return opts


def queued_parts(recorder: "Recorder", launch: str, opts) -> list:
    """This run's parts of ``launch`` that no process has started yet."""
    parts = recorder.load().get("parts", {})
    return [name for name in opts.parts
            if PARTS_BY_NAME[name].launch == launch and (parts.get(name) or {}).get("queued")]


def run_launch(launch: str, processes: int, opts, recorder: "Recorder") -> None:
    """Run the queued parts of ``launch``. A part that fails ends its processes; the parts after it get fresh
    processes (a new launch) instead of being lost, as long as each launch gets at least one part further."""
    from megatron_flash.testing import run_distributed

    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)),  # CPU initialization
           "TRITON_CACHE_AUTOTUNING": os.environ.get("TRITON_CACHE_AUTOTUNING", "1")}
    attempt = 0
    while True:
        names = queued_parts(recorder, launch, opts)
        if not names:
            return
        if time.time() >= opts.deadline:
            print(f"[gpu_multi] {launch}: {', '.join(names)} not started (--time-budget {opts.time_budget:.0f} s "
                  "spent)", flush=True)
            for name in names:
                recorder.update(("parts", name), {"skipped": f"--time-budget {opts.time_budget:.0f} s spent"})
            return
        attempt += 1
        print(f"[gpu_multi] {launch}: {processes} process(es) for {len(names)} part(s), "
              f"{time.time() - opts.start:.0f} s in", flush=True)
        try:
            run_distributed(worker, world_size=processes, args=(launch, {**vars(opts), "parts": names}),
                            seed=opts.seed, timeout=max(1.0, opts.kill_at - time.time()), env=env)
        except RuntimeError as exc:
            print(f"[gpu_multi] {launch} failed:\n{exc}", flush=True)
            key = launch if attempt == 1 else f"{launch} (launch {attempt})"
            recorder.update(("launch_errors", key), str(exc)[-4000:])
            for name, part in recorder.load().get("parts", {}).items():
                if isinstance(part, dict) and part.get("running") and part.get("launch") == launch:
                    recorder.update(("parts", name), {"error": str(exc)[-4000:], "launch": launch})
            if queued_parts(recorder, launch, opts) == names:  # failed before its first part: no progress
                for name in names:
                    recorder.update(("parts", name), {"error": str(exc)[-4000:], "launch": launch})
                return


def main(argv=None) -> int:
    from megatron_flash.training import arguments

    opts = parse_args(argv)
    if not opts.smoke and torch.cuda.device_count() < 2:
        print(f"error: needs 2 GPUs, found {torch.cuda.device_count()} (--smoke runs on the CPU)", file=sys.stderr)
        return 2
    for name in opts.parts:  # bad flags stop here, before any launch (any existing folder stands in for --load)
        part = PARTS_BY_NAME[name]
        try:
            arguments.parse_args(part_argv(part, opts, tempfile.gettempdir()), world_size=part.gpus)
        except arguments.ArgumentError as exc:
            print(f"error: part {name}: {exc}", file=sys.stderr)
            return 2
    start = time.time()
    opts.start, opts.deadline, opts.kill_at = start, start + opts.time_budget, start + opts.kill_after
    opts.scratch = tempfile.mkdtemp(prefix="gpu_multi_")
    recorder = Recorder(opts.out)
    recorder.update(("meta",), {
        "argv": sys.argv[1:] if argv is None else argv, "date": datetime.date.today().isoformat(),
        "smoke": opts.smoke, "torch": torch.__version__, "cuda": torch.version.cuda,
        "options": {k: v for k, v in vars(opts).items() if k not in ("start", "deadline", "kill_at", "scratch")},
        "thresholds": {"loss_rtol": opts.loss_rtol, "norm_tol": opts.norm_tol,
                       "dp_efficiency_target": opts.dp_efficiency_target}})
    recorder.update(("launch_errors",), {})  # an earlier run's, in a reused --out
    for name in opts.parts:  # replaces an earlier run's entry; the worker marks each part as it starts it
        recorder.update(("parts", name), {"queued": True})
    try:
        for launch, processes in LAUNCHES.items():
            run_launch(launch, processes, opts, recorder)
    finally:
        shutil.rmtree(opts.scratch, ignore_errors=True)
    results = recorder.load()
    print(format_report(results), flush=True)
    print(f"[gpu_multi] {time.time() - start:.0f} s; results in {recorder.path}", flush=True)
    return 1 if results.get("launch_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
