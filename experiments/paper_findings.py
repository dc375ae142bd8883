#!/usr/bin/env python3
"""Small-scale reproduction of two Nemotron-Flash training findings with the real trainer (issue #12).

(a) weight normalization (the trainer's default; ``--no-weight-norm`` turns it off) lowers validation loss;
(b) hybrids beat a single-operator model at equal size: attention-only vs a DeltaNet + Mamba2 hybrid vs the
    Nemotron-Flash pattern, at matched parameter count.

Variants (all from ``--base-preset``'s proportions through :class:`megatron_flash.design.space.WidthRule`, one hidden
size and depth for all; the FFN width of the other variants is chosen so their parameter count matches ``nf_wn``):

    nf_wn            the Nemotron-Flash pattern (default: the base preset's), weight normalization on
    nf_no_wn         the same model, --no-weight-norm
    attention_only   every mixer of that pattern replaced by attention
    deltanet_mamba2  every attention layer of that pattern replaced by DeltaNet (a hybrid without attention)

Stages (each a subcommand; ``all`` runs prepare, run and report)::

    prepare  corpus (data_prep/build_sample_corpus.py over the Python sources installed on this machine, held-out
             validation files), tokenizer (tools/train_tokenizer.py), indexed datasets (tools/preprocess_data.py),
             the trainer's per-split blend (data_prep/build_blend.py)
    plan     print the variants, their widths and parameter counts (writes plan.json)
    run      train every variant x seed with ``megatron_flash.pretrain`` as separate processes, --parallel at a time
             on the one device; each finished run writes runs/NAME/result.json and is skipped on a rerun
    report   validation-loss plots, a table and a verdict per finding, computed from the runs, into --output-dir

    python -m experiments.paper_findings all --workdir runs/paper_findings --output-dir OUT --time-budget-min 8
    python -m experiments.paper_findings all --smoke --workdir /tmp/pf --output-dir /tmp/pf/report   # CPU, ~1 min
    python -m experiments.paper_findings report --results-json OUT/results.json --output-dir OUT  # replot

Each run is the trainer itself, ``python -m megatron_flash.pretrain --preset-file DIR/run.json ...``: the run
folder's run.json holds the variant's preset fields (as an architecture-search candidate.json does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXTURE = os.path.join(REPO, "data_prep", "mixtures", "sample_corpus.yaml")
RUN_SPEC = "run.json"  # in each run folder: the run's preset fields (the trainer's --preset-file) and flags
RESULT = "result.json"


class StudyError(RuntimeError):
    """A stage could not do its work; the message names the flag, file or command to look at."""


# --------------------------------------------------------------------------------------------------------------
# Variants and findings
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    weight_norm: bool
    mixer_map: dict = field(default_factory=dict)  # how the Nemotron-Flash pattern's mixers are replaced

    def pattern(self, nf_pattern: str) -> str:
        return "".join(self.mixer_map.get(c, c) for c in nf_pattern)


VARIANTS = {v.name: v for v in (
    Variant("nf_wn", "Nemotron-Flash pattern, weight norm on", True),
    Variant("nf_no_wn", "Nemotron-Flash pattern, weight norm off", False),
    Variant("deltanet_mamba2", "DeltaNet + Mamba2 hybrid (attention -> DeltaNet)", True, {"A": "D", "S": "D"}),
    Variant("attention_only", "attention only (every mixer -> attention)", True, {"D": "A", "M": "A", "S": "A"}),
)}
REFERENCE = "nf_wn"  # the parameter budget the other variants are matched to


@dataclass(frozen=True)
class Finding:
    key: str
    claim: str
    comparisons: tuple  # (claimed better, claimed worse) pairs that make the verdict
    plot_variants: tuple
    supplementary: tuple = ()  # pairs reported alongside, not part of the verdict


FINDINGS = (
    Finding("a", "weight normalization lowers validation loss", (("nf_wn", "nf_no_wn"),), ("nf_wn", "nf_no_wn")),
    Finding("b", "hybrids beat a single-operator (attention-only) model of the same size",
            (("nf_wn", "attention_only"), ("deltanet_mamba2", "attention_only")),
            ("nf_wn", "deltanet_mamba2", "attention_only"), supplementary=(("nf_wn", "deltanet_mamba2"),)),
)
PLOT_FILES = {"a": "finding_a_weight_norm.png", "b": "finding_b_hybrids.png"}


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

# --smoke: a CPU end-to-end check in about a minute (the tiny preset's proportions, a few hundred KB of text).
SMOKE_DEFAULTS = dict(
    base_preset="tiny", hidden_size=32, num_meta_tokens=None, ffn_multiple=8, param_tolerance=0.05,
    corpus_mb=0.6, valid_fraction=0.1, vocab_size=512, tokenizer_train_mb=None, workers=1, seq_length=64,
    micro_batch_size=4, train_tokens=4096, eval_points=4, eval_iters=2, lr=3e-3, seeds="1,2", parallel=2,
    progress_interval_s=10.0,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.paper_findings", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=("prepare", "plan", "run", "report", "all"))
    p.add_argument("--workdir", default=os.path.join("runs", "paper_findings"),
                   help="data, tokenizer, run folders and logs")
    p.add_argument("--output-dir", help="report folder (plots, report.md, results.json); default WORKDIR/report")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes for a CPU end-to-end check (explicit flags still win)")

    g = p.add_argument_group("data (prepare)")
    g.add_argument("--corpus-mb", type=float, default=60.0, help="corpus size over all source folders")
    g.add_argument("--corpus-roots", nargs="+",
                   help="folders of Python sources to read, in order (default: this Python's standard library, "
                        "then its site-packages and PYTHONPATH folders)")
    g.add_argument("--valid-fraction", type=float, default=0.05, help="share of source files held out")
    g.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary")
    g.add_argument("--tokenizer-train-mb", type=float, default=25.0,
                   help="train the tokenizer on at most this much text (0: all of it)")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer / preprocessing processes")

    g = p.add_argument_group("models")
    g.add_argument("--base-preset", default="nemotron_flash_1b",
                   help="preset whose proportions (head dim, KV groups, FFN ratio, Mamba2 sizes) the models keep")
    g.add_argument("--hidden-size", type=int, default=384, help="hidden size of every variant")
    g.add_argument("--nf-pattern", help="Nemotron-Flash-style pattern (default: the base preset's)")
    g.add_argument("--num-meta-tokens", type=int, default=32,
                   help="meta tokens of every variant (the 1B preset's 256 for 4096-token sequences is 1/16 of "
                        "the sequence; 32 keeps that share at 512; --smoke: the tiny preset's)")
    g.add_argument("--ffn-multiple", type=int, default=32, help="matched FFN widths are multiples of this")
    g.add_argument("--param-tolerance", type=float, default=0.03,
                   help="largest relative parameter-count difference to nf_wn that the matching may leave")
    g.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))

    g = p.add_argument_group("training (run)")
    g.add_argument("--seeds", default="1,2,3", help="comma-separated; a seed fixes init and data order")
    g.add_argument("--train-tokens", type=float, default=6e6, help="tokens per run (rounded up to whole evaluations)")
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--micro-batch-size", type=int, default=32, help="also the global batch (one micro-batch)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, help="end of the cosine decay (default: lr / 10)")
    g.add_argument("--warmup-fraction", type=float, default=0.05, help="linear warmup share of the iterations")
    g.add_argument("--eval-points", type=int, default=10, help="validations per run (the last at the final step)")
    g.add_argument("--eval-iters", type=int, default=8, help="validation batches per evaluation")
    g.add_argument("--ssd-backend", default="torch", help="Mamba2 scan backend (see docs/experiments.md)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 training (default: on with a GPU)")
    g.add_argument("--parallel", type=int,
                   help="runs at once on the one device (default: the number of variants, one seed's worth; runs "
                        "are queued seed by seed, so a time budget cuts the last seed's runs first)")
    g.add_argument("--time-budget-min", type=float,
                   help="minutes after the start of this command: no run starts later, running runs are stopped "
                        "(and reported up to their last validation)")
    g.add_argument("--stop-grace-s", type=float, default=30.0, help="seconds a stopped run gets before SIGKILL")
    g.add_argument("--resumable", action="store_true",
                   help="checkpoint runs (--save/--load) so a stopped run resumes on a rerun; needs psutil")
    g.add_argument("--progress-interval-s", type=float, default=30.0, help="seconds between progress lines")

    g = p.add_argument_group("report")
    g.add_argument("--results-json", help="report from this results.json (a previous report's) instead of WORKDIR")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)
    args = parser.parse_args(argv)
    args.workdir = os.path.abspath(args.workdir)
    args.output_dir = os.path.abspath(args.output_dir or os.path.join(args.workdir, "report"))
    return args


def _int_list(text: str, flag: str) -> list:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise StudyError(f"{flag} {text!r}: give comma-separated integers") from None
    if not values or len(set(values)) != len(values):
        raise StudyError(f"{flag} {text!r}: give at least one value, each once")
    return values


def selected_variants(text: str) -> list:
    names = [x for x in text.replace(" ", "").split(",") if x]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise StudyError(f"--variants {text!r}: choose from {', '.join(VARIANTS)}")
    return [n for n in VARIANTS if n in names]  # fixed order: the slowest (Mamba2) models start first


# --------------------------------------------------------------------------------------------------------------
# Data: corpus, tokenizer, indexed datasets, blend
# --------------------------------------------------------------------------------------------------------------


class Paths:
    def __init__(self, workdir: str):
        self.work = workdir
        self.corpus = os.path.join(workdir, "corpus")
        self.tokenizer = os.path.join(workdir, "tokenizer")
        self.data_root = os.path.join(workdir, "data")
        self.blend = os.path.join(workdir, "data", "blend.json")
        self.stages = os.path.join(workdir, ".stages")
        self.runs = os.path.join(workdir, "runs")
        self.plan = os.path.join(workdir, "plan.json")


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".partial", "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    os.replace(path + ".partial", path)


def read_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def default_corpus_roots() -> list:
    """This Python's standard library, then its site-packages and PYTHONPATH folders (where the installed
    libraries' sources are), without the repository itself."""
    import site
    import sysconfig

    found = [sysconfig.get_paths()["stdlib"]]
    extra = list(site.getsitepackages()) + [site.getusersitepackages()]
    extra += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    repo = os.path.realpath(REPO)
    seen = {os.path.realpath(found[0])}
    for path in extra:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in seen and real != repo and not real.startswith(repo + os.sep):
            seen.add(real)
            found.append(path)
    return found


