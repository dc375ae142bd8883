"""One-GPU benchmark suite: runtime on NCCL, per-layer cost at 1B shapes, 1B training throughput and baselines.

    python benchmarks/gpu_suite.py [--sections runtime,layers,train_1b_mbs4,profile_1b_mbs4,gpt_mbs2,fla_mbs4]
        [--out DIR] [--smoke] [--accumulate N] [--variants 'FLAGS;FLAGS' [--rounds N]]

Each section writes its results to DIR/gpu_suite.json as soon as it finishes (a later failure or a time limit loses
nothing) and prints it as a ``== name: {json}`` line; a section run again is recorded as ``name#2``, ``name#3``...
``--smoke`` runs every section at toy sizes on the CPU, to check the script before spending GPU time. ``--accumulate
N`` makes every training section and baseline take an optimizer step after N micro-batches, as pretraining with
large batches does (the optimizer's and the loop's cost per step is then spread over N micro-batches). Results and
commands go to docs/performance.md.

``--variants`` compares pretrain flags in one process: each training section runs once per variant (each a
``--train-args``-style string, ``;``-separated, the empty string allowed), round-robin for ``--rounds`` rounds. The
process compiles and autotunes once (a fresh process spends ~4-5 minutes there at 1B shapes, and a later process
can again), so each further run costs its iterations alone (~26 s at micro-batch 16, accumulating 8), and the
variants share one machine's clock. For a change in code rather than a flag, put the change behind a flag.
Likewise ``--in-process`` runs all the sections in one process, and a section's ``_accM`` suffix gives it its own
micro-batches per step: ``--in-process --sections train_1b_mbs16_acc8,fla_sized_mbs8_acc16`` compares ours with
fla's at one global batch on one machine. Give fla's baseline ~4 minutes when it is a process's first section (its
autotuning at these shapes: 207 s after ours in one process, over 265 s alone in session 19).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import statistics
import time
import traceback

import torch

from megatron_flash.testing import median_ms

SMOKE = False
SSD_BACKEND = "auto"  # --ssd-backend: the Mamba2 scan of the training sections
TRAIN_ARGS: list[str] = []  # --train-args: more pretrain flags for the training sections
ACCUMULATE = 1  # --accumulate: micro-batches per optimizer step, in the training sections and the baselines


def out_path(args):
    os.makedirs(args.out, exist_ok=True)
    return os.path.join(args.out, "gpu_suite.json")


def record(args, results, name, value):
    """``results[name] = value``, written out at once; a name already recorded (a section run again, in this
    process or an earlier one into the same file) gets the next free ``name#k`` instead, so no result is lost."""
    key, k = name, 1
    while key in results:
        k += 1
        key = f"{name}#{k}"
    results[key] = value
    with open(out_path(args), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"== {key}: {json.dumps(value, default=str)[:2000]}", flush=True)


# --- sections -------------------------------------------------------------------------------------------------

