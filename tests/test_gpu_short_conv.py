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
    conv = bench.short_conv_triton
    fwd_warps, bwd_warps = conv.FWD_TILE[2], conv.BWD_TILE[2]
    assert bench.parse_tiles("64x128:32x64x8,16x256x2:16x256,64x64:64x128:16x128x4x32") == [
        ((64, 128, fwd_warps), (32, 64, 8), conv.DX_TILE), ((16, 256, 2), (16, 256, bwd_warps), conv.DX_TILE),
        ((64, 64, fwd_warps), (64, 128, bwd_warps), (16, 128, 4, 32))]
    assert bench.parse_tiles("") == []
    with pytest.raises(ValueError, match="expected forward:backward"):
        bench.parse_tiles("64x128")
    with pytest.raises(ValueError, match="'64' is not tokens x channels"):
        bench.parse_tiles("64:64x64")
    with pytest.raises(ValueError, match="'16x128x4' is not tokens x channels x warps x steps"):
        bench.parse_tiles("64x64:64x128:16x128x4")