def _stage_done(paths: Paths, stage: str, params: dict, outputs: list) -> bool:
    stamp = os.path.join(paths.stages, stage + ".json")
    return (os.path.isfile(stamp) and read_json(stamp) == params and all(os.path.exists(o) for o in outputs))


def _mark_done(paths: Paths, stage: str, params: dict) -> None:
    write_json(os.path.join(paths.stages, stage + ".json"), params)


def _run_tool(stage: str, cmd: list, env: dict) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if rc != 0:
        raise StudyError(f"{stage}: command failed with exit status {rc} (its output is above):\n  {shlex.join(cmd)}")


def tool_env() -> dict:
    from megatron_flash.quickstart import QUIET_WARNINGS

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               PYTHONWARNINGS=",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET_WARNINGS])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_JOB_ID"):
        env.pop(key, None)  # every run is its own single-process job
    return env


def merge_corpus_parts(part_dirs: list, out_dir: str) -> dict:
    """Concatenate the parts' train and valid files; drop validation documents whose text also occurs in train
    (the same file vendored in two libraries would otherwise leak across the split)."""
    import hashlib

    def digest(line: str) -> bytes:
        return hashlib.sha256(json.loads(line)["text"].encode("utf-8")).digest()

    train_hashes, stats = set(), {"train_documents": 0, "train_bytes": 0, "valid_documents": 0, "valid_bytes": 0,
                                  "valid_dropped_duplicates": 0}
    with open(os.path.join(out_dir, "train.jsonl.partial"), "w", encoding="utf-8") as out:
        for part in part_dirs:
            with open(os.path.join(part, "train.jsonl"), encoding="utf-8") as fh:
                for line in fh:
                    train_hashes.add(digest(line))
                    out.write(line)
                    stats["train_documents"] += 1
                    stats["train_bytes"] += len(line.encode("utf-8"))
    with open(os.path.join(out_dir, "valid.jsonl.partial"), "w", encoding="utf-8") as out:
        for part in part_dirs:
            path = os.path.join(part, "valid.jsonl")
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    h = digest(line)
                    if h in train_hashes:
                        stats["valid_dropped_duplicates"] += 1
                        continue
                    train_hashes.add(h)  # and no document twice in valid
                    out.write(line)
                    stats["valid_documents"] += 1
                    stats["valid_bytes"] += len(line.encode("utf-8"))
    for split in ("train", "valid"):
        os.replace(os.path.join(out_dir, f"{split}.jsonl.partial"), os.path.join(out_dir, f"{split}.jsonl"))
    if not stats["valid_documents"]:
        raise StudyError(f"the corpus has no validation documents: raise --valid-fraction ({out_dir})")
    return stats