def section_runtime():
    """The runtime on this machine's backend, running a megatron GPTModel (local spec) for a few steps."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                            bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
                            gradient_accumulation_fusion=False, persist_layer_norm=False)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=128, max_sequence_length=32).to(device())
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2), [ddp])
    tokens = torch.randint(0, 128, (2, 33), device=device())
    mask = torch.triu(torch.ones(1, 1, 32, 32, dtype=torch.bool, device=device()), 1)
    losses = []
    for _ in range(5):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(tokens[:, :-1], torch.arange(32, device=device()).unsqueeze(0), mask, labels=tokens[:, 1:]).mean()
        loss.backward()
        ddp.finish_grad_sync()
        opt.step()
        losses.append(loss.item())
    return {"backend": torch.distributed.get_backend(), "device": str(device()), "losses": losses}


def section_layers(batch=None, seq=None):
    """Forward+backward time and peak memory of each layer type at 1B shapes (batch 8 x 4096 tokens, bf16, unless
    given: ``layers_b1_s256`` times each layer at the meta prefix's size, what the mixers run once per micro-batch
    beside the text). Mamba2 with ``--ssd-backend``'s scan, or with every backend this machine runs when it is
    auto. Each row is printed as it is measured (a time limit then loses only the rows not yet timed)."""
    from megatron_flash.layers.base import MixerInputs
    from megatron_flash.models import builder
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module
    from megatron_flash.models import specs

    default_batch, default_seq = (2, 64) if SMOKE else (8, 4096)
    batch, seq = batch or default_batch, seq or default_seq
    preset = "tiny" if SMOKE else "nemotron_flash_1b"
    rows = []
    ssd_backends = mamba2_backends() if SSD_BACKEND == "auto" else [SSD_BACKEND]
    for char, name in (("F", "FFN (SwiGLU)"), ("A", "attention (GQA, SDPA)"), ("D", "DeltaNet"),
                       ("M", "Mamba2")):
        for backend in (ssd_backends if char == "M" else [None]):
            spec = builder.resolve(preset, layer_pattern=char, params_dtype=torch.bfloat16, bf16=True,
                                   **({"ssd_backend": backend} if backend else {}))
            layer = build_module(specs.layer_spec(char), config=spec.config, layer_number=1).to(device())
            rope = RotaryEmbedding(spec.config.kv_channels, 1.0)(seq).to(device())
            x = torch.randn(seq, batch, spec.config.hidden_size, device=device(), dtype=torch.bfloat16,
                            requires_grad=True)
            inputs = MixerInputs(rotary_pos_emb=rope)

            def step():
                residual, mixer_out = layer(x, None, inputs)  # the block's output is their sum (HybridLayer)
                (residual + mixer_out).float().sum().backward()

            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            ms = median_ms(step)
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
            rows.append({"layer": name, "backend": backend or "default", "fwd_bwd_ms": round(ms, 2),
                         "peak_gib": round(peak, 2), "tokens": batch * seq})
            print(f"== layers_b{batch}_s{seq} row: {json.dumps(rows[-1])}", flush=True)
    return rows


def mamba2_backends():
    """The SSD backends this machine runs: mamba_ssm's and fla's kernels need a GPU (and mamba_ssm its package)."""
    from megatron_flash.ops.ssd import mamba_ssm_available

    gpu = torch.cuda.is_available()
    return (["torch_compile", "torch"] + (["fla"] if gpu else [])
            + (["mamba_ssm"] if gpu and mamba_ssm_available() else []))


def section_train(preset, micro_batch, extra=(), profile_dir=None, variant=()):
    """Our trainer (pretrain.train) on mock data: steady-state tokens/s, MFU and memory over the second half of
    the iterations (8, or 4 when accumulating); with ``profile_dir``, a torch-profiler table of the kernels of the
    last two."""
    from megatron_flash import pretrain
    from megatron_flash.training import arguments
    from megatron_flash.training.loop_utils import memory_outside_allocator_gib, shrink_kernel_local_memory

    seq = 64 if SMOKE else 4096
    iters = 8 if ACCUMULATE == 1 else 4
    argv = ["--mock-data", "--preset", "tiny" if SMOKE else preset, "--seq-length", str(seq),
            "--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch * ACCUMULATE),
            "--train-iters", str(iters), "--log-interval", str(iters // 2), "--eval-iters", "0",
            "--lr", "1e-3", "--ssd-backend", SSD_BACKEND, *([] if SMOKE else ["--bf16"]), *extra, *TRAIN_ARGS,
            *variant]
    if profile_dir:
        argv += ["--profile", "--profile-step-start", str(iters - 2), "--profile-step-end", str(iters),
                 "--profile-dir", profile_dir]
    args = arguments.parse_args(argv, world_size=1)
    if torch.cuda.is_available():  # the peak of this run, not of an earlier one in the same process
        torch.cuda.reset_peak_memory_stats()
    result = pretrain.train(args)
    out = {"preset": preset, "micro_batch": micro_batch, "accumulate": ACCUMULATE, "seq": seq,
           "ssd_backend": SSD_BACKEND, "train_args": " ".join([*TRAIN_ARGS, *variant]), **result["last_log"],
           "flops_per_token": result["flops_per_token"], "final_losses": result["losses"][-2:]}
    if torch.cuda.is_available():  # how much of the memory outside the allocator is kernels' local memory
        shrink_kernel_local_memory()
        out["outside_allocator_gib_after_stack_reset"] = memory_outside_allocator_gib()
    if profile_dir:
        out["profile"] = result["profile"]
    return out


# the layers at another batch and sequence length: ``layers_b1_s256``
LAYERS_SECTION = re.compile(r"layers_b(\d+)_s(\d+)$")
TRAIN_SECTION = re.compile(r"(train|train_no_weight_norm|profile)_(1b|3b)_mbs(\d+)$")
# the baselines at the 1B size, micro-batch N: fla at the 1B's shape (12 blocks, 923M parameters), or sized to its
# parameter count (fla_sized: the FFN widened, 961M against 965M)
BASELINE_SECTION = re.compile(r"(gpt|fla|fla_sized)_mbs(\d+)$")
# any training or baseline section with its own micro-batches per step: ``fla_sized_mbs8_acc16``
SECTION_ACCUMULATE = re.compile(r"(.+)_acc(\d+)$")


def split_accumulate(name, default):
    """``"fla_sized_mbs8_acc16"`` -> ("fla_sized_mbs8", 16); a name without the suffix keeps ``default``."""
    match = SECTION_ACCUMULATE.match(name)
    return (match.group(1), int(match.group(2))) if match else (name, default)


def train_section(name, out_dir, variant=()):
    """``train_1b_mbs4``, ``train_no_weight_norm_1b_mbs4`` (weight-norm overhead: paper +4-7%),
    ``profile_1b_mbs4``, ``train_3b_mbs2`` ..."""
    kind, size, mbs = TRAIN_SECTION.match(name).groups()
    preset = f"nemotron_flash_{size}"
    if kind == "train_no_weight_norm":
        return section_train(preset, int(mbs), extra=["--no-weight-norm"], variant=variant)
    if kind == "profile":
        return section_train(preset, int(mbs), profile_dir=os.path.join(out_dir, "profile"), variant=variant)
    return section_train(preset, int(mbs), variant=variant)


def release_memory():
    """Free a finished run's model and optimizer (gc: they hold reference cycles) and the allocator's cache, before
    the next run in this process allocates its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_section_variants(name, out_dir, variants, rounds):
    """The section once per variant, round-robin for ``rounds`` rounds, in this process: every run, and per
    variant the median tokens/s and its ratio to the first variant's."""
    runs = []
    for round_index in range(rounds):
        for variant in variants:
            run = train_section(name, out_dir, variant=shlex.split(variant))
            runs.append({"round": round_index, "variant": variant, **run})
            release_memory()
            print(f"== {name} round {round_index} [{variant}]: {run['tokens_per_s']:,.0f} tokens/s", flush=True)
    median = {v: statistics.median(r["tokens_per_s"] for r in runs if r["variant"] == v) for v in variants}
    return {"variants": variants, "rounds": rounds, "runs": runs, "median_tokens_per_s": median,
            "ratio_to_first": {v: median[v] / median[variants[0]] for v in variants}}


