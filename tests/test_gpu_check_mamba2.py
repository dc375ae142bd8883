"""benchmarks/gpu_check_mamba2.py: its smoke run on CPU reports every backend's accuracy against the sequential
reference (fp32 at rounding level, bf16 within bf16 error) and times the scan and the layer; a wrong scan shows up
in its rows."""

import json
import os
import subprocess
import sys

import torch

from tests.tool_loading import REPO, load_script

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check_mamba2.py")
ERRORS = ("y", "dx", "ddt", "dA", "dBm", "dCm", "dD")


def test_smoke_run_reports_accuracy_and_timing(tmp_path):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OUT": str(tmp_path)}
    run = subprocess.run([sys.executable, SCRIPT, "--smoke"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "mamba2_gpu.json").read_text())
    assert report["timed_chunk_sizes"] == [16]  # the smoke layer's chunk, which every timing row ran at
    rows = {(r["backend"], r["inputs"]): r for r in report["accuracy"]}
    assert max(rows[("torch", "fp32")][e] for e in ERRORS) < 1e-5
    for key in (("torch", "bf16"), ("torch_compile", "bf16"), ("torch_compile", "bf16, 3 packed documents")):
        assert max(rows[key][e] for e in ERRORS) < 2e-2, rows[key]
    assert "need CUDA" in rows[("fla", "bf16")]["note"]  # no CUDA here
    assert "need CUDA" in rows[("mamba_ssm", "bf16")]["note"]
    assert {(r["what"], r["backend"], r["mode"]) for r in report["timing"] if "ms" in r} == {
        (what, backend, mode) for what in ("ssd_scan", "Mamba2Mixer") for backend in ("torch", "torch_compile")
        for mode in ("fwd+bwd", "fwd")}


def test_accuracy_rows_catch_a_wrong_scan():
    """A scan that decays its state twice as fast is far outside the bf16 bound; the right one is at rounding."""
    check = load_script("benchmarks", "gpu_check_mamba2")
    from megatron_flash.ops.ssd import ssd_reference

    inputs = check.scan_inputs(1, 40, 2, 8, 8, torch.device("cpu"))
    dy = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(1))
    reference = check.run_scan(ssd_reference, inputs, dy, backward=True)

    def decays_twice(x, dt, A, Bm, Cm, D, initial_state):
        return ssd_reference(x, dt, 2 * A, Bm, Cm, D, initial_state=initial_state)

    row = check.accuracy_row({}, decays_twice, inputs, dy, reference, backward=True)
    assert row["y"] > 1e-2 and "note" not in row
    right = check.accuracy_row({}, lambda *a, initial_state: ssd_reference(*a, initial_state=initial_state),
                               inputs, dy, reference, backward=True)
    assert max(right[e] for e in ERRORS) < 1e-6