def prepare(args) -> None:
    paths = Paths(args.workdir)
    env = tool_env()
    os.makedirs(args.workdir, exist_ok=True)
    if args.corpus_mb <= 0 or not 0 < args.valid_fraction < 1:
        raise StudyError("--corpus-mb must be positive and --valid-fraction in (0, 1)")

    roots = args.corpus_roots or default_corpus_roots()
    params = {"corpus_mb": args.corpus_mb, "valid_fraction": args.valid_fraction, "roots": roots}
    train_file, valid_file = (os.path.join(paths.corpus, f"{s}.jsonl") for s in ("train", "valid"))
    print(f"\n=== prepare 1/4 corpus: {args.corpus_mb:g} MB of Python sources from {len(roots)} folder(s)", flush=True)
    if _stage_done(paths, "corpus", params, [train_file, valid_file]):
        print(f"already done ({paths.corpus})", flush=True)
    else:
        shutil.rmtree(paths.corpus, ignore_errors=True)
        parts, remaining = [], args.corpus_mb
        for i, root in enumerate(roots):
            if remaining <= 0.01:
                break
            part = os.path.join(paths.corpus, f"part{i}")
            _run_tool("corpus", [sys.executable, os.path.join(REPO, "data_prep", "build_sample_corpus.py"),
                                 "--output-dir", part, "--size-mb", f"{remaining:.6f}", "--valid-fraction",
                                 str(args.valid_fraction), "--source-root", root], env)
            manifest = read_json(os.path.join(part, "manifest.json"))
            remaining -= (manifest["train"]["bytes"] + manifest["valid"]["bytes"]) / 1e6
            parts.append(part)
        stats = merge_corpus_parts(parts, paths.corpus)
        for part in parts:
            shutil.rmtree(part)
        stats["roots"] = roots[:len(parts)]
        write_json(os.path.join(paths.corpus, "manifest.json"), stats)
        print(f"corpus: {stats['train_bytes'] / 1e6:.1f} MB train ({stats['train_documents']} documents), "
              f"{stats['valid_bytes'] / 1e6:.2f} MB valid ({stats['valid_documents']} documents, "
              f"{stats['valid_dropped_duplicates']} dropped as copies of train documents)", flush=True)
        if remaining > 0.1 * args.corpus_mb:
            print(f"note: the source folders hold only {args.corpus_mb - remaining:.1f} MB of usable text",
                  flush=True)
        _mark_done(paths, "corpus", params)
        for stage in ("tokenizer", "preprocess", "blend"):
            _forget(paths, stage)

    params = {"vocab_size": args.vocab_size, "train_mb": args.tokenizer_train_mb}
    print(f"\n=== prepare 2/4 tokenizer: byte-level BPE, {args.vocab_size} tokens", flush=True)
    if _stage_done(paths, "tokenizer", params, [os.path.join(paths.tokenizer, "tokenizer.json")]):
        print(f"already done ({paths.tokenizer})", flush=True)
    else:
        shutil.rmtree(paths.tokenizer, ignore_errors=True)
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", train_file,
               "--tokenizer-type", "HuggingFaceTokenizer", "--vocab-size", str(args.vocab_size),
               "--output", paths.tokenizer, "--workers", str(args.workers)]
        if args.tokenizer_train_mb:
            cmd += ["--max-mb", str(args.tokenizer_train_mb)]
        _run_tool("tokenizer", cmd, env)
        _mark_done(paths, "tokenizer", params)
        _forget(paths, "preprocess")

    prefixes = {s: os.path.join(paths.data_root, "sample", s) for s in ("train", "valid")}
    print("\n=== prepare 3/4 preprocess: megatron indexed datasets", flush=True)
    if _stage_done(paths, "preprocess", {}, [prefixes[s] + "_text_document.idx" for s in prefixes]):
        print(f"already done ({paths.data_root})", flush=True)
    else:
        for split, prefix in prefixes.items():
            # One worker for the small valid split: the tool's pool can hang when its job ends while a later
            # worker is still starting (it then swallows the pool's SIGTERM); with one worker that cannot happen.
            workers = args.workers if split == "train" else 1
            _run_tool("preprocess", [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"),
                                     "--input", os.path.join(paths.corpus, f"{split}.jsonl"), "--output-prefix",
                                     prefix, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                     paths.tokenizer, "--append-eod", "--workers", str(workers), "--overwrite",
                                     "--no-progress-bar"], env)
        _mark_done(paths, "preprocess", {})
        _forget(paths, "blend")

    print(f"\n=== prepare 4/4 blend: {os.path.relpath(MIXTURE, REPO)} -> {paths.blend}", flush=True)
    if _stage_done(paths, "blend", {}, [paths.blend]):
        print(f"already done ({paths.blend})", flush=True)
    else:
        _run_tool("blend", [sys.executable, os.path.join(REPO, "data_prep", "build_blend.py"), MIXTURE,
                            "--data-root", paths.data_root, "--format", "per-split-json", "--output", paths.blend],
                  env)
        _mark_done(paths, "blend", {})


def _forget(paths: Paths, stage: str) -> None:
    stamp = os.path.join(paths.stages, stage + ".json")
    if os.path.exists(stamp):
        os.remove(stamp)


# --------------------------------------------------------------------------------------------------------------
# Plan: models of matched size and the runs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    variant: str
    pattern: str
    hidden_size: int
    ffn_hidden_size: int
    parameters: int
    embedding_parameters: int
    preset_fields: dict

    @property
    def non_embedding_parameters(self) -> int:
        return self.parameters - self.embedding_parameters


def width_rule(base_preset: str, vocab_size: int, num_meta_tokens: Optional[int]):
    from megatron_flash.design.space import WidthRule

    return WidthRule.from_preset(base_preset, vocab_size=vocab_size, num_meta_tokens=num_meta_tokens)


