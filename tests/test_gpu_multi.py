"""benchmarks/gpu_multi.py: its comparisons and report on made-up results, its flags, and its smoke run (every launch,
layout and checkpoint reshard of the GPU run, over gloo at toy sizes)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_multi.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("gpu_multi", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

TINY = [6.70, 6.69, 6.33, 6.10, 5.90, 5.75]  # the 1-GPU tiny losses of the made-up run
ONE_B = [11.9, 11.2, 10.1, 9.0, 8.2, 7.6]


def _part(losses, gpus=1, checks=3, tokens_per_s=None, peak_gib=None, norm_error=3e-7, mismatches=0, matrices=18):
    part = {"losses": list(losses), "layout": {"gpus": gpus},
            "checks": [{"worst_norm_error": norm_error, "bf16_mismatches": mismatches,
                        "checked_matrices_per_rank": [matrices] * gpus}] * checks}
    if tokens_per_s is not None:
        part["throughput"] = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / gpus,
                              "ms_per_iter": 1000.0, "mfu": 0.3, "peak_gib": peak_gib}
    return part


def _passing_results() -> dict:
    """Every part finished, every check within its bound: DP=2 at 95% efficiency, sequence parallelism saving 4 GiB."""
    near = [x * (1 + 1e-3) for x in TINY]
    parts = {
        "tiny/1gpu": _part(TINY, checks=6),
        "tiny/tp2": _part(near, 2, checks=6), "tiny/pp2": _part(near, 2, checks=6),
        "tiny/dp2": _part(near, 2, checks=6), "tiny/tp2_sp": _part(near, 2, checks=6),
        "ckpt/tp2_save": _part(near[:3], 2), "ckpt/pp2_resume": _part(near[3:], 2),
        "ckpt/1gpu_resume": _part(near[3:], 1),
        "1b/1gpu": _part(ONE_B, tokens_per_s=100_000.0, peak_gib=40.0),
        "1b/dp2": _part(ONE_B, 2, tokens_per_s=190_000.0, peak_gib=38.0),
        "1b/tp2": _part(ONE_B, 2, tokens_per_s=150_000.0, peak_gib=30.0),
        "1b/pp2": _part(ONE_B, 2, tokens_per_s=160_000.0, peak_gib=28.0),
        "1b/tp2_sp": _part(ONE_B, 2, tokens_per_s=148_000.0, peak_gib=26.0),
    }
    return {"meta": {"thresholds": {"loss_rtol": 0.02, "norm_tol": 1e-5, "dp_efficiency_target": 0.9}},
            "parts": parts}


def test_compare_losses():
    assert bench.compare_losses([1.0, 2.0], [1.0, 2.02], 0.02)["ok"]
    result = bench.compare_losses([1.0, 2.1], [1.0, 2.0], 0.02)
    assert not result["ok"] and result["max_rel_diff"] == pytest.approx(0.05)
    assert not bench.compare_losses([1.0], [1.0, 2.0], 0.02)["ok"]  # a missing step is a failure
    assert not bench.compare_losses([], [], 0.02)["ok"]
    assert not bench.compare_losses([1.0, math.nan], [1.0, 2.0], 0.02)["ok"]


def test_summary_of_a_passing_run():
    summary = bench.summarize(_passing_results())
    assert summary["done_when"] == {
        "layouts_track_1gpu_losses": True, "weight_norm_invariants_hold": True,
        "tp2_checkpoint_resumes_at_pp2_and_1gpu": True, "sequence_parallel_same_loss": True,
        "dp2_scaling_efficiency_at_target": True}
    assert summary["dp_scaling"]["efficiency"] == pytest.approx(0.95)
    sp = summary["sequence_parallel"]["1b"]
    assert sp["saved_gib"] == pytest.approx(4.0) and sp["saved_fraction"] == pytest.approx(4 / 30)
    # the 1B layouts are compared over the checked steps; all steps are reported besides
    assert summary["layouts"]["1b/tp2"]["steps"] == 3
    assert summary["not_run"] == []
    report = bench.format_report({**_passing_results(), "summary": summary})
    assert "DP=2 scaling efficiency (1b): 95.0% (target 90%)" in report
    assert "saves 4.00 GiB" in report and "NO" not in report and "!" not in report


def test_a_diverging_layout_fails_and_is_flagged():
    results = _passing_results()
    results["parts"]["1b/pp2"]["losses"][1] *= 1.05  # step 2 of the checked steps is 5% off
    summary = bench.summarize(results)
    assert not summary["layouts"]["1b/pp2"]["ok"] and summary["layouts"]["1b/tp2"]["ok"]
    assert summary["done_when"]["layouts_track_1gpu_losses"] is False
    line = next(x for x in bench.format_report(results).splitlines() if x.startswith("1b/pp2"))
    assert "5.0e-02!" in line
    assert "layouts_track_1gpu_losses: NO" in bench.format_report(results)


@pytest.mark.parametrize("fault", [dict(norm_error=1e-3), dict(mismatches=1), dict(matrices=0)],
                         ids=["norm", "bf16-rounding", "nothing-checked"])
def test_broken_or_vacuous_invariants_fail(fault):
    results = _passing_results()
    results["parts"]["tiny/dp2"] = _part(results["parts"]["tiny/dp2"]["losses"], 2, checks=6, **fault)
    summary = bench.summarize(results)
    assert not summary["weight_norm"]["tiny/dp2"]["ok"]
    assert summary["done_when"]["weight_norm_invariants_hold"] is False


def test_resumed_losses_are_compared_with_the_steps_they_continue():
    results = _passing_results()
    tp2 = results["parts"]["tiny/tp2"]["losses"]
    results["parts"]["ckpt/1gpu_resume"]["losses"] = tp2[:3]  # a resume that restarted from step 1
    summary = bench.summarize(results)
    assert summary["checkpoint"]["ckpt/pp2_resume"]["ok"] and not summary["checkpoint"]["ckpt/1gpu_resume"]["ok"]
    assert summary["done_when"]["tp2_checkpoint_resumes_at_pp2_and_1gpu"] is False


def test_dp_scaling_below_target():
    results = _passing_results()
    results["parts"]["1b/dp2"]["throughput"].update(tokens_per_s=170_000.0, tokens_per_s_per_gpu=85_000.0)
    summary = bench.summarize(results)
    assert summary["dp_scaling"]["efficiency"] == pytest.approx(0.85)
    assert summary["done_when"]["dp2_scaling_efficiency_at_target"] is False


def test_missing_parts_read_not_known():
    results = _passing_results()
    del results["parts"]["1b/1gpu"]
    results["parts"]["ckpt/1gpu_resume"] = {"skipped": "--time-budget 360 s spent"}
    summary = bench.summarize(results)
    assert summary["layouts"]["1b/dp2"] is None and summary["dp_scaling"] is None
    assert summary["done_when"]["layouts_track_1gpu_losses"] is None
    assert summary["done_when"]["tp2_checkpoint_resumes_at_pp2_and_1gpu"] is None
    assert summary["done_when"]["sequence_parallel_same_loss"] is True  # needs no 1-GPU run
    assert summary["not_run"] == ["1b/1gpu", "ckpt/1gpu_resume"]
    results["parts"]["1b/tp2"] = {"error": "rank 1 failed:\nTraceback ...\ntorch.OutOfMemoryError: CUDA out of memory\n",
                                  "launch": "multi"}
    report = bench.format_report(results)
    assert "ckpt/1gpu_resume   --time-budget 360 s spent" in report
    assert "1b/tp2             failed: torch.OutOfMemoryError: CUDA out of memory" in report
    assert "layouts_track_1gpu_losses: not known (parts missing)" in report
    # a failure elsewhere still reads as a failure while parts are missing
    results["parts"]["tiny/pp2"]["losses"][0] += 1.0
    assert bench.summarize(results)["done_when"]["layouts_track_1gpu_losses"] is False


def test_results_file_is_updated_in_place_with_its_summary(tmp_path):
    recorder = bench.Recorder(str(tmp_path))
    results = _passing_results()
    recorder.update(("meta",), results["meta"])
    for name, part in results["parts"].items():
        recorder.update(("parts", name), part)
    recorder.update(("parts", "1b/tp2"), {"skipped": "--time-budget 360 s spent"})
    saved = json.loads((tmp_path / bench.RESULTS_FILE).read_text())
    assert saved["parts"]["1b/pp2"] == results["parts"]["1b/pp2"]
    assert saved["summary"]["not_run"] == ["1b/tp2"]
    assert saved["summary"]["sequence_parallel"]["1b"] is None


def test_flags():
    opts = bench.parse_args(["--smoke", "--timed-iters", "3"])
    assert (opts.preset, opts.seq_length, opts.timed_iters) == ("tiny", 64, 3)  # smoke defaults, flags win
    assert bench.parse_args([]).parts == [p.name for p in bench.PARTS]
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "1b/tp4"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--check-iters", "5", "--warmup-iters", "4"])  # checks would fall in the timed steps


def test_bad_part_flags_stop_before_any_launch(tmp_path, capsys):
    assert bench.main(["--smoke", "--out", str(tmp_path), "--parts", "1b/tp2", "--pattern", "DFMFQ"]) == 2
    assert "part 1b/tp2: --pattern: invalid layer 'Q'" in capsys.readouterr().err
    assert not (tmp_path / bench.RESULTS_FILE).exists()


def test_part_flags_give_every_layout_the_same_batches(tmp_path):
    from megatron_flash.training import arguments

    opts = bench.parse_args([])
    for part in bench.PARTS:
        args = arguments.parse_args(bench.part_argv(part, opts, str(tmp_path)), world_size=part.gpus)
        assert args.global_batch_size == (16 if part.model == "1b" else 4), part.name
        assert args.data_parallel_size * args.tensor_model_parallel_size * args.pipeline_model_parallel_size \
            == part.gpus, part.name
        assert (args.sequence_parallel, args.use_distributed_optimizer) == (part.sequence_parallel,
                                                                            part.distributed_optimizer), part.name
        assert (args.save, args.load) == {"save": (str(tmp_path), None), "load": (None, str(tmp_path)),
                                          "": (None, None)}[part.checkpoint], part.name


def test_smoke_run_passes_every_check(tmp_path):
    """The whole script over gloo: 1-process references, the 2-process layouts switched in place, the TP=2
    checkpoint resumed at PP=2 and in one process. (DP scaling on 2 CPU cores means nothing: not asserted.)"""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    run = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / bench.RESULTS_FILE).read_text())
    summary = results["summary"]
    assert summary["not_run"] == [] and results["launch_errors"] == {}, run.stdout[-3000:]
    done = dict(summary["done_when"])
    del done["dp2_scaling_efficiency_at_target"]
    assert all(done.values()), json.dumps(summary, indent=1)
    assert results["parts"]["ckpt/pp2_resume"]["first_iteration"] == bench.CHECKPOINT_AT + 1
    assert results["parts"]["1b/pp2"]["layout"] == {"gpus": 2, "tp": 1, "pp": 2, "dp": 1,
                                                    "sequence_parallel": False, "distributed_optimizer": False}
    assert summary["throughput"]["1b/tp2"]["tokens_per_s"] > 0
    assert "layouts_track_1gpu_losses: yes" in run.stdout


def test_a_failing_part_costs_only_itself(tmp_path):
    """The second of three 2-process parts raises on both ranks: its launch ends, the third part runs in a new
    launch, and the report names the failure."""
    driver = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_multi; from tests import gpu_multi_fault; "
              "gpu_multi.worker = gpu_multi_fault.worker; sys.exit(gpu_multi.main(sys.argv[1:]))")
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "GPU_MULTI_FAIL_PART": "tiny/pp2"}
    run = subprocess.run([sys.executable, "-c", driver, "--smoke", "--out", str(tmp_path),
                          "--parts", "tiny/1gpu,tiny/tp2,tiny/pp2,tiny/dp2"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / bench.RESULTS_FILE).read_text())
    parts = results["parts"]
    assert "injected failure in tiny/pp2" in parts["tiny/pp2"]["error"]
    for name in ("tiny/1gpu", "tiny/tp2", "tiny/dp2"):
        assert len(parts[name]["losses"]) == bench.TINY_ITERS, name
    assert list(results["launch_errors"]) == ["multi"]
    assert results["summary"]["not_run"] == [p.name for p in bench.PARTS if p.name not in
                                             ("tiny/1gpu", "tiny/tp2", "tiny/dp2")]
    assert results["summary"]["layouts"]["tiny/dp2"]["ok"]
    assert "tiny/pp2           failed: RuntimeError: injected failure in tiny/pp2" in run.stdout
    assert run.stdout.count("[gpu_multi] multi: 2 process(es)") == 2
