"""benchmarks/gpu_short_conv.py: its CPU smoke run times the torch backend on the layers' input layouts and writes
its JSON; the comparison runs against the torch backend's own result (zero differences)."""

import json

import pytest

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


def test_tiles_take_optional_warps():
    bench = load_script("benchmarks", "gpu_short_conv")
    fwd_warps, bwd_warps = bench.short_conv_triton.FWD_TILE[2], bench.short_conv_triton.BWD_TILE[2]
    assert bench.parse_tiles("64x128:32x64x8,16x256x2:16x256") == [
        ((64, 128, fwd_warps), (32, 64, 8)), ((16, 256, 2), (16, 256, bwd_warps))]
    assert bench.parse_tiles("") == []
    with pytest.raises(ValueError, match="expected forward:backward"):
        bench.parse_tiles("64x128")
    with pytest.raises(ValueError, match="'64' is not tokens x channels"):
        bench.parse_tiles("64:64x64")


def test_a_failing_tile_records_its_error_and_the_other_rows_still_run(tmp_path):
    """On the CPU the triton backend cannot launch: its rows hold the error, the torch rows are timed."""
    bench = load_script("benchmarks", "gpu_short_conv")
    results = bench.main(["--smoke", "--tiles", "64x64:64x128", "--out", str(tmp_path)])
    for rows in results["cases"].values():
        assert rows["torch"]["fwd_bwd_ms"] > 0
        assert rows["triton_64x64x4_64x128x4"]["error"]