def plan_models(variants: list, base_preset: str, hidden_size: int, nf_pattern: Optional[str], vocab_size: int,
                num_meta_tokens: Optional[int], ffn_multiple: int, tolerance: float) -> dict:
    """{variant: ModelPlan}: every variant at one hidden size and depth; nf_wn / nf_no_wn keep the base preset's
    FFN ratio, the others get the FFN width (a multiple of ``ffn_multiple``) whose parameter count is closest to
    nf_wn's (megatron_flash.design.scaling.matched_width)."""
    from megatron_flash import patterns, presets
    from megatron_flash.design import scaling
    from megatron_flash.design.space import SpaceError

    try:
        rule = width_rule(base_preset, vocab_size, num_meta_tokens)
        rule.heads(hidden_size)
    except KeyError as exc:
        raise StudyError(f"--base-preset: {exc.args[0]}") from None
    except SpaceError as exc:
        raise StudyError(f"--hidden-size: {exc}") from None
    try:
        nf = patterns.parse(nf_pattern or presets.get_preset(base_preset)["layer_pattern"])
    except patterns.PatternError as exc:
        raise StudyError(f"--nf-pattern: {exc}") from None
    missing = [name for c, name in (("D", "DeltaNet"), ("M", "Mamba2"), ("A", "attention")) if c not in nf]
    if missing:
        raise StudyError(f"--nf-pattern {nf}: the findings need DeltaNet, Mamba2 and attention layers; it has no "
                         f"{', '.join(missing)}")
    if ffn_multiple < 1:
        raise StudyError("--ffn-multiple must be positive")

    def count(pattern: str, ffn: int) -> int:
        return replace(rule, ffn_ratio=ffn / hidden_size).parameter_count(pattern, hidden_size)

    def model(variant: str, pattern: str, ffn: int, params: int) -> ModelPlan:
        fields = rule.megatron_fields(pattern, hidden_size)
        fields["ffn_hidden_size"] = ffn
        return ModelPlan(variant, pattern, hidden_size, ffn, params, vocab_size * hidden_size, fields)

    base_ffn = rule.ffn_hidden(hidden_size)
    budget = count(nf, base_ffn)
    plans = {}
    for name in variants:
        pattern = VARIANTS[name].pattern(nf)
        if pattern == nf:
            plans[name] = model(name, pattern, base_ffn, budget)
            continue
        widths = range(ffn_multiple, 8 * hidden_size + 1, ffn_multiple)
        ffn, params = scaling.matched_width(lambda w, p=pattern: count(p, w), budget, widths)
        if abs(params / budget - 1) > tolerance:
            raise StudyError(
                f"{name} ({pattern}): the closest FFN width {ffn} gives {params:,} parameters, "
                f"{params / budget - 1:+.1%} from nf_wn's {budget:,}, beyond --param-tolerance {tolerance:g}: "
                f"use a smaller --ffn-multiple or a larger --hidden-size")
        plans[name] = model(name, pattern, ffn, params)
    return plans


def tokenizer_vocab_size(paths: Paths, requested: int) -> int:
    """The trained tokenizer's vocabulary (what the trainer sizes the embedding by), else the requested size."""
    if not os.path.isfile(os.path.join(paths.tokenizer, "tokenizer.json")):
        return requested
    from megatron_flash.data.tokenizer import build_tokenizer

    return build_tokenizer("HuggingFaceTokenizer", paths.tokenizer).vocab_size


def use_bf16(args) -> bool:
    if args.bf16 is not None:
        return args.bf16
    import torch

    return torch.cuda.is_available()


def schedule(args) -> dict:
    """Iterations, evaluation interval and warmup from the token budget (the last evaluation at the final step)."""
    for flag in ("seq_length", "micro_batch_size", "eval_points", "eval_iters"):
        if getattr(args, flag) < 1:
            raise StudyError(f"--{flag.replace('_', '-')} must be positive")
    tokens_per_iter = args.micro_batch_size * args.seq_length
    needed = max(1, math.ceil(args.train_tokens / tokens_per_iter))
    interval = max(1, math.ceil(needed / args.eval_points))
    iters = interval * args.eval_points
    warmup = min(iters - 1, max(1, round(args.warmup_fraction * iters))) if args.warmup_fraction > 0 else 0
    return {"train_iters": iters, "eval_interval": interval, "warmup_iters": warmup,
            "tokens_per_iter": tokens_per_iter, "tokens": iters * tokens_per_iter,
            "log_interval": max(1, min(10, interval))}


def trainer_args(args, paths: Paths, run_dir: str, seed: int, weight_norm: bool, sched: dict, bf16: bool) -> list:
    lr = args.lr
    argv = ["--preset-file", os.path.join(run_dir, RUN_SPEC), "--per-split-data-args-path", paths.blend,
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", paths.tokenizer,
            "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.micro_batch_size), "--train-iters", str(sched["train_iters"]),
            "--lr", f"{lr:.6g}", "--min-lr", f"{args.min_lr if args.min_lr is not None else lr / 10:.6g}",
            "--lr-decay-style", "cosine", "--lr-warmup-iters", str(sched["warmup_iters"]), "--weight-decay", "0",
            "--eval-interval", str(sched["eval_interval"]), "--eval-iters", str(args.eval_iters),
            "--log-interval", str(sched["log_interval"]), "--seed", str(seed), "--ssd-backend", args.ssd_backend,
            # each run its own index cache: runs of one seed build the same cache files at the same moment
            "--data-cache-path", os.path.join(run_dir, "data_cache")]
    if bf16:
        argv.append("--bf16")
    if not weight_norm:
        argv.append("--no-weight-norm")
    if args.resumable:
        ckpt = os.path.join(run_dir, "checkpoints")
        argv += ["--save", ckpt, "--load", ckpt, "--save-interval", str(sched["train_iters"]), "--keep-last", "1"]
    return argv


def make_plan(args) -> dict:
    """plan.json: settings, models and the runs (name, variant, seed, folder, preset fields, trainer flags)."""
    paths = Paths(args.workdir)
    variants = selected_variants(args.variants)
    seeds = _int_list(args.seeds, "--seeds")
    vocab = tokenizer_vocab_size(paths, args.vocab_size)
    models = plan_models(variants, args.base_preset, args.hidden_size, args.nf_pattern, vocab,
                         args.num_meta_tokens, args.ffn_multiple, args.param_tolerance)
    sched = schedule(args)
    bf16 = use_bf16(args)
    runs = []
    for seed in seeds:  # seed-major: with fewer slots than runs, every variant of a seed runs before the next seed
        for name in variants:
            run_name = f"{name}_seed{seed}"
            run_dir = os.path.join(paths.runs, run_name)
            runs.append({"name": run_name, "variant": name, "seed": seed, "dir": run_dir,
                         "preset_fields": models[name].preset_fields,
                         "trainer_args": trainer_args(args, paths, run_dir, seed, VARIANTS[name].weight_norm, sched,
                                                      bf16)})
    plan = {"settings": {"base_preset": args.base_preset, "hidden_size": args.hidden_size, "vocab_size": vocab,
                         "seq_length": args.seq_length, "global_batch_size": args.micro_batch_size,
                         "lr": args.lr, "bf16": bf16, "ssd_backend": args.ssd_backend, "seeds": seeds, **sched},
            "models": {name: {**asdict(m), "non_embedding_parameters": m.non_embedding_parameters,
                              "weight_norm": VARIANTS[name].weight_norm,
                              "description": VARIANTS[name].description} for name, m in models.items()},
            "runs": runs}
    write_json(paths.plan, plan)
    return plan


