"""benchmarks/gpu_output_layer.py: its CPU smoke run times the op, checks the padding rows, and compares against a
baseline file; a baseline that differs (a softmax without the padding mask) shows up in the differences."""

import os

from tests.tool_loading import REPO, load_script

OP = os.path.join(REPO, "megatron_flash", "ops", "linear_cross_entropy.py")


def test_smoke_run_against_itself_and_a_wrong_baseline(tmp_path):
    bench = load_script("benchmarks", "gpu_output_layer")
    same = bench.main(["--smoke", "--out", str(tmp_path), "--baseline", OP])
    for key in ("vocab_200_rows_200", "vocab_201_rows_256"):
        row = same[key]
        assert row["fwd_bwd_ms"] > 0 and row["baseline_fwd_bwd_ms"] > 0 and row["padding_rows_grad_zero"]
        assert row["rel_diff_loss"] == row["rel_diff_dhidden"] == row["rel_diff_dweight"] == 0.0
        assert row["recompute_fwd_bwd_ms"] > 0 and row["recompute_rel_diff_loss"] == 0.0  # the same forward
        assert row["recompute_rel_diff_dhidden"] < 1e-2 and row["recompute_rel_diff_dweight"] < 1e-2  # bf16
    assert (tmp_path / "output_layer.json").exists()
    wrong = tmp_path / "unmasked.py"  # the softmax also over the padding rows: only the padded case differs
    wrong.write_text(
        "import torch.nn.functional as F\n"
        "def linear_cross_entropy(hidden, weight, labels, vocab_size):\n"
        "    return F.cross_entropy((hidden @ weight.t()).float(), labels, reduction='none')\n")
    other = bench.main(["--smoke", "--out", str(tmp_path), "--baseline", str(wrong)])
    assert other["vocab_200_rows_200"]["rel_diff_loss"] < 1e-2
    assert other["vocab_201_rows_256"]["rel_diff_loss"] > 1e-3
