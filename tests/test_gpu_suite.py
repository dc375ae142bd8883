"""benchmarks/gpu_suite.py: its smoke run on CPU trains the tiny preset in a training section, and --train-args
reaches the trainer (recorded in the JSON, and visible in the FLOP count, which depends on the SSD chunk)."""

import json
import os
import subprocess
import sys

from tests.tool_loading import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_suite.py")


def _train_section(out_dir, *extra):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    run = subprocess.run([sys.executable, SCRIPT, "--smoke", "--sections", "train_1b_mbs4", "--ssd-backend", "torch",
                          "--out", str(out_dir), *extra], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    section = json.loads((out_dir / "gpu_suite.json").read_text())["train_1b_mbs4"]
    assert "error" not in section, section
    return section


def test_smoke_training_section_passes_train_args_to_the_trainer(tmp_path):
    default = _train_section(tmp_path / "default")
    chunked = _train_section(tmp_path / "chunked", "--train-args", "--mamba-chunk-size 8")
    assert default["train_args"] == "" and chunked["train_args"] == "--mamba-chunk-size 8"
    assert default["ssd_backend"] == chunked["ssd_backend"] == "torch"
    assert default["iteration"] == chunked["iteration"] == 8 and chunked["tokens_per_s"] > 0
    # the SSD's intra-chunk FLOPs grow with the chunk: 8 (the flag) counts fewer than the tiny preset's 16
    assert chunked["flops_per_token"] < default["flops_per_token"]
