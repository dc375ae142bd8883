"""One-GPU decode benchmark (issues #7, #9): exported Nemotron-Flash 1B / 3B decoding from one CUDA graph, against
Qwen3-0.6B / -1.7B shapes in transformers.

    python benchmarks/gpu_decode.py [--sections export_1b,decode_1b,throughput_1b,export_3b,decode_3b,throughput_3b,
                                     qwen3_0.6b,qwen3_1.7b,summary] [--out DIR] [--smoke] [...]

Sections (each in its own try/except; results go to DIR/gpu_decode.json as soon as each finishes, a log to
DIR/gpu_decode.log):

* ``export_{1b,3b}``: the Megatron model built from the preset with random weights (megatron_flash.models.builder,
  one process), saved as a model-only Megatron checkpoint and exported with the real exporter
  (``megatron_flash.export.convert.export_to_hf``, what tools/convert_to_hf.py runs) into a temporary folder, then
  loaded with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=bfloat16)`` onto the GPU.
  ``--export-route direct`` skips the checkpoint round trip (same mapping, config, layout check and files, from the
  in-memory model) to save time.
* ``decode_{1b,3b}``: batch 1, a ``--prompt-tokens`` random prompt, ``--new-tokens`` greedy tokens with
  megatron_flash.inference.graph_decode (static cache, one captured decode step replayed): generation seconds and
  ms/token. First a check on ``--check-tokens`` tokens: graph replays equal eager steps, and how many leading
  tokens agree with transformers' ``generate`` through the dynamic cache.
* ``throughput_{1b,3b}``: a ``--long-prompt``-token prompt prefilled ONCE for one sequence, its caches copied to
  every row of the batch; the largest batch of ``--batches`` that fits decodes ``--throughput-tokens`` tokens from
  one CUDA graph: generated tokens/s.
* ``qwen3_{0.6b,1.7b}``: those shapes (public config values, random bf16 weights) in transformers: (a) the same
  graph driver capturing one decode step over transformers' ``StaticCache`` (with a 4-D boolean mask advanced on
  the device), ``--new-tokens`` tokens; (b) ``model.generate(..., cache_implementation="static")`` over
  ``--qwen-generate-tokens`` tokens (transformers' automatic torch.compile off unless ``--qwen-generate-compile``).
* ``summary``: ms/token against the paper and the targets, the 1B / Qwen3-0.6B speedups.
* ``compiled_{1b,3b}`` (opt-in): decode_{size} with the one-token forward compiled by torch.compile first.
* ``profile_{1b,3b}`` (opt-in): what that compiled step runs, kernel by kernel: ``--profile-steps`` steps without
  the CUDA graph under torch.profiler, after a warm-up that compiles it; device time per step by kernel, the number
  of kernels per step and their summed time (compare with compiled_{size}'s ms/token: the rest is what the graph
  still spends between kernels). The cache is as large as the timed generation's (the attention reads all of it).

``--smoke`` runs everything on the CPU at toy sizes (the tiny preset, tiny Qwen3 shapes, CUDA graphs off).

GPU wall time (H100, estimates; the 1B export took 37 s on a 2-core CPU machine: build 8 s, checkpoint 10 s,
export 14 s): start + imports ~20 s; export_1b ~40-60 s (checkpoint route; ~20 s direct); decode_1b ~20 s (8192
tokens at ~1-2 ms + checks); throughput_1b ~15-30 s (32k prefill + one batch); export_3b ~120-180 s (checkpoint
route: 11 GB fp32 written and read back; ~50 s direct); decode_3b ~30 s; throughput_3b ~20-40 s; qwen3_0.6b ~30 s,
qwen3_1.7b ~40 s (8192 graph tokens + 256 eager generate tokens). All: ~6-8 min. Under a 10-minute limit with
margin, run it in two calls (``--sections export_1b,decode_1b,throughput_1b,qwen3_0.6b,qwen3_1.7b,summary``, then
``--sections export_3b,decode_3b,throughput_3b``) and merge their JSON files afterwards on any machine with
``--summarize first.json second.json`` (writes the merged file with the summary to --out); or shorten with
``--export-route direct``, ``--new-tokens 2048``. ``compiled_{1b,3b}`` (opt-in) add ~1-2 min each of compilation.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PAPER = {  # Nemotron-Flash paper (batch 1, 8192 tokens; throughput at a 32k prompt) and this project's targets
    "1b": {"paper_ms_per_token": 1.76, "target_ms_per_token": 1.2, "paper_tokens_per_s": 7289},
    "3b": {"paper_ms_per_token": 3.50, "target_ms_per_token": 2.5},
}
PRESETS = {"1b": "nemotron_flash_1b", "3b": "nemotron_flash_3b"}
SPEEDUP_TARGET = 2.8  # Nemotron-Flash-1B vs Qwen3-0.6B, ms/token

# Public config.json values of Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B (architecture fields only).
QWEN3_SHAPES = {
    "qwen3_0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128),
    "qwen3_1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128),
}
QWEN3_COMMON = dict(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, attention_bias=False, hidden_act="silu", bos_token_id=151643,
                    eos_token_id=151645, use_sliding_window=False)
SMOKE_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=4096, bos_token_id=1,
                   eos_token_id=2)

DEFAULT_SECTIONS = ("export_1b", "decode_1b", "throughput_1b", "export_3b", "decode_3b", "throughput_3b",
                    "qwen3_0.6b", "qwen3_1.7b", "summary")
# Opt-in: the decode step compiled by torch.compile (Inductor) before the capture; compilation takes ~1-2 min.
ALL_SECTIONS = DEFAULT_SECTIONS[:-1] + ("compiled_1b", "compiled_3b", "profile_1b", "profile_3b", "summary")
# --smoke: the tiny preset; as "3b" with sliding-window attention (window 6) besides full attention.
SMOKE_MODELS = {"1b": ("tiny", None, None), "3b": ("tiny", "DFMFSFAF", 6)}


# --------------------------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------------------------


class Recorder:
    """Results JSON (rewritten whole after every section: a time limit loses nothing already measured) + log.
    A run replaces an earlier run's file in the same folder; ``--summarize`` merges files."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "gpu_decode.json")
        self.log_path = os.path.join(out_dir, "gpu_decode.log")
        self.results = {}
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        line = f"[gpu_decode {time.perf_counter() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def record(self, name: str, value) -> None:
        self.results[name] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(tmp, self.path)
        self.log(f"== {name}: {json.dumps(value, default=str)[:1500]}")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 3)