def print_plan(plan: dict) -> None:
    s = plan["settings"]
    ref = plan["models"].get(REFERENCE)
    print(f"\nmodels ({s['base_preset']} proportions, hidden {s['hidden_size']}, vocabulary {s['vocab_size']}):")
    for name, m in plan["models"].items():
        delta = f"{m['parameters'] / ref['parameters'] - 1:+.2%}" if ref else "-"
        print(f"  {name:<16} {m['pattern']:<28} FFN {m['ffn_hidden_size']:>5} | {m['parameters']:>12,} parameters "
              f"({m['non_embedding_parameters']:,} without the embedding) | vs {REFERENCE} {delta} | weight norm "
              f"{'on' if m['weight_norm'] else 'off'}")
    print(f"runs: {len(plan['runs'])} ({len(plan['models'])} variants x seeds {s['seeds']}), {s['train_iters']} "
          f"iterations x {s['tokens_per_iter']:,} tokens = {s['tokens']:,} tokens each, validation every "
          f"{s['eval_interval']} iterations, {'bf16' if s['bf16'] else 'fp32'}, Mamba2 scan {s['ssd_backend']}",
          flush=True)


# --------------------------------------------------------------------------------------------------------------
# The trainer's log
# --------------------------------------------------------------------------------------------------------------

_FLOAT = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
MODEL_LINE = re.compile(r"^model: (.+?) pattern (\S+) \| ([\d,]+) parameters on rank")
TRAIN_LINE = re.compile(r"^iteration\s+(\d+) \| loss " + _FLOAT + r" \|.*?\| (\d+) ms/it")
VALID_LINE = re.compile(r"^validation at iteration (\d+): loss " + _FLOAT)
RESUME_LINE = re.compile(r"^resumed from \S+ at iteration (\d+)")


def parse_trainer_log(text: str) -> dict:
    """Parameters, training and validation curves and step times from megatron_flash.pretrain's console output.

    A log may hold several attempts (a stopped run continued with --resumable): each attempt starts at its
    'model:' line, at iteration 0 or at its 'resumed ... at iteration K' line, and replaces whatever an earlier
    attempt logged after that point.
    """
    out = {"parameters": None, "pattern": None, "train": [], "validation": [], "ms_per_iter": []}
    attempt_start = None  # iteration the current attempt continues from, until its first entry

    def add(key: str, iteration: int, value: float):
        nonlocal attempt_start
        if attempt_start is not None:
            for k in ("train", "validation"):
                out[k] = [e for e in out[k] if e[0] <= attempt_start]
            attempt_start = None
        out[key] = [e for e in out[key] if e[0] < iteration] + [[iteration, value]]

    for line in text.splitlines():
        if m := MODEL_LINE.match(line):
            out["pattern"], out["parameters"] = m.group(2), int(m.group(3).replace(",", ""))
            attempt_start = 0
        elif m := RESUME_LINE.match(line):
            attempt_start = int(m.group(1))
        elif m := TRAIN_LINE.match(line):
            add("train", int(m.group(1)), float(m.group(2)))
            out["ms_per_iter"].append(int(m.group(3)))
        elif m := VALID_LINE.match(line):
            add("validation", int(m.group(1)), float(m.group(2)))
    return out


# --------------------------------------------------------------------------------------------------------------
# Running the trainer
# --------------------------------------------------------------------------------------------------------------


def _run_config(run: dict) -> dict:
    return {k: run[k] for k in ("name", "variant", "seed", "preset_fields", "trainer_args")}


def read_result(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, RESULT)
    return read_json(path) if os.path.isfile(path) else None


def run_record(run: dict, plan: dict, status: str, exit_code, wall_seconds, log_text: str) -> dict:
    parsed = parse_trainer_log(log_text)
    s = plan["settings"]
    valid = parsed["validation"]
    final = valid[-1][1] if valid and valid[-1][0] == s["train_iters"] else None
    return {"name": run["name"], "variant": run["variant"], "seed": run["seed"], "status": status,
            "exit_code": exit_code, "parameters": parsed["parameters"],
            "parameters_planned": plan["models"][run["variant"]]["parameters"], "pattern": parsed["pattern"],
            "train_iters": s["train_iters"], "tokens_per_iter": s["tokens_per_iter"], "tokens": s["tokens"],
            "iterations_done": max([e[0] for e in parsed["train"] + valid], default=0),
            "validation": valid, "train": parsed["train"], "final_valid_loss": final,
            "final_valid_ppl": math.exp(min(final, 50.0)) if final is not None else None,
            "ms_per_iter_median": statistics.median(parsed["ms_per_iter"]) if parsed["ms_per_iter"] else None,
            "wall_seconds": wall_seconds,
            "trainer_command": "python -m megatron_flash.pretrain " + shlex.join(run["trainer_args"]),
            "preset_fields": run["preset_fields"]}


