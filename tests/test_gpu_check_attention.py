"""benchmarks/gpu_check_attention.py: its smoke run on CPU passes every check, and its comparison catches the mask
errors its bounds are meant to catch (a window edge or a document boundary off by one) at the GPU run's shape."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_flash.layers.attention import SDPAttention
from tests.tool_loading import REPO, load_script

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check_attention.py")
CPU = torch.device("cpu")
check = load_script("benchmarks", "gpu_check_attention")


def test_smoke_run_passes_every_check(tmp_path):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OUT": str(tmp_path)}
    run = subprocess.run([sys.executable, SCRIPT, "--smoke"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all attention checks passed" in run.stdout
    report = json.loads((tmp_path / "attention_gpu.json").read_text())
    assert report["ok"] and report["smoke"]
    rows = report["rows"]
    assert all(r["ok"] for r in rows)
    assert {(r["check"], r["path"]) for r in rows} == {
        (f"{kind} {case}", path) for kind in check.CHECKS for case in check.CASES for path in ("bf16", "fp32")}
    for case in check.CASES:
        core = {r["tensor"] for r in rows if r["check"] == f"core {case}"}
        layer = {r["tensor"] for r in rows if r["check"] == f"layer {case}"}
        assert core == {"out", "dq", "dk", "dv"}
        assert layer == {"output", "d_input", "d_linear_qkv.weight", "d_linear_proj.weight"}
    assert all(r["backend"] not in ("none", "error") for r in rows)  # every row ran through SDPA once


def test_window_edge_off_by_one_fails_at_full_shape():
    """SDPAttention built with window 256 against the 257 of the case: every row, bf16 ones included, fails."""
    params = check.FULL
    core = SDPAttention(check.attention_config("window", params, torch.float32, CPU, window=params["window"] - 1),
                        layer_number=1)
    rows = check.core_accuracy("window", params, CPU, core=core)
    assert len(rows) == 8 and not any(r["ok"] for r in rows), rows


class ShiftedBoundary(SDPAttention):
    """A core attention that moves the first token of the third document into the second."""

    def forward(self, query, key, value, attention_mask_=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if query.dim() == 3:  # the packed call (SDPAttention re-enters forward once with a batch dimension)
            cu = packed_seq_params.cu_seqlens_q.clone()
            cu[2] += 1
            packed_seq_params = dataclasses.replace(packed_seq_params, cu_seqlens_q=cu, cu_seqlens_kv=cu)
        return super().forward(query, key, value, attention_mask_, packed_seq_params=packed_seq_params)


def test_document_boundary_off_by_one_fails_at_full_shape():
    params = check.FULL
    core = ShiftedBoundary(check.attention_config("packed", params, torch.float32, CPU), layer_number=1)
    rows = check.core_accuracy("packed", params, CPU, core=core)
    assert len(rows) == 8 and not any(r["ok"] for r in rows), rows


@pytest.mark.parametrize("argv", [["--cases", "full,sliding"], ["--checks", ""]])
def test_bad_names_stop_before_any_work(argv):
    with pytest.raises(SystemExit, match="--cases|--checks"):
        check.main(["--smoke", *argv])