def memory_note() -> dict:
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_free_gib": gib(free), "gpu_total_gib": gib(total),
            "gpu_peak_allocated_gib": gib(torch.cuda.max_memory_allocated())}


def random_prompt(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Ids from 3 up: clear of the usual pad/bos/eos ids.
    return torch.randint(3, vocab, (batch, length), generator=generator).to(device())


# --------------------------------------------------------------------------------------------------------------
# Nemotron-Flash: export and load
# --------------------------------------------------------------------------------------------------------------


def export_and_load(size: str, args, rec: Recorder):
    """Build the preset's Megatron model (random weights), export it to a temporary HF folder, load it. Returns
    (model, info)."""
    from transformers import AutoModelForCausalLM

    from megatron_flash.export import convert
    from megatron_flash.export.hf_mapping import Dims, megatron_to_hf
    from megatron_flash.models import builder, layout
    from megatron_flash.training import arguments, checkpointing

    preset, pattern, window = SMOKE_MODELS[size] if args.smoke else (PRESETS[size], None, None)
    overrides = {"sliding_window": window} if window else {}
    work = tempfile.mkdtemp(prefix=f"gpu_decode_{size}_", dir=args.tmp)
    folder = os.path.join(work, "hf")
    info = {"preset": preset, "pattern": pattern, "sliding_window": window, "route": args.export_route}
    token_ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # the released ids
    try:
        with convert.megatron_process():
            t0 = time.perf_counter()
            spec = builder.resolve(preset, pattern, params_dtype=torch.float32, perform_initialization=True,
                                   use_cpu_initialization=not torch.cuda.is_available(), **overrides)
            model = builder.build_model(spec, 4096)
            synchronize()
            info["build_s"] = time.perf_counter() - t0
            info["megatron_parameters"] = sum(p.numel() for p in model.parameters())
            rec.log(f"{size}: built {preset} ({info['megatron_parameters'] / 1e9:.3f} B parameters) in "
                    f"{info['build_s']:.1f} s")
            if args.export_route == "checkpoint":
                t0 = time.perf_counter()
                trainer_args = vars(arguments.build_parser().parse_args([]))
                trainer_args.update(preset=preset, pattern=pattern, sliding_window=window, vocab_size=spec.vocab_size,
                                    config=None, untie_embeddings=not spec.tie_embeddings, tokenizer_model=None,
                                    mock_data=False)
                common = {"args": trainer_args, "consumed_samples": 0, "vocab_size": spec.vocab_size,
                          "hf_config": dict(token_ids)}
                root = os.path.join(work, "megatron")
                checkpointing.save_checkpoint(root, 0, model, None, None, common)
                info["checkpoint_save_s"] = time.perf_counter() - t0
                info["checkpoint_gib"] = gib(sum(os.path.getsize(os.path.join(d, f))
                                                 for d, _, files in os.walk(root) for f in files))
                del model
                free_memory()
                rec.log(f"{size}: Megatron checkpoint ({info['checkpoint_gib']} GiB) saved in "
                        f"{info['checkpoint_save_s']:.1f} s; exporting")
                t0 = time.perf_counter()
                convert.export_to_hf(root, folder, dtype="bf16", progress=False)
                info["export_s"] = time.perf_counter() - t0
                shutil.rmtree(root, ignore_errors=True)
            else:
                t0 = time.perf_counter()
                tensors = layout.full_named_tensors(model)
                del model
                dims = Dims.from_megatron(spec.config, spec.vocab_size, spec.tie_embeddings)
                hf_config = convert.hf_config_from_megatron(spec.config, dims, torch.bfloat16, token_ids)
                state = {k: v.to(device="cpu", dtype=torch.bfloat16) for k, v in megatron_to_hf(tensors, dims).items()}
                del tensors
                free_memory()
                convert.check_against_hf_model(state, hf_config)
                os.makedirs(folder)
                hf_config.save_pretrained(folder)
                convert.write_safetensors(state, folder)
                for name in convert.MODELING_FILES:
                    shutil.copy(os.path.join(convert.HF_CODE_DIR, name), os.path.join(folder, name))
                del state
                info["export_s"] = time.perf_counter() - t0
        info["hf_folder_gib"] = gib(sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)))
        rec.log(f"{size}: exported ({info['hf_folder_gib']} GiB) in {info['export_s']:.1f} s; loading")
        free_memory()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
        model = model.to(device()).eval()
        synchronize()
        info["load_s"] = time.perf_counter() - t0
        info["hf_class"] = f"{type(model).__module__}.{type(model).__name__}"
        info["hf_parameters"] = sum(p.numel() for p in model.parameters())
        info["layer_types"] = "".join({"deltanet": "D", "m2": "M", "a": "A", "f": "F"}[t]
                                      for t in model.config.layer_types)
        info.update(memory_note())
        return model, info
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Nemotron-Flash: decode and throughput
# --------------------------------------------------------------------------------------------------------------