def _read_log(run: dict) -> str:
    with open(os.path.join(run["dir"], "train.log"), encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _progress(run: dict, started: float, train_iters: int, now: float) -> tuple:
    """(status line, estimated seconds to the end of the run or None) from the run's log so far."""
    parsed = parse_trainer_log(_read_log(run))
    it = parsed["train"][-1][0] if parsed["train"] else 0
    val = (f"val {parsed['validation'][-1][1]:.4f}@{parsed['validation'][-1][0]}" if parsed["validation"]
           else "no validation yet")
    eta = (train_iters - it) * parsed["ms_per_iter"][-1] / 1000 if parsed["ms_per_iter"] else None
    speed = f"{parsed['ms_per_iter'][-1]} ms/it, ~{eta:.0f} s to go" if eta is not None else "starting"
    return f"  {run['name']:<26} it {it:>6}/{train_iters} | {val} | {speed} | {now - started:.0f} s", eta


def run_all(args, plan: dict, start_time: float) -> None:
    """Train every planned run that is not done yet."""
    from megatron_flash.design.candidates import Job, LocalLauncher

    train_iters = plan["settings"]["train_iters"]
    queue = []
    for run in plan["runs"]:
        spec_path = os.path.join(run["dir"], RUN_SPEC)
        if os.path.isfile(spec_path) and read_json(spec_path) != _run_config(run):
            print(f"[run] {run['name']}: settings changed since its last run; starting it over", flush=True)
            shutil.rmtree(run["dir"])
        result = read_result(run["dir"])
        if result is not None and result["status"] == "done":
            print(f"[run] {run['name']}: already done (final validation loss {result['final_valid_loss']:.4f}); "
                  f"skipping", flush=True)
            continue
        if result is not None:  # a stopped or failed attempt: its record would outlive the new one's log
            os.remove(os.path.join(run["dir"], RESULT))
        write_json(spec_path, _run_config(run))
        queue.append(run)
    parallel = args.parallel or len(plan["models"])
    if parallel < 1:
        raise StudyError("--parallel must be at least 1")
    threads = max(1, (os.cpu_count() or 1) // min(parallel, max(1, len(queue))))
    deadline = start_time + args.time_budget_min * 60 if args.time_budget_min else None
    print(f"[run] {len(queue)} run(s) to train, {parallel} at a time, {threads} CPU thread(s) each"
          + (f", time budget {args.time_budget_min:g} min from the start "
             f"({max(0.0, deadline - time.time()) / 60:.1f} min left)" if deadline else ""), flush=True)

    runs = {run["name"]: run for run in queue}
    # Every run shares the one device (no CUDA_VISIBLE_DEVICES split) and is its own single-process job.
    launcher = LocalLauncher(parallel=parallel, threads=threads, poll_seconds=0.5, base_env=tool_env(),
                             master_ports=True)
    jobs = [Job(run["name"], [sys.executable, "-m", "megatron_flash.pretrain", *run["trainer_args"]],
                os.path.join(run["dir"], "train.log")) for run in queue]

    def started(r) -> None:
        print(f"[run] started {r.job.key} (pid {r.process.pid}, MASTER_PORT {r.master_port}); log {r.job.log_path}",
              flush=True)

    # The first run starts alone until it trains (or ends): on a fresh GPU machine six runs starting together
    # spent over two minutes autotuning fla's kernels side by side without one training step (H200, 2026-12-01);
    # after one run has autotuned, the others read its results from Triton's cache.
    def trains(r) -> bool:
        return bool(parse_trainer_log(_read_log(runs[r.job.key]))["train"])

    def budget_reached(queued: int, running: list) -> None:
        print(f"[run] time budget of {args.time_budget_min:g} min reached: {queued} queued run(s) not started; "
              f"stopping {len(running)} running run(s) (SIGTERM)", flush=True)

    def killing(r) -> None:
        print(f"[run] {r.job.key}: no exit {args.stop_grace_s:g} s after SIGTERM; killing it", flush=True)

    def progress(running: list, queued: int, ended: int) -> None:
        now = time.time()
        lines, etas = zip(*(_progress(runs[r.job.key], r.started, train_iters, now) for r in running))
        known = [e for e in etas if e is not None]
        budget = f", {deadline - now:.0f} s of the time budget left" if deadline else ""
        print(f"[progress {now - start_time:.0f} s] {len(running)} running, {queued} queued, {ended} ended"
              + (f"; slowest run ~{max(known):.0f} s to go at its current speed" if known else "") + budget,
              flush=True)
        print("\n".join(lines), flush=True)

    launcher.run_jobs(
        jobs, lambda r, code: _finish(runs[r.job.key], plan, code, time.time() - r.started, r.stop_sent is not None),
        on_start=started, warmed_up=trains, deadline=deadline, stop_grace_s=args.stop_grace_s,
        on_deadline=budget_reached, on_kill=killing, on_progress=progress,
        progress_interval_s=args.progress_interval_s, append_logs=args.resumable)


def _finish(run: dict, plan: dict, code: int, wall: float, stopped: bool) -> None:
    """Write the run's result.json: done, stopped (by the time budget) or failed."""
    text = _read_log(run)
    record = run_record(run, plan, "done", code, wall, text)
    if code != 0 or record["final_valid_loss"] is None:  # a clean exit without the final validation is no result
        record["status"] = "stopped" if stopped else "failed"
    write_json(os.path.join(run["dir"], RESULT), record)
    name = run["name"]
    if record["status"] == "done":
        print(f"[run] {name} done: final validation loss {record['final_valid_loss']:.4f} (perplexity "
              f"{record['final_valid_ppl']:.2f}), {record['parameters']:,} parameters, {record['tokens']:,} tokens, "
              f"{wall:.0f} s", flush=True)
        shutil.rmtree(os.path.join(run["dir"], "checkpoints"), ignore_errors=True)  # not needed any more
    elif record["status"] == "stopped":
        print(f"[run] {name} stopped at iteration {record['iterations_done']} of {record['train_iters']} "
              f"({wall:.0f} s)", flush=True)
    else:
        tail = "\n".join("      " + line for line in text.splitlines()[-15:])
        print(f"[run] {name} FAILED (exit code {code}) after {wall:.0f} s; last lines of "
              f"{os.path.join(run['dir'], 'train.log')}:\n{tail}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def collect(plan: dict) -> list:
    """A record per planned run: its result.json, else what its log shows so far, else 'not run'."""
    records = []
    for run in plan["runs"]:
        result = read_result(run["dir"])
        if result is not None:
            records.append(result)
            continue
        log = os.path.join(run["dir"], "train.log")
        text = open(log, encoding="utf-8", errors="replace").read() if os.path.isfile(log) else ""
        records.append(run_record(run, plan, "incomplete" if text else "not run", None, None, text))
    return records


def loss_at(record: dict, iteration: int) -> Optional[float]:
    for it, loss in record["validation"]:
        if it == iteration:
            return loss
    return None


def _std(values: list) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def comparison_point(records: list, better: str, worse: str, train_iters: int) -> tuple:
    """(iteration, seeds, where) at which to compare two variants: the final iteration over the seeds where both
    runs finished; without such a seed (a time budget stopped them), the last validation every run of the pairs
    reached. Failed runs take no part."""
    usable = {(r["variant"], r["seed"]): r for r in records
              if r["variant"] in (better, worse) and r["status"] != "failed" and r["validation"]}
    seeds = sorted(s for v, s in usable if v == better and (worse, s) in usable)
    if not seeds:
        return None, [], ""
    complete = [s for s in seeds if usable[(better, s)]["status"] == usable[(worse, s)]["status"] == "done"]
    if complete:
        return train_iters, complete, "the final iteration"
    last = min(max(e[0] for e in usable[(v, s)]["validation"]) for s in seeds for v in (better, worse))
    return last, seeds, (f"iteration {last} of {train_iters}, the last validation all these runs reached "
                         f"(no seed finished both)")


def compare(records: list, better: str, worse: str, train_iters: int) -> dict:
    """Does ``better`` reach a lower validation loss than ``worse``? Paired by seed (same initialization seed and
    data order); the verdict needs the sign to agree in every seed."""
    iteration, seeds, where = comparison_point(records, better, worse, train_iters)
    by = {(r["variant"], r["seed"]): r for r in records}
    pairs = {s: (loss_at(by[(better, s)], iteration), loss_at(by[(worse, s)], iteration)) for s in seeds}
    diffs = {s: lw - lb for s, (lb, lw) in pairs.items()}
    n = len(diffs)
    out = {"better": better, "worse": worse, "iteration": iteration, "where": where, "seeds": seeds, "n": n,
           "differences": {str(s): d for s, d in diffs.items()}, "losses": {str(s): p for s, p in pairs.items()}}
    if not n:
        out.update(verdict="not tested", detail=f"no seed has validation losses of both {better} and {worse}")
        return out
    values = list(diffs.values())
    mean, sd, wins = statistics.fmean(values), _std(values), sum(d > 0 for d in values)
    spread = {v: _std([p[i] for p in pairs.values()]) for i, v in enumerate((better, worse))}
    curve = _curve_wins(records, better, worse, iteration, seeds)
    early = _stopped_early(records, better, worse, seeds)
    out.update(mean_difference=mean, std_difference=sd, wins=wins, seed_spread=spread, curve_wins=curve,
               stopped_early=early)
    if mean > 0 and wins == n and n >= 2:
        verdict = "direction reproduced"
    elif mean > 0 and n == 1:
        verdict = "direction reproduced in the one seed run (no spread)"
    elif mean > 0:
        verdict = f"inconclusive: lower on average, but in only {wins} of {n} seeds"
    else:
        verdict = "not reproduced"
    sd_text = f" ± {sd:.4f}" if sd is not None else ""
    known = {v: x for v, x in spread.items() if x is not None}
    noise = ""
    if known:
        noise = (f"; seed-to-seed spread (std) of the losses: {', '.join(f'{v} {x:.4f}' for v, x in known.items())}"
                 f", {'below' if abs(mean) > max(known.values()) else 'above'} the mean difference")
    out["verdict"] = verdict
    out["detail"] = (f"at {where}: {worse} − {better} = {mean:+.4f}{sd_text} nats (mean ± std over {n} seed(s); "
                     f"lower for {better} in {wins} of {n}){noise}; {better}'s seed-mean curve is lower at {curve[0]} "
                     f"of {curve[1]} validation points up to there")
    if early:
        out["detail"] += ("; seeds stopped before the end (not in the verdict): " + ", ".join(
            f"seed {e['seed']} at iteration {e['iteration']} {worse} − {better} = {e['difference']:+.4f}"
            for e in early))
    return out


def _stopped_early(records: list, better: str, worse: str, compared_seeds: list) -> list:
    """Seeds not in the comparison whose runs of both variants have validations: the difference at the last
    validation both reached (a hint of the seed spread when the time budget stopped them)."""
    runs = {(r["variant"], r["seed"]): r for r in records if r["status"] != "failed" and r["validation"]}
    out = []
    for seed in sorted({s for v, s in runs if v == better and (worse, s) in runs} - set(compared_seeds)):
        a, b = runs[(better, seed)], runs[(worse, seed)]
        common = sorted({it for it, _ in a["validation"]} & {it for it, _ in b["validation"]})
        if common:
            out.append({"seed": seed, "iteration": common[-1],
                        "difference": loss_at(b, common[-1]) - loss_at(a, common[-1])})
    return out


def _curve_wins(records: list, better: str, worse: str, upto: Optional[int], seeds: list) -> tuple:
    """(points where better's seed-mean curve is lower, points compared) over the compared seeds' runs."""
    means = {v: _mean_curve([r for r in records if r["variant"] == v and r["seed"] in seeds
                             and r["status"] != "failed"], upto)
             for v in (better, worse)}
    common = sorted(set(means[better]) & set(means[worse]))
    return sum(means[better][i] < means[worse][i] for i in common), len(common)


def _mean_curve(records: list, upto: Optional[int]) -> dict:
    """{iteration: mean validation loss} over the iterations every given run reached (up to ``upto``)."""
    if not records:
        return {}
    curves = [dict((it, loss) for it, loss in r["validation"]) for r in records]
    common = set.intersection(*(set(c) for c in curves))
    return {it: statistics.fmean(c[it] for c in curves) for it in sorted(common) if upto is None or it <= upto}


def finding_verdict(comparisons: list) -> str:
    """The finding's verdict from its comparisons' (those not tested are left out, and said so)."""
    tested = [c["verdict"] for c in comparisons if c["verdict"] != "not tested"]
    if not tested:
        return "not tested"
    if all(v == "direction reproduced" for v in tested):
        verdict = "direction reproduced"
    elif all(v.startswith("direction reproduced") for v in tested):
        verdict = "direction reproduced in single-seed runs (no spread)"
    elif all(v == "not reproduced" for v in tested):
        verdict = "not reproduced"
    else:
        verdict = "partly reproduced / inconclusive (see the comparisons)"
    if len(tested) < len(comparisons):
        verdict += f" ({len(tested)} of {len(comparisons)} comparisons tested)"
    return verdict


def variant_rows(plan: dict, records: list) -> list:
    """Per variant: parameters (the trainer's count when logged), final validation loss over its finished runs."""
    rows = []
    ref = plan["models"].get(REFERENCE)
    for name, m in plan["models"].items():
        runs = [r for r in records if r["variant"] == name]
        losses = [r["final_valid_loss"] for r in runs if r["status"] == "done"]
        logged = {r["parameters"] for r in runs if r["parameters"]}
        params = logged.pop() if len(logged) == 1 else m["parameters"]
        mean = statistics.fmean(losses) if losses else None
        ms = [r["ms_per_iter_median"] for r in runs if r["ms_per_iter_median"]]
        walls = [r["wall_seconds"] for r in runs if r["status"] == "done" and r["wall_seconds"]]
        rows.append({"variant": name, "pattern": m["pattern"], "hidden_size": m["hidden_size"],
                     "ffn_hidden_size": m["ffn_hidden_size"], "parameters": params,
                     "non_embedding_parameters": params - m["embedding_parameters"],
                     "parameters_vs_reference": params / ref["parameters"] - 1 if ref else None,
                     "weight_norm": m["weight_norm"], "runs_done": len(losses), "runs": len(runs),
                     "mean_loss": mean, "std_loss": _std(losses), "min_loss": min(losses) if losses else None,
                     "max_loss": max(losses) if losses else None,
                     "perplexity": math.exp(min(mean, 50.0)) if mean is not None else None,
                     "ms_per_iter": statistics.median(ms) if ms else None,
                     "wall_seconds": statistics.fmean(walls) if walls else None})
    return rows


def analyse(plan: dict, records: list) -> dict:
    iters = plan["settings"]["train_iters"]
    findings = []
    for f in FINDINGS:
        comps = [compare(records, b, w, iters) for b, w in f.comparisons]
        supp = [compare(records, b, w, iters) for b, w in f.supplementary]
        findings.append({"key": f.key, "claim": f.claim, "verdict": finding_verdict(comps), "comparisons": comps,
                         "supplementary": supp, "plot": PLOT_FILES[f.key]})
    return {"complete": all(r["status"] == "done" for r in records), "findings": findings,
            "variants": variant_rows(plan, records)}


def _fmt(x, spec=".4f", none="-"):
    return none if x is None else format(x, spec)


def write_markdown(path: str, plan: dict, records: list, analysis: dict) -> None:
    s = plan["settings"]
    lines = ["# Paper findings at small scale: results", "",
             f"Settings: {s['base_preset']} proportions, hidden {s['hidden_size']}, vocabulary {s['vocab_size']}, "
             f"sequence {s['seq_length']}, batch {s['global_batch_size']}, {s['train_iters']} iterations = "
             f"{s['tokens']:,} tokens per run, lr {s['lr']:g} (cosine), {'bf16' if s['bf16'] else 'fp32'}, Mamba2 "
             f"scan `{s['ssd_backend']}`, seeds {', '.join(map(str, s['seeds']))}. Final validation loss of the "
             f"finished runs ({'all runs finished' if analysis['complete'] else 'not every run finished: see Runs'}):",
             ""]
    lines += ["| variant | pattern | FFN | parameters (non-embedding) | vs nf_wn | runs done "
              "| final val loss (mean ± std) | min – max | perplexity | ms/it | wall s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in analysis["variants"]:
        std = f" ± {row['std_loss']:.4f}" if row["std_loss"] is not None else ""
        lines.append(
            f"| {row['variant']} | `{row['pattern']}` | {row['ffn_hidden_size']} | {row['parameters']:,} "
            f"({row['non_embedding_parameters']:,}) | {_fmt(row['parameters_vs_reference'], '+.2%')} | "
            f"{row['runs_done']}/{row['runs']} | {_fmt(row['mean_loss'])}{std} | {_fmt(row['min_loss'])} – "
            f"{_fmt(row['max_loss'])} | "
            f"{_fmt(row['perplexity'], '.2f')} | {_fmt(row['ms_per_iter'], '.0f')} | "
            f"{_fmt(row['wall_seconds'], '.0f')} |")
    lines.append("")
    for f in analysis["findings"]:
        lines += [f"## Finding ({f['key']}): {f['claim']}", "", f"**Verdict: {f['verdict']}.**", ""]
        for c in f["comparisons"]:
            lines.append(f"* {c['better']} vs {c['worse']}: **{c['verdict']}** — {c['detail']}.")
        for c in f["supplementary"]:
            lines.append(f"* (also) {c['better']} vs {c['worse']}: {c['verdict']} — {c['detail']}.")
        lines += ["", f"![finding {f['key']}]({f['plot']})", ""]
    lines += ["## Runs", "", "| run | status | iterations | final val loss | parameters | ms/it | wall s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        lines.append(f"| {r['name']} | {r['status']} | {r['iterations_done']}/{r['train_iters']} | "
                     f"{_fmt(r['final_valid_loss'])} | {_fmt(r['parameters'], ',')} | "
                     f"{_fmt(r['ms_per_iter_median'], '.0f')} | {_fmt(r['wall_seconds'], '.0f')} |")
    lines += ["", "Each run: `" + (records[0]["trainer_command"] if records else "") + "` (shown for the first run; "
              "every run's exact command and preset fields are in results.json).", ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def plot_finding(path: str, finding: dict, records: list, settings: dict) -> bool:
    """Validation loss vs tokens: every seed thin, the seed mean thick. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = next(f for f in FINDINGS if f.key == finding["key"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tail = []  # losses after the first quarter of training set the y range (the start is far above)
    scale = settings["tokens_per_iter"] / 1e6
    for i, variant in enumerate(spec.plot_variants):
        runs = [r for r in records if r["variant"] == variant and r["status"] != "failed" and r["validation"]]
        for r in runs:
            ax.plot([it * scale for it, _ in r["validation"]], [x for _, x in r["validation"]], color=f"C{i}",
                    alpha=0.3, linewidth=1)
        mean = _mean_curve(runs, None)
        if mean:
            ax.plot([it * scale for it in mean], list(mean.values()), "o-", color=f"C{i}", linewidth=2,
                    markersize=3, label=f"{variant} ({len(runs)} seed{'s' if len(runs) != 1 else ''})")
        tail += [x for r in runs for it, x in r["validation"] if it >= settings["train_iters"] / 4]
    early = sorted({c["iteration"] for c in finding["comparisons"]
                    if c["iteration"] is not None and c["iteration"] != settings["train_iters"]})
    for iteration in early:  # comparisons a time budget moved before the end
        ax.axvline(iteration * scale, color="gray", linestyle="--", linewidth=1,
                   label=f"compared at iteration {iteration} (unfinished runs)")
    if tail:
        low, high = min(tail), max(tail)
        margin = 0.1 * (high - low) or 0.05
        ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"({finding['key']}) {finding['claim']}\nverdict: {finding['verdict']}", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(args) -> dict:
    if args.results_json:
        saved = read_json(args.results_json)
        plan, records = saved["plan"], saved["runs"]
    else:
        paths = Paths(args.workdir)
        if not os.path.isfile(paths.plan):
            raise StudyError(f"no {paths.plan}: run `plan` or `run` first (or give --results-json)")
        plan = read_json(paths.plan)
        records = collect(plan)
    analysis = analyse(plan, records)
    os.makedirs(args.output_dir, exist_ok=True)
    plotted = [plot_finding(os.path.join(args.output_dir, f["plot"]), f, records, plan["settings"])
               for f in analysis["findings"]]
    write_markdown(os.path.join(args.output_dir, "report.md"), plan, records, analysis)
    write_json(os.path.join(args.output_dir, "results.json"), {"plan": plan, "runs": records, "analysis": analysis})
    print(f"\n=== report in {args.output_dir}", flush=True)
    for f in analysis["findings"]:
        print(f"finding ({f['key']}) {f['claim']}: {f['verdict']}")
        for c in f["comparisons"] + f["supplementary"]:
            print(f"    {c['better']} vs {c['worse']}: {c['verdict']} — {c['detail']}")
    if not all(plotted):
        print("note: matplotlib is not installed here: no plots. They can be drawn later from the saved results:\n"
              f"  python -m experiments.paper_findings report --results-json "
              f"{os.path.join(args.output_dir, 'results.json')} --output-dir {args.output_dir}", flush=True)
    return analysis


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    start = time.time()
    args = parse_args(argv)
    try:
        if args.command in ("prepare", "all"):
            prepare(args)
        if args.command in ("plan", "run", "all"):
            if args.command != "plan" and not os.path.isfile(Paths(args.workdir).blend):
                raise StudyError(f"no prepared data in {args.workdir}: run `prepare` first (same --workdir)")
            plan = make_plan(args)
            print_plan(plan)
        if args.command in ("run", "all"):
            run_all(args, plan, start)
        if args.command in ("report", "all"):
            report(args)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue (finished stages and runs are skipped)",
              file=sys.stderr)
        return 130
    print(f"\npaper_findings {args.command} finished in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