def section_gpt_baseline(micro_batch, iters=6):
    """megatron-core GPTModel, local spec, at ~the 1B preset's parameter count: tokens/s and MFU (6N)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    import torch.nn.functional as F

    h, layers, vocab, seq = (64, 2, 512, 64) if SMOKE else (2048, 13, 131072, 4096)
    cfg = TransformerConfig(num_layers=layers, hidden_size=h, num_attention_heads=max(4, h // 128),
                            num_query_groups=max(1, h // 512), ffn_hidden_size=3 * h, gated_linear_unit=True,
                            activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
                            bf16=not SMOKE, params_dtype=torch.float32 if SMOKE else torch.bfloat16,
                            bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
                            gradient_accumulation_fusion=False, persist_layer_norm=False,
                            hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=vocab,
                     max_sequence_length=seq, position_embedding_type="rope").to(device())
    n_params = sum(p.numel() for p in model.parameters())
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=not SMOKE,
                                                 params_dtype=cfg.params_dtype), [ddp])
    tokens = torch.randint(0, vocab, (micro_batch, seq + 1), device=device())
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device()), 1)
    pos = torch.arange(seq, device=device()).unsqueeze(0)

    def step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        for _ in range(ACCUMULATE):
            (ddp(tokens[:, :-1], pos, mask, labels=tokens[:, 1:]).float().mean() / ACCUMULATE).backward()
        ddp.finish_grad_sync()
        opt.step()

    ms = median_ms(step, warmup=2, iters=iters)
    tps = micro_batch * ACCUMULATE * seq / (ms / 1000)
    return {"params": n_params, "micro_batch": micro_batch, "accumulate": ACCUMULATE, "ms_per_iter": ms,
            "tokens_per_s": tps,
            "mfu_6N": 6 * n_params * tps / PEAK if PEAK else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def fla_config(sized: bool):
    """fla's DeltaNetConfig at the 1B preset's shape (12 blocks, hidden 2048, FFN 6144, tied 131072 vocab), or
    with ``sized`` its FFN widened, in steps of 256, to the widest whose parameter count stays within the 1B
    preset's released count (so any difference favors the baseline)."""
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM
    from megatron_flash.presets import RELEASED_PARAMETER_COUNTS

    h, layers, vocab = (64, 2, 512) if SMOKE else (2048, 12, 131072)

    def config(ffn):
        return DeltaNetConfig(hidden_size=h, num_hidden_layers=layers, num_heads=max(1, h // 128),
                              intermediate_size=ffn, vocab_size=vocab, tie_word_embeddings=True,
                              fuse_cross_entropy=False, fuse_linear_cross_entropy=False)

    if not sized:
        return config(3 * h)

    def count(ffn):
        with torch.device("meta"):
            return sum(p.numel() for p in DeltaNetForCausalLM(config(ffn)).parameters())

    # the count is linear in the FFN width: solve, then round down to a multiple of 256
    target, base, step = RELEASED_PARAMETER_COUNTS["nemotron_flash_1b"], count(3 * h), count(3 * h + 256)
    if SMOKE:  # the tiny shape has no released count: one step wider shows the sizing runs
        return config(3 * h + 256)
    return config(3 * h + 256 * ((target - base) // (step - base)))


def section_fla_baseline(micro_batch, iters=6, sized=False):
    """fla's DeltaNetForCausalLM (:func:`fla_config`) in plain PyTorch with fused AdamW: what flame users get."""
    from fla.models import DeltaNetForCausalLM

    seq = 64 if SMOKE else 4096
    cfg = fla_config(sized)
    vocab = cfg.vocab_size
    model = DeltaNetForCausalLM(cfg).to(device(), dtype=torch.float32 if SMOKE else torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.cuda.is_available())
    tokens = torch.randint(0, vocab, (micro_batch, seq), device=device())

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(ACCUMULATE):
            (model(input_ids=tokens, labels=tokens).loss / ACCUMULATE).backward()
        opt.step()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, warmup=2, iters=iters)
    tps = micro_batch * ACCUMULATE * seq / (ms / 1000)
    return {"params": n_params, "ffn": cfg.intermediate_size, "micro_batch": micro_batch,
            "accumulate": ACCUMULATE, "ms_per_iter": ms, "tokens_per_s": tps,
            "mfu_6N": 6 * n_params * tps / PEAK if PEAK else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


# --- driver ---------------------------------------------------------------------------------------------------

def device():
    from megatron_flash import runtime

    return runtime.device()


PEAK = 0.0


def main():
    global SMOKE, PEAK, SSD_BACKEND, TRAIN_ARGS, ACCUMULATE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="runtime,layers,train_1b_mbs4,train_no_weight_norm_1b_mbs4,"
                                         "profile_1b_mbs4,train_3b_mbs2,gpt_mbs2,fla_mbs4",
                   help="comma-separated; each runs in its own process (unless --in-process) so one cannot starve "
                        "the next of memory. "
                        "layers_bB_sS times the layers at batch B and sequence S (layers_b1_s256: the meta prefix). "
                        "Training sections are named (train|train_no_weight_norm|profile)_(1b|3b)_mbsN, "
                        "baselines (gpt|fla|fla_sized)_mbsN; any of them with _accM steps every M micro-batches "
                        "instead of --accumulate's")
    p.add_argument("--in-process", action="store_true",
                   help="run every section in this one process: compilation and autotuning are shared and the "
                        "sections share one machine's clock (each section's memory is freed before the next)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--ssd-backend", default="auto",
                   help="Mamba2 scan of the training sections (as pretrain's flag) and of the layers sections (auto: "
                        "each backend this machine runs)")
    p.add_argument("--train-args", default="",
                   help="more pretrain flags for the training sections, one string, e.g. '--recompute-logits'")
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per optimizer step in the training sections and baselines (default 1)")
    p.add_argument("--variants", default=None,
                   help="';'-separated pretrain flag sets (the empty string allowed) that each training section "
                        "runs in turn in one process, e.g. ';--no-share-meta-rows'")
    p.add_argument("--rounds", type=int, default=2, help="rounds of --variants (default 2)")
    args = p.parse_args()
    if args.accumulate < 1:
        p.error(f"--accumulate must be at least 1, got {args.accumulate}")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    variants = None if args.variants is None else [v.strip() for v in args.variants.split(";")]
    if variants is not None and len(set(variants)) != len(variants):
        p.error(f"--variants names a flag set twice: {args.variants!r}")
    SMOKE = args.smoke
    ACCUMULATE = args.accumulate
    SSD_BACKEND = args.ssd_backend
    TRAIN_ARGS = shlex.split(args.train_args)
    if not args.in_process:
        return run_sections_in_subprocesses(args)
    from megatron_flash import runtime
    from megatron_flash.training.loop_utils import peak_flops_per_second

    runtime.initialize()
    PEAK = peak_flops_per_second()
    results = {}
    if os.path.exists(out_path(args)):
        with open(out_path(args)) as f:
            results = json.load(f)
    results.update({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "smoke": SMOKE,
                    "peak_flops": PEAK})
    sections = {
        "runtime": section_runtime,
        "layers": section_layers,
    }
    for name in args.sections.split(","):
        t = time.perf_counter()
        section, ACCUMULATE = split_accumulate(name, args.accumulate)
        try:
            if ACCUMULATE < 1:
                raise ValueError(f"section {name!r}: micro-batches per step must be at least 1")
            if TRAIN_SECTION.match(section) and variants is not None:
                value = train_section_variants(section, args.out, variants, args.rounds)
            elif TRAIN_SECTION.match(section):
                value = train_section(section, args.out)
            elif LAYERS_SECTION.match(section):
                value = section_layers(*map(int, LAYERS_SECTION.match(section).groups()))
            elif BASELINE_SECTION.match(section):
                kind, mbs = BASELINE_SECTION.match(section).groups()
                value = (section_gpt_baseline(int(mbs)) if kind == "gpt"
                         else section_fla_baseline(int(mbs), sized=kind == "fla_sized"))
            else:
                value = sections[section]()
        except Exception as exc:  # noqa: BLE001 - keep going: one failure must not lose the other sections
            value = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        if isinstance(value, dict):
            value["section_seconds"] = round(time.perf_counter() - t, 1)
        record(args, results, name, value)
        release_memory()
    runtime.shutdown()


def run_sections_in_subprocesses(args):
    import subprocess
    import sys

    for name in args.sections.split(","):
        # "--train-args=VALUE": a value that starts with "--" would otherwise be read as a flag.
        cmd = [sys.executable, __file__, "--in-process", "--sections", name, "--out", args.out,
               "--ssd-backend", args.ssd_backend, f"--train-args={args.train_args}",
               "--accumulate", str(args.accumulate),
               *([f"--variants={args.variants}", "--rounds", str(args.rounds)] if args.variants is not None else []),
               *(["--smoke"] if args.smoke else [])]
        code = subprocess.call(cmd)
        if code:
            print(f"== {name}: process exited with {code}", flush=True)


if __name__ == "__main__":
    main()
