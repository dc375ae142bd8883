"""benchmarks/gpu_gated_rms_norm.py: its CPU smoke run times the eager reference on the layer's input layouts and
writes its JSON; bf16 against the fp32 reference, so the differences are bf16 rounding, small but not zero."""

import json

from tests.tool_loading import load_script


def test_smoke_run_times_the_reference_and_writes_json(tmp_path):
    bench = load_script("benchmarks", "gpu_gated_rms_norm")
    results = bench.main(["--smoke", "--out", str(tmp_path)])
    row = results["variants"]["reference"]
    assert row["fwd_bwd_ms"] > 0
    for key in ("out", "dy", "dprojection", "dweight"):
        assert 0 < row[f"rel_diff_{key}"] < 1e-2, key
    assert json.loads((tmp_path / "gated_rms_norm.json").read_text()) == results
