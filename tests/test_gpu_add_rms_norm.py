"""benchmarks/gpu_add_rms_norm.py: its CPU smoke run times both variants (eager there) and writes its JSON; bf16
against the fp32 definition, so the differences are bf16 rounding, small but not zero, and the two variants agree."""

import json

from tests.tool_loading import load_script


def test_smoke_run_times_both_variants_and_writes_json(tmp_path):
    bench = load_script("benchmarks", "gpu_add_rms_norm")
    results = bench.main(["--smoke", "--out", str(tmp_path)])
    assert set(results["variants"]) == {"separate", "fused"}
    for name, row in results["variants"].items():
        assert row["fwd_bwd_ms"] > 0
        assert row["rel_diff_sum"] == 0, name  # the same bf16 add in both
        for key in ("normed", "dx", "ddelta"):
            assert 0 < row[f"rel_diff_{key}"] < 1e-2, (name, key)
        assert row["rel_diff_dweight"] < 1e-2, name  # reduced in fp32 by all three: often exactly equal
    assert json.loads((tmp_path / "add_rms_norm.json").read_text()) == results
