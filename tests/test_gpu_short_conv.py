"""benchmarks/gpu_short_conv.py: its CPU smoke run times the torch backend on the layers' input layouts and writes
its JSON; the comparison runs against the torch backend's own result (zero differences)."""

import json

from tests.tool_loading import load_script


def test_smoke_run_times_every_case_and_writes_json(tmp_path):
    bench = load_script("benchmarks", "gpu_short_conv")
    results = bench.main(["--smoke", "--out", str(tmp_path)])
    assert set(results["cases"]) == set(bench.SMOKE["cases"])
    for rows in results["cases"].values():
        row = rows["torch"]
        assert row["fwd_bwd_ms"] > 0
        assert row["rel_diff_y"] == row["rel_diff_dx"] == row["rel_diff_dweight"] == row["rel_diff_dbias"] == 0.0
    assert json.loads((tmp_path / "short_conv.json").read_text()) == results