def leading_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading positions where every row of a and b agrees."""
    same = (a == b).all(0).tolist()
    return same.index(False) if False in same else len(same)


@torch.no_grad()
def nemotron_decode(model, size: str, args, rec: Recorder) -> dict:
    from megatron_flash.inference import graph_decode

    out = {"batch": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    prompt = random_prompt(1, args.prompt_tokens, model.config.vocab_size, seed=1)

    # Correctness on this device first: the graph replays what the eager steps compute, and (informative only:
    # bf16 kernels differ, and a random model's near-tied logits flip easily) agreement with generate().
    eager = graph_decode.greedy_generate(model, prompt, args.check_tokens, use_cuda_graph=False)
    graphed = graph_decode.greedy_generate(model, prompt, args.check_tokens, warmup_steps=args.warmup_steps)
    dynamic = model.generate(prompt, do_sample=False, max_new_tokens=args.check_tokens,
                             min_new_tokens=args.check_tokens, pad_token_id=0)[:, prompt.shape[1]:]
    out["check"] = {"tokens": args.check_tokens, "graph_equals_eager": torch.equal(eager.tokens, graphed.tokens),
                    "leading_tokens_graph_equal_to_eager": leading_agreement(eager.tokens, graphed.tokens),
                    "leading_tokens_equal_to_dynamic_generate": leading_agreement(eager.tokens, dynamic),
                    "eager_ms_per_token": eager.ms_per_token}
    rec.log(f"{size}: check {out['check']}")
    del eager, graphed, dynamic
    free_memory()

    cache = model.make_static_cache(1, args.prompt_tokens + args.new_tokens)
    result = graph_decode.greedy_generate(model, prompt, args.new_tokens, warmup_steps=args.warmup_steps,
                                          cache=cache)
    steps = result.steps
    out.update({
        "cuda_graph": steps.cuda_graph, "ms_per_token": result.ms_per_token,
        "generation_s": result.prefill_s + steps.total_s, "prefill_s": result.prefill_s,
        "decode_steps_s": steps.total_s, "graph_replays": steps.graph_steps, "graph_replay_s": steps.graph_s,
        "capture_s": steps.capture_s, "tokens_per_s": args.new_tokens / (result.prefill_s + steps.total_s),
        "cache_gib": gib(cache.memory_bytes()),
        "distinct_tokens": int(result.tokens.unique().numel()),
    })
    out.update({k: v for k, v in PAPER[size].items() if "ms" in k})
    out.update(memory_note())
    return out


@torch.no_grad()
def nemotron_compiled(model, size: str, args, rec: Recorder) -> dict:
    """decode_{size} with the one-token forward compiled by torch.compile before the capture."""
    from megatron_flash.inference import graph_decode

    from torch._dynamo.utils import counters

    prompt = random_prompt(1, args.prompt_tokens, model.config.vocab_size, seed=1)
    plain = graph_decode.greedy_generate(model, prompt, args.check_tokens, warmup_steps=args.warmup_steps)
    cache = model.make_static_cache(1, args.prompt_tokens + args.new_tokens)
    counters.clear()
    # On the CPU (--smoke) megatron_flash.runtime turned dynamo off for the export's Megatron code; back on here.
    dynamo_was_disabled = torch._dynamo.config.disable
    torch._dynamo.config.disable = False
    try:
        result = graph_decode.greedy_generate(model, prompt, args.new_tokens, warmup_steps=args.warmup_steps,
                                              cache=cache, compile_step=True)
    finally:
        torch._dynamo.config.disable = dynamo_was_disabled
    steps = result.steps
    out = {"batch": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "method": "torch.compile(dynamic=False) of the one-token forward, then one CUDA graph of the step",
           "cuda_graph": steps.cuda_graph, "ms_per_token": result.ms_per_token,
           "generation_s": result.prefill_s + steps.total_s, "warmup_and_compile_s": steps.warmup_s,
           "capture_s": steps.capture_s, "graph_replays": steps.graph_steps,
           # Fused kernels round differently in bf16: agreement with the uncompiled tokens is informative only.
           "leading_tokens_equal_to_uncompiled": leading_agreement(plain.tokens, result.tokens[:, :args.check_tokens]),
           "dynamo_graphs": counters["stats"]["unique_graphs"],
           "dynamo_graph_breaks": sum(counters["graph_break"].values())}
    out.update({k: v for k, v in PAPER[size].items() if "ms" in k})
    return out


@torch.no_grad()
def nemotron_profile(model, size: str, args, rec: Recorder) -> dict:
    """The compiled one-token step's kernels (see the module docstring, ``profile_{size}``)."""
    from megatron_flash.inference import graph_decode
    from megatron_flash.training.loop_utils import kernel_table

    steps = args.profile_steps
    prompt = random_prompt(1, args.prompt_tokens, model.config.vocab_size, seed=1)
    # As large as the timed generation's cache: the attention step reads the whole static buffer every token.
    cache = model.make_static_cache(1, max(args.prompt_tokens + args.new_tokens,
                                           args.prompt_tokens + args.warmup_steps + steps + 2))
    first = graph_decode.prefill(model, prompt, cache).argmax(-1, keepdim=True)
    dynamo_was_disabled = torch._dynamo.config.disable  # as in nemotron_compiled
    torch._dynamo.config.disable = False
    try:
        warm = graph_decode.decode(model, cache, first, args.warmup_steps + 1, use_cuda_graph=False,
                                   compile_step=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # The profiled call must reuse the warm-up's compiled step (else compilation is in the table): a
        # recompile fails the section. Its first token gets the strides of the warm-up's, which dynamo guards.
        last = warm.tokens[:, -1:].clone(memory_format=torch.contiguous_format)
        with torch._dynamo.config.patch(error_on_recompile=True), \
                torch.profiler.profile(activities=activities) as profiler:
            graph_decode.decode(model, cache, last, steps + 1, use_cuda_graph=False, compile_step=True)
            synchronize()
    finally:
        torch._dynamo.config.disable = dynamo_was_disabled
    kernels = kernel_table(profiler, steps)
    out = {"batch": 1, "profiled_steps": steps, "context_tokens": args.prompt_tokens + args.warmup_steps + 1,
           "cache_text_tokens": cache.max_length,  # what the attention step reads, whatever the context
           "unit": "device" if torch.cuda.is_available() else "cpu (operators)",
           "kernel_ms_per_step": sum(row["ms_per_iter"] for row in kernels),
           "kernels_per_step": sum(row["calls_per_iter"] for row in kernels),
           "kernels": kernels[:30]}
    rec.log(f"{size}: {out['kernels_per_step']:.0f} kernels, {out['kernel_ms_per_step']:.3f} ms per step")
    return out


@torch.no_grad()
def nemotron_throughput(model, size: str, args, rec: Recorder) -> dict:
    from megatron_flash.inference import graph_decode

    max_length = args.long_prompt + args.throughput_tokens
    out = {"prompt_tokens": args.long_prompt, "generated_tokens": args.throughput_tokens,
           "prompt_caches": "prefilled once for one sequence and copied to every batch row",
           "paper_tokens_per_s": PAPER[size].get("paper_tokens_per_s")}
    prompt = random_prompt(1, args.long_prompt, model.config.vocab_size, seed=2)
    one_row = model.make_static_cache(1, max_length)
    synchronize()
    t0 = time.perf_counter()
    first = graph_decode.prefill(model, prompt, one_row).argmax(-1, keepdim=True)
    synchronize()
    out["prefill_s"] = time.perf_counter() - t0
    del prompt
    free_memory()
    row_bytes = one_row.memory_bytes()
    out["cache_gib_per_row"] = gib(row_bytes)
    rec.log(f"{size}: {args.long_prompt}-token prompt prefilled in {out['prefill_s']:.1f} s; cache "
            f"{out['cache_gib_per_row']} GiB per row")
    tries = []
    for batch in args.batches:
        if torch.cuda.is_available():
            free = torch.cuda.mem_get_info()[0]
            # The cache, plus per row the step's logits (fp32 + bf16) and a margin for the graph's pool.
            need = batch * (row_bytes + 8 * model.config.vocab_size) * 1.1
            if need > free:
                tries.append({"batch": batch, "skipped": f"needs ~{gib(need)} GiB, {gib(free)} GiB free"})
                continue
        cache = None
        try:
            cache = model.make_static_cache(batch, max_length)
            cache.copy_from(one_row)
            result = graph_decode.decode(model, cache, first.expand(batch, 1).contiguous(), args.throughput_tokens,
                                         warmup_steps=args.warmup_steps)
            steps = result.steps
            timed_steps, seconds = (steps.graph_steps, steps.graph_s) if steps.cuda_graph else (
                steps.num_steps, steps.total_s)
            row = {"batch": batch, "tokens_per_s": batch * timed_steps / seconds, "ms_per_step": steps.ms_per_step,
                   "cuda_graph": steps.cuda_graph, "timed_steps": timed_steps, "cache_gib": gib(cache.memory_bytes()),
                   "rows_identical": bool((result.tokens == result.tokens[:1]).all())}
            row.update(memory_note())
            tries.append(row)
            out.update(row)
            rec.log(f"{size}: batch {batch}: {row['tokens_per_s']:.0f} tokens/s")
            break
        except torch.cuda.OutOfMemoryError as exc:
            tries.append({"batch": batch, "oom": str(exc).splitlines()[0][:200]})
            rec.log(f"{size}: batch {batch} out of memory")
        finally:
            del cache
            free_memory()
    out["tries"] = tries
    return out


# --------------------------------------------------------------------------------------------------------------
# Qwen3 baselines
# --------------------------------------------------------------------------------------------------------------


def build_qwen3(name: str, smoke: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fields = {**QWEN3_COMMON, **QWEN3_SHAPES[name]}
    if smoke:
        fields.update(SMOKE_QWEN3)
    config = Qwen3Config(**fields, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device()):
        model = Qwen3ForCausalLM(config)
    return model.to(torch.bfloat16).eval()


@torch.no_grad()
def qwen3_graph_decode(model, prompt: torch.Tensor, new_tokens: int, use_cuda_graph: bool, warmup_steps: int):
    """Greedy decoding over transformers' StaticCache with one decode step captured and replayed: the cache
    position, position ids and a 4-D boolean mask (one more key visible per step) live on the device."""
    from transformers import StaticCache

    from megatron_flash.inference import graph_decode

    batch, prompt_length = prompt.shape
    max_length = -(-(prompt_length + new_tokens) // 64) * 64
    dev = prompt.device
    cache = StaticCache(config=model.config, max_cache_len=max_length)
    prefill_mask = torch.zeros(batch, 1, prompt_length, max_length, dtype=torch.bool, device=dev)
    prefill_mask[..., :prompt_length] = torch.ones(prompt_length, prompt_length, dtype=torch.bool, device=dev).tril()
    positions = torch.arange(prompt_length, device=dev)
    synchronize()
    t0 = time.perf_counter()
    logits = model(input_ids=prompt, past_key_values=cache, attention_mask=prefill_mask, cache_position=positions,
                   position_ids=positions.unsqueeze(0).expand(batch, -1), use_cache=True, logits_to_keep=1).logits
    tokens = logits[:, -1].argmax(-1, keepdim=True)
    synchronize()
    prefill_s = time.perf_counter() - t0
    mask = torch.zeros(batch, 1, 1, max_length, dtype=torch.bool, device=dev)
    mask[..., :prompt_length] = True
    cache_position = torch.full((1,), prompt_length, dtype=torch.long, device=dev)
    generated = torch.empty(batch, new_tokens, dtype=torch.long, device=dev)
    generated[:, :1] = tokens
    step_index = torch.ones(1, dtype=torch.long, device=dev)

    def step():
        mask.index_fill_(3, cache_position, True)
        logits = model(input_ids=tokens, past_key_values=cache, attention_mask=mask, cache_position=cache_position,
                       position_ids=cache_position.view(1, 1).expand(batch, 1), use_cache=True).logits[:, -1]
        next_tokens = logits.argmax(-1, keepdim=True)
        generated.index_copy_(1, step_index, next_tokens)
        step_index.add_(1)
        cache_position.add_(1)
        tokens.copy_(next_tokens)

    timing = graph_decode.run_steps(step, new_tokens - 1, dev, use_cuda_graph=use_cuda_graph,
                                    warmup_steps=warmup_steps)
    return generated, prefill_s, timing


@torch.no_grad()
def qwen3_section(name: str, args, rec: Recorder) -> dict:
    from transformers import GenerationConfig

    model = build_qwen3(name, args.smoke)
    out = {"shape": {**QWEN3_COMMON, **QWEN3_SHAPES[name]} if not args.smoke else "smoke",
           "parameters": sum(p.numel() for p in model.parameters()), "batch": 1,
           "prompt_tokens": args.prompt_tokens}
    prompt = random_prompt(1, args.prompt_tokens, model.config.vocab_size, seed=3)
    try:
        # (a) one captured decode step over StaticCache
        eager, _, _ = qwen3_graph_decode(model, prompt, args.check_tokens, False, args.warmup_steps)
        graphed, _, _ = qwen3_graph_decode(model, prompt, args.check_tokens, True, args.warmup_steps)
        reference = model.generate(prompt, do_sample=False, max_new_tokens=args.check_tokens,
                                   min_new_tokens=args.check_tokens, pad_token_id=0)[:, prompt.shape[1]:]
        check = {"graph_equals_eager": torch.equal(eager, graphed),
                 "leading_tokens_equal_to_generate": leading_agreement(eager, reference)}
        tokens, prefill_s, timing = qwen3_graph_decode(model, prompt, args.new_tokens, True, args.warmup_steps)
        out["graph"] = {"method": "one decode step over transformers StaticCache captured in a CUDA graph, replayed",
                        "new_tokens": args.new_tokens, "ms_per_token": timing.ms_per_step,
                        "generation_s": prefill_s + timing.total_s, "cuda_graph": timing.cuda_graph,
                        "graph_replays": timing.graph_steps, "check": check}
        rec.log(f"{name}: graph {out['graph']['ms_per_token']:.3f} ms/token")
        del tokens
    except Exception as exc:  # noqa: BLE001 - (b) below still runs
        out["graph"] = {"error": f"{type(exc).__name__}: {exc}"[:800], "traceback": traceback.format_exc()[-3000:]}
        rec.log(f"{name}: graph decode failed: {exc!r}")
    free_memory()

    # (b) plain generate() with a static cache
    config = GenerationConfig(do_sample=False, max_new_tokens=args.qwen_generate_tokens,
                              min_new_tokens=args.qwen_generate_tokens, cache_implementation="static",
                              pad_token_id=0, eos_token_id=model.config.eos_token_id,
                              disable_compile=not args.qwen_generate_compile)
    warm = GenerationConfig(**{**config.to_dict(), "max_new_tokens": 4, "min_new_tokens": 4})
    model.generate(prompt, generation_config=warm)  # lazy initialization (and compilation, when enabled)
    synchronize()
    t0 = time.perf_counter()
    generated = model.generate(prompt, generation_config=config)
    synchronize()
    seconds = time.perf_counter() - t0
    out["generate"] = {"method": "model.generate(cache_implementation='static'), transformers' auto-compile "
                                 + ("allowed" if args.qwen_generate_compile else "off (disable_compile=True)"),
                       "new_tokens": generated.shape[1] - prompt.shape[1], "seconds": seconds,
                       "ms_per_token": 1000.0 * seconds / (generated.shape[1] - prompt.shape[1])}
    out.update(memory_note())
    del model
    return out


# --------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------


def summary(results: dict) -> dict:
    def get(section, *keys):
        value = results.get(section)
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    out = {}
    for size in ("1b", "3b"):
        ms = get(f"decode_{size}", "ms_per_token")
        if ms is not None:
            out[f"nemotron_{size}"] = {
                "ms_per_token": ms, "seconds_for_tokens": get(f"decode_{size}", "generation_s"),
                "tokens": get(f"decode_{size}", "new_tokens"), **PAPER[size],
                "meets_target": ms <= PAPER[size]["target_ms_per_token"],
                "throughput_tokens_per_s": get(f"throughput_{size}", "tokens_per_s"),
                "throughput_batch": get(f"throughput_{size}", "batch")}
    for size in ("1b", "3b"):
        ms = get(f"compiled_{size}", "ms_per_token")
        if ms is not None:
            out[f"nemotron_{size}_compiled"] = {"ms_per_token": ms, **PAPER[size],
                                                "meets_target": ms <= PAPER[size]["target_ms_per_token"]}
    nemotron_ms = get("decode_1b", "ms_per_token")
    for method in ("graph", "generate"):
        qwen_ms = get("qwen3_0.6b", method, "ms_per_token")
        if nemotron_ms and qwen_ms:
            ratio = qwen_ms / nemotron_ms
            out[f"speedup_1b_vs_qwen3_0.6b_{method}"] = {"ratio": ratio, "target": SPEEDUP_TARGET,
                                                         "meets_target": ratio >= SPEEDUP_TARGET,
                                                         "qwen3_0.6b_ms_per_token": qwen_ms}
    for name in ("qwen3_0.6b", "qwen3_1.7b"):
        for method in ("graph", "generate"):
            if get(name, method, "ms_per_token") is not None:
                out[f"{name}_{method}_ms_per_token"] = get(name, method, "ms_per_token")
    return out


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help="comma-separated, from: " + ", ".join(
        ALL_SECTIONS) + " (compiled_* and profile_* are not in the default list)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="results folder (default $OUT)")
    p.add_argument("--smoke", action="store_true", help="everything on the CPU at toy sizes")
    p.add_argument("--new-tokens", type=int, default=8192, help="tokens generated at batch 1")
    p.add_argument("--prompt-tokens", type=int, default=32, help="the short prompt (batch 1)")
    p.add_argument("--check-tokens", type=int, default=32, help="tokens of the graph-vs-eager check")
    p.add_argument("--long-prompt", type=int, default=32768, help="prompt of the throughput section")
    p.add_argument("--throughput-tokens", type=int, default=64, help="tokens generated in the throughput section")
    p.add_argument("--batches", default="1024,768,512,384,256,192,128,96,64,48,32,16,8,4,2,1",
                   help="throughput batch sizes, tried from the first (largest) until one fits")
    p.add_argument("--warmup-steps", type=int, default=2, help="eager decode steps before the capture")
    p.add_argument("--profile-steps", type=int, default=64, help="decode steps profiled in profile_{1b,3b}")
    p.add_argument("--export-route", choices=("checkpoint", "direct"), default="checkpoint",
                   help="checkpoint: save a Megatron checkpoint and run export_to_hf on it; direct: convert the "
                        "in-memory model with the same mapping and writers (no checkpoint round trip)")
    p.add_argument("--qwen-generate-tokens", type=int, default=256, help="tokens of the Qwen3 generate() runs")
    p.add_argument("--qwen-generate-compile", action="store_true",
                   help="let generate() torch.compile the Qwen3 forward (transformers' default on CUDA; slow start)")
    p.add_argument("--fla-prefill", action="store_true",
                   help="prefill DeltaNet with fla's Triton kernels (autotuning costs ~50 s per new shape) instead "
                        "of the PyTorch chunked form; decode steps never use fla")
    p.add_argument("--tmp", default=None, help="folder for the temporary checkpoint and export (default: system)")
    p.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                   help="no measurement: merge these gpu_decode.json files (later ones win) and add the summary")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(ALL_SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(ALL_SECTIONS)}")
    args.batches = sorted({int(b) for b in args.batches.split(",")}, reverse=True)
    if args.smoke:
        args.new_tokens, args.prompt_tokens, args.check_tokens = 12, 9, 6
        args.long_prompt, args.throughput_tokens, args.qwen_generate_tokens = 40, 5, 4
        args.batches = [4, 2, 1]
        args.profile_steps = 3
    if args.new_tokens < 2 or args.check_tokens < 2 or args.throughput_tokens < 2:
        p.error("--new-tokens, --check-tokens and --throughput-tokens must be >= 2")
    return args


def merge_results(paths, out_dir: str) -> dict:
    """Sections of several runs' JSON files (later files win), with a fresh summary, written to out_dir."""
    merged = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for name, value in json.load(f).items():
                if name == "environment":
                    merged.setdefault("environments", []).append(value)
                elif name not in ("summary", "environments"):
                    merged[name] = value
    merged["summary"] = summary(merged)
    rec = Recorder(out_dir)
    for name, value in merged.items():
        rec.record(name, value)
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        merge_results(args.summarize, args.out)
        return 0
    if not args.fla_prefill:
        os.environ["NEMOTRON_FLASH_DISABLE_FLA"] = "1"
    # transformers copies remote code (trust_remote_code) into HF_MODULES_CACHE: keep it out of the user's cache.
    modules_dir = None
    if "HF_MODULES_CACHE" not in os.environ:
        modules_dir = os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="gpu_decode_hf_modules_")
    try:
        return run(args)
    finally:
        if modules_dir is not None:
            shutil.rmtree(modules_dir, ignore_errors=True)


def run(args) -> int:
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    import transformers

    rec = Recorder(args.out)
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke,
           "argv": sys.argv[1:], "sections": args.sections,
           "fla_prefill": args.fla_prefill}
    rec.record("environment", env)

    models = {}
    for section in args.sections:
        if section == "summary":
            continue
        rec.log(f"-- {section}")
        t0 = time.perf_counter()
        try:
            if section.startswith("export_"):
                size = section.split("_")[1]
                models.pop(size, None)
                free_memory()
                models[size], value = export_and_load(size, args, rec)
            elif section.startswith(("decode_", "throughput_", "compiled_", "profile_")):
                kind, size = section.split("_")
                if size not in models:
                    raise RuntimeError(f"no {size} model: run export_{size} in the same call (it failed or was "
                                       "not selected)")
                run = {"decode": nemotron_decode, "throughput": nemotron_throughput, "compiled": nemotron_compiled,
                       "profile": nemotron_profile}
                value = run[kind](models[size], size, args, rec)
            else:
                value = qwen3_section(section, args, rec)
            value["seconds"] = time.perf_counter() - t0
            value["ok"] = True
        except Exception as exc:  # noqa: BLE001 - one failure keeps the other sections
            value = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:800],
                     "traceback": traceback.format_exc()[-4000:], "seconds": time.perf_counter() - t0}
            rec.log(f"{section} FAILED: {exc!r}")
        rec.record(section, value)
        # A size's model stays loaded for its decode and throughput sections only.
        for size in list(models):
            if not any(s.endswith("_" + size) for s in args.sections[args.sections.index(section) + 1:]):
                del models[size]
        free_memory()
    if "summary" in args.sections:
        rec.record("summary", summary(rec.results))
    rec.log(f"done in {time.perf_counter() - rec.start:.0f} s; results in {rec.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
