"""benchmarks/gpu_suite.py: its smoke run on CPU trains the tiny preset in a training section, and --train-args
(even a single flag, which starts with "--") reaches the trainer (recorded in the JSON, and visible in the FLOP
count, which depends on the SSD chunk); --accumulate reaches the trainer's global batch and the GPT baseline's
step, and a section's _accM suffix its own; --variants runs a training section once per flag set, round-robin, in
one process; a section run again is recorded beside the first."""

import json
import os
import subprocess
import sys

import pytest

from tests.tool_loading import REPO, load_script

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_suite.py")


def _sections(out_dir, names, *extra):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    run = subprocess.run([sys.executable, SCRIPT, "--smoke", "--sections", ",".join(names), "--ssd-backend", "torch",
                          "--out", str(out_dir), *extra], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out_dir / "gpu_suite.json").read_text())
    for name in names:
        assert "error" not in results[name], results[name]
    return [results[name] for name in names]


def _train_section(out_dir, *extra):
    return _sections(out_dir, ["train_1b_mbs4"], *extra)[0]


def test_smoke_training_section_passes_train_args_to_the_trainer(tmp_path):
    default = _train_section(tmp_path / "default")
    # one flag without a space: the forwarding to the section's process must keep it a value, not a flag
    chunked = _train_section(tmp_path / "chunked", "--train-args=--mamba-chunk-size=8")
    assert default["train_args"] == "" and chunked["train_args"] == "--mamba-chunk-size=8"
    assert default["ssd_backend"] == chunked["ssd_backend"] == "torch"
    assert default["iteration"] == chunked["iteration"] == 8 and chunked["tokens_per_s"] > 0
    # the SSD's intra-chunk FLOPs grow with the chunk: 8 (the flag) counts fewer than the tiny preset's 16
    assert chunked["flops_per_token"] < default["flops_per_token"]


def test_smoke_variants_run_round_robin_in_one_process(tmp_path):
    section = _train_section(tmp_path, "--variants", ";--mamba-chunk-size=8", "--rounds", "2")
    runs = section["runs"]
    assert [(r["round"], r["variant"]) for r in runs] == [(0, ""), (0, "--mamba-chunk-size=8"),
                                                          (1, ""), (1, "--mamba-chunk-size=8")]
    # each run got its own flags: the chunk of 8 counts fewer SSD FLOPs than the tiny preset's 16
    assert runs[0]["flops_per_token"] == runs[2]["flops_per_token"] > runs[1]["flops_per_token"]
    assert [r["train_args"] for r in runs[:2]] == ["", "--mamba-chunk-size=8"]
    default_tps = sorted(r["tokens_per_s"] for r in runs if r["variant"] == "")
    assert section["median_tokens_per_s"][""] == pytest.approx(sum(default_tps) / 2)
    assert section["ratio_to_first"][""] == 1.0
    assert section["ratio_to_first"]["--mamba-chunk-size=8"] == pytest.approx(
        section["median_tokens_per_s"]["--mamba-chunk-size=8"] / section["median_tokens_per_s"][""])


def test_smoke_accumulate_reaches_the_trainer_and_the_baseline(tmp_path):
    train, gpt = _sections(tmp_path, ["train_1b_mbs4", "gpt_mbs2"], "--accumulate", "3")
    assert train["accumulate"] == gpt["accumulate"] == 3
    # the trainer's figure is over the 4th iteration's global batch of 4 x 3 sequences of 64 tokens
    assert train["iteration"] == 4
    assert train["tokens_per_s"] == pytest.approx(4 * 3 * 64 / (train["ms_per_iter"] / 1000), rel=1e-6)
    assert gpt["tokens_per_s"] == pytest.approx(2 * 3 * 64 / (gpt["ms_per_iter"] / 1000), rel=1e-6)


def test_section_suffix_sets_its_own_accumulation(tmp_path):
    train, gpt = _sections(tmp_path, ["train_1b_mbs4_acc3", "gpt_mbs2"], "--accumulate", "2")
    assert train["accumulate"] == 3 and train["micro_batch"] == 4 and gpt["accumulate"] == 2
    suite = load_script("benchmarks", "gpu_suite")
    assert suite.split_accumulate("fla_sized_mbs8_acc16", 1) == ("fla_sized_mbs8", 16)
    assert suite.split_accumulate("fla_sized_mbs8", 4) == ("fla_sized_mbs8", 4)


def test_sized_fla_baseline_is_the_widest_ffn_within_the_1b_parameter_count():
    pytest.importorskip("fla")
    import torch
    from fla.models import DeltaNetForCausalLM

    from megatron_flash.presets import RELEASED_PARAMETER_COUNTS

    suite = load_script("benchmarks", "gpu_suite")

    def count(config):
        with torch.device("meta"):
            return sum(p.numel() for p in DeltaNetForCausalLM(config).parameters())

    shaped, sized = suite.fla_config(sized=False), suite.fla_config(sized=True)
    assert shaped.intermediate_size == 6144 and sized.intermediate_size % 256 == 0
    target = RELEASED_PARAMETER_COUNTS["nemotron_flash_1b"]
    assert count(shaped) < count(sized) <= target
    sized.intermediate_size += 256  # one step wider passes the 1B's count
    assert count(sized) > target


def test_a_section_run_again_is_recorded_beside_the_first(tmp_path):
    suite = load_script("benchmarks", "gpu_suite")
    args = suite.argparse.Namespace(out=str(tmp_path))
    results = {}
    for tokens_per_s in (1.0, 2.0, 3.0):
        suite.record(args, results, "train_1b_mbs16_acc8", {"tokens_per_s": tokens_per_s})
    suite.record(args, results, "fla_sized_mbs8_acc16", {"tokens_per_s": 4.0})
    written = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert written == results == {"train_1b_mbs16_acc8": {"tokens_per_s": 1.0},
                                  "train_1b_mbs16_acc8#2": {"tokens_per_s": 2.0},
                                  "train_1b_mbs16_acc8#3": {"tokens_per_s": 3.0},
                                  "fla_sized_mbs8_acc16": {"tokens_per_s": 4.0}}


def test_smoke_layers_section_at_another_batch_and_length(tmp_path):
    """``layers_b1_s5``: every layer type timed at batch 1 and 5 tokens (the meta prefix's shape, scaled down),
    Mamba2 with --ssd-backend's scan alone."""
    (rows,) = _sections(tmp_path, ["layers_b1_s5"])
    assert [r["layer"].split()[0] for r in rows] == ["FFN", "attention", "DeltaNet", "Mamba2"]
    assert rows[-1]["backend"] == "torch"
    assert all(r["tokens"] == 5 and r["fwd_bwd_ms"] > 0 for r in rows)
