"""experiments/paper_findings.py: variants and parameter matching, the trainer-log parser, the verdicts on synthetic
curves, the report, and the whole study end to end on CPU (--smoke: real corpus, tokenizer, indexed data, the real
trainer for every variant)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import paper_findings as pf
from megatron_flash import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- variants and matched sizes ---------------------------------------------------------------------------------


def test_variant_patterns_rewrite_only_the_mixers():
    nf = presets.NEMOTRON_FLASH_1B_PATTERN.replace(" ", "")
    attention = pf.VARIANTS["attention_only"].pattern(nf)
    hybrid = pf.VARIANTS["deltanet_mamba2"].pattern(nf)
    assert pf.VARIANTS["nf_wn"].pattern(nf) == pf.VARIANTS["nf_no_wn"].pattern(nf) == nf
    assert set(attention) == {"A", "F"} and "A" not in hybrid and {"D", "M"} <= set(hybrid)
    for pattern in (attention, hybrid):  # same depth, FFNs in the same places
        assert len(pattern) == len(nf)
        assert [i for i, c in enumerate(pattern) if c == "F"] == [i for i, c in enumerate(nf) if c == "F"]
    # where nf has attention the hybrid has DeltaNet; elsewhere it is unchanged
    assert all(h == ("D" if c == "A" else c) for c, h in zip(nf, hybrid))
    assert not pf.VARIANTS["nf_wn"].mixer_map and pf.VARIANTS["nf_wn"].weight_norm
    assert not pf.VARIANTS["nf_no_wn"].weight_norm


def test_plan_matches_parameter_counts_with_the_ffn_width():
    from megatron_flash.design.space import WidthRule

    plans = pf.plan_models(list(pf.VARIANTS), "tiny", 64, None, 512, None, ffn_multiple=8, tolerance=0.03)
    ref = plans["nf_wn"]
    rule = WidthRule.from_preset("tiny", vocab_size=512)
    assert ref.ffn_hidden_size == rule.ffn_hidden(64)  # the reference keeps the preset's FFN ratio
    assert ref.parameters == rule.parameter_count(presets.get_preset("tiny")["layer_pattern"], 64)
    assert plans["nf_no_wn"].parameters == ref.parameters
    # attention is the cheapest mixer here, so attention-only needs a wider FFN to reach the same size
    assert plans["attention_only"].ffn_hidden_size > ref.ffn_hidden_size
    for plan in plans.values():
        assert plan.hidden_size == 64 and plan.ffn_hidden_size % 8 == 0
        assert abs(plan.parameters / ref.parameters - 1) <= 0.03, plan
        assert plan.preset_fields["ffn_hidden_size"] == plan.ffn_hidden_size
        assert plan.preset_fields["layer_pattern"] == plan.pattern
        assert plan.embedding_parameters == 512 * 64
    # the matched width is the best multiple: one step either way is not closer to the budget
    matched = plans["attention_only"]
    for other in (matched.ffn_hidden_size - 8, matched.ffn_hidden_size + 8):
        count = WidthRule.from_preset("tiny", vocab_size=512, ffn_ratio=other / 64).parameter_count(matched.pattern, 64)
        assert abs(count - ref.parameters) >= abs(matched.parameters - ref.parameters)


def test_plan_rejects_settings_it_cannot_honour():
    with pytest.raises(pf.StudyError, match="--param-tolerance"):
        pf.plan_models(["nf_wn", "attention_only"], "tiny", 64, None, 512, None, ffn_multiple=512, tolerance=0.01)
    with pytest.raises(pf.StudyError, match="--nf-pattern DFAF: .* no Mamba2"):
        pf.plan_models(["nf_wn"], "tiny", 64, "DFAF", 512, None, ffn_multiple=8, tolerance=0.03)
    with pytest.raises(pf.StudyError, match="--hidden-size"):
        pf.plan_models(["nf_wn"], "tiny", 60, None, 512, None, ffn_multiple=8, tolerance=0.03)
    with pytest.raises(pf.StudyError, match="--base-preset"):
        pf.plan_models(["nf_wn"], "no_such_preset", 64, None, 512, None, ffn_multiple=8, tolerance=0.03)
    with pytest.raises(pf.StudyError, match="--variants"):
        pf.selected_variants("nf_wn,mamba_only")


def test_schedule_ends_on_a_validation():
    args = pf.parse_args(["run", "--train-tokens", "1e6", "--seq-length", "512", "--micro-batch-size", "32",
                          "--eval-points", "10"])
    sched = pf.schedule(args)
    assert sched["train_iters"] % sched["eval_interval"] == 0
    assert sched["train_iters"] // sched["eval_interval"] == 10
    assert sched["tokens"] >= 1e6 and sched["tokens"] - 1e6 < 10 * 512 * 32
    assert 0 < sched["warmup_iters"] < sched["train_iters"]


# --- the trainer's log -------------------------------------------------------------------------------------------


def test_log_parser_keeps_the_latest_attempt():
    log = "\n".join([
        "some warning: validation at iteration 99: loss 1.0",  # not at the start of a line: ignored
        "model: runs/nf_wn/run.json pattern DFMFAF | 59,996 parameters on rank 0 | TP 1 PP 1 DP 1 | weight norm on",
        "iteration      10 | loss 6.5000 | lr 1e-3 | grad norm 1.0 | 120 ms/it | 2,000 tokens/s | MFU - | mem 0.5 GiB",
        "validation at iteration 10: loss 6.2000 | perplexity 492.75",
        "iteration      20 | loss 6.1000 | lr 1e-3 | grad norm 1.0 | 110 ms/it | 2,000 tokens/s | MFU - | mem 0.5 GiB",
        "validation at iteration 20: loss 6.0000 | perplexity 403.43",
        "iteration      30 | loss 5.9000 | lr 1e-3 | grad norm 1.0 | 110 ms/it | 2,000 tokens/s | MFU - | mem 0.5 GiB",
        # killed after iteration 30; the checkpoint was at 20
        "model: runs/nf_wn/run.json pattern DFMFAF | 59,996 parameters on rank 0 | TP 1 PP 1 DP 1 | weight norm on",
        "resumed from /x/iter_0000020 at iteration 20",
        "iteration      30 | loss 5.8000 | lr 1e-3 | grad norm 1.0 | 100 ms/it | 2,000 tokens/s | MFU - | mem 0.5 GiB",
        "validation at iteration 30: loss nan | perplexity nan",
    ])
    parsed = pf.parse_trainer_log(log)
    assert parsed["parameters"] == 59_996 and parsed["pattern"] == "DFMFAF"
    assert parsed["train"] == [[10, 6.5], [20, 6.1], [30, 5.8]]
    assert parsed["validation"][:2] == [[10, 6.2], [20, 6.0]] and parsed["validation"][2][0] == 30
    assert parsed["ms_per_iter"] == [120, 110, 110, 100]

    restarted = log + "\nmodel: paper_findings_nf_wn pattern DFMFAF | 59,996 parameters on rank 0 | TP 1\n" \
        "iteration      10 | loss 6.4000 | lr 1e-3 | grad norm 1.0 | 100 ms/it | 2,000 tokens/s\n"
    assert pf.parse_trainer_log(restarted)["train"] == [[10, 6.4]]  # a fresh start drops the earlier attempts
    assert pf.parse_trainer_log(restarted)["validation"] == []


# --- verdicts on synthetic curves --------------------------------------------------------------------------------


def _record(variant, seed, curve):
    return {"name": f"{variant}_seed{seed}", "variant": variant, "seed": seed, "status": "done",
            "validation": [[10 * (i + 1), x] for i, x in enumerate(curve)], "parameters": 1000,
            "ms_per_iter_median": 10.0, "wall_seconds": 5.0, "train_iters": 40, "iterations_done": 40,
            "final_valid_loss": curve[-1], "trainer_command": "python -m x"}


def _synthetic(final_gaps):
    """nf_wn / nf_no_wn curves with final loss gap (nf_no_wn - nf_wn) per seed."""
    records = []
    for seed, gap in enumerate(final_gaps, start=1):
        base = [5.0, 4.5, 4.2, 4.0 + 0.05 * seed]
        records.append(_record("nf_wn", seed, base))
        records.append(_record("nf_no_wn", seed, [x + gap for x in base]))
    return records


def _model(variant):
    return {"pattern": "DFMFAF", "hidden_size": 64, "ffn_hidden_size": 192, "parameters": 1000,
            "embedding_parameters": 100, "non_embedding_parameters": 900, "weight_norm": variant != "nf_no_wn",
            "description": ""}


def test_compare_reproduced_when_every_seed_agrees():
    records = _synthetic([0.10, 0.05, 0.08])
    c = pf.compare(records, "nf_wn", "nf_no_wn", 40)
    assert c["verdict"] == "direction reproduced"
    assert c["iteration"] == 40 and c["where"] == "the final iteration"
    assert c["n"] == 3 and c["wins"] == 3
    assert c["mean_difference"] == pytest.approx(0.23 / 3)
    assert c["std_difference"] == pytest.approx(0.025166, abs=1e-5)
    assert c["curve_wins"] == (4, 4)
    assert "nf_no_wn − nf_wn = +0.0767 ± 0.0252 nats" in c["detail"]
    assert c["seed_spread"]["nf_wn"] == pytest.approx(0.05)  # finals 4.05, 4.10, 4.15


def test_compare_other_outcomes():
    mixed = pf.compare(_synthetic([0.10, -0.02, 0.05]), "nf_wn", "nf_no_wn", 40)
    assert mixed["verdict"] == "inconclusive: lower on average, but in only 2 of 3 seeds"
    reversed_ = pf.compare(_synthetic([-0.10, -0.05]), "nf_wn", "nf_no_wn", 40)
    assert reversed_["verdict"] == "not reproduced" and reversed_["wins"] == 0
    single = pf.compare(_synthetic([0.1]), "nf_wn", "nf_no_wn", 40)
    assert single["verdict"].startswith("direction reproduced in the one seed") and single["std_difference"] is None
    assert pf.compare(_synthetic([0.1]), "nf_wn", "attention_only", 40)["verdict"] == "not tested"


def _stop(record, after):
    record["validation"] = [e for e in record["validation"] if e[0] <= after]
    record["status"], record["final_valid_loss"] = "stopped", None


def test_unfinished_and_failed_runs():
    records = _synthetic([0.1, 0.2, 0.3])
    _stop(records[1], 20)  # nf_no_wn seed 1 stopped by the time budget: the finished seeds are compared at the end
    c = pf.compare(records, "nf_wn", "nf_no_wn", 40)
    assert (c["iteration"], c["seeds"]) == (40, [2, 3])
    assert c["mean_difference"] == pytest.approx(0.25)
    assert c["curve_wins"] == (4, 4)  # over the compared seeds only
    assert c["stopped_early"] == [{"seed": 1, "iteration": 20, "difference": pytest.approx(0.1)}]
    assert "seed 1 at iteration 20 nf_no_wn − nf_wn = +0.1000" in c["detail"]
    not_run = dict(records[1], seed=4, name="nf_wn_seed4", status="not run", validation=[])
    assert pf.compare(records + [not_run], "nf_wn", "nf_no_wn", 40)["curve_wins"] == (4, 4)  # a run not started
    records[3]["status"] = "failed"  # failed runs take no part at all
    assert pf.compare(records, "nf_wn", "nf_no_wn", 40)["seeds"] == [3]

    records = _synthetic([0.1, 0.2])
    _stop(records[1], 20)
    _stop(records[3], 30)
    _stop(records[2], 30)  # no seed finished both: compare at the last validation every run reached
    c = pf.compare(records, "nf_wn", "nf_no_wn", 40)
    assert (c["iteration"], c["seeds"], c["n"]) == (20, [1, 2], 2)
    assert c["where"].startswith("iteration 20 of 40") and c["detail"].startswith("at iteration 20 of 40")
    assert c["differences"] == {"1": pytest.approx(0.1), "2": pytest.approx(0.2)}
    rows = {r["variant"]: r for r in pf.variant_rows({"models": {v: _model(v) for v in ("nf_wn", "nf_no_wn")}},
                                                      records)}
    assert (rows["nf_wn"]["runs_done"], rows["nf_no_wn"]["runs_done"]) == (1, 0)
    assert rows["nf_no_wn"]["mean_loss"] is None


def test_finding_verdict_combines_the_comparisons():
    ok, bad, untested = ({"verdict": v} for v in ("direction reproduced", "not reproduced", "not tested"))
    assert pf.finding_verdict([ok, ok]) == "direction reproduced"
    assert pf.finding_verdict([bad, bad]) == "not reproduced"
    assert pf.finding_verdict([ok, bad]).startswith("partly reproduced")
    assert pf.finding_verdict([ok, untested]) == "direction reproduced (1 of 2 comparisons tested)"
    assert pf.finding_verdict([untested]) == "not tested"


def test_report_from_saved_results(tmp_path):
    records = _synthetic([0.1, 0.05])
    records += [_record("attention_only", s, [5.2, 4.8, 4.5, 4.3]) for s in (1, 2)]
    records += [_record("deltanet_mamba2", s, [5.1, 4.6, 4.3, 4.1]) for s in (1, 2)]
    models = {v: _model(v) for v in pf.VARIANTS}
    plan = {"settings": {"base_preset": "tiny", "hidden_size": 64, "vocab_size": 512, "seq_length": 64,
                         "global_batch_size": 4, "lr": 1e-3, "bf16": False, "ssd_backend": "torch", "seeds": [1, 2],
                         "train_iters": 40, "eval_interval": 10, "tokens_per_iter": 256, "tokens": 10240},
            "models": models, "runs": []}
    saved = tmp_path / "in.json"
    saved.write_text(json.dumps({"plan": plan, "runs": records}))
    out = tmp_path / "out"
    assert pf.main(["report", "--results-json", str(saved), "--output-dir", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Finding (a): weight normalization lowers validation loss\n\n**Verdict: direction reproduced.**" in text
    assert "**Verdict: direction reproduced.**" in text.split("## Finding (b)")[1]
    assert "| attention_only | `DFMFAF` | 192 | 1,000 (900) | +0.00% | 2/2 | 4.3000 ± 0.0000 |" in text
    assert json.loads((out / "results.json").read_text())["analysis"]["complete"]
    for name in pf.PLOT_FILES.values():
        assert (out / name).stat().st_size > 1000


# --- end to end on CPU ------------------------------------------------------------------------------------------


def _study(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-m", "experiments.paper_findings", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return run, run.stdout + run.stderr


def test_smoke_study_end_to_end_then_skips_finished_work(tmp_path):
    work, out = tmp_path / "study", tmp_path / "report"
    run, log = _study(["all", "--smoke", "--seeds", "1", "--workdir", str(work), "--output-dir", str(out)])
    assert run.returncode == 0, log[-6000:]
    saved = json.loads((out / "results.json").read_text())
    plan, records = saved["plan"], {r["name"]: r for r in saved["runs"]}
    assert sorted(records) == sorted(f"{v}_seed1" for v in pf.VARIANTS)
    iters = plan["settings"]["train_iters"]
    for r in records.values():
        assert r["status"] == "done", r
        assert r["parameters"] == r["parameters_planned"]  # the trainer built the planned model
        assert [it for it, _ in r["validation"]] == list(range(plan["settings"]["eval_interval"], iters + 1,
                                                               plan["settings"]["eval_interval"]))
        assert r["validation"][-1][1] < r["validation"][0][1]  # it learns
        assert (work / "runs" / r["name"] / "result.json").is_file()
    args = {r["variant"]: r["trainer_command"] for r in records.values()}
    assert args["nf_no_wn"] == args["nf_wn"].replace("nf_wn_seed1", "nf_no_wn_seed1") + " --no-weight-norm"
    assert f"--preset-file {work / 'runs' / 'nf_wn_seed1' / 'run.json'} " in args["nf_wn"]
    text = (out / "report.md").read_text()
    for name in pf.VARIANTS:
        assert f"| {name} |" in text
    assert text.count("**Verdict: ") == 2
    for name in pf.PLOT_FILES.values():
        assert (out / name).is_file()
    assert "[progress" in log and "corpus:" in log

    # a rerun skips everything finished; a new seed trains only the new run
    run, log = _study(["all", "--smoke", "--seeds", "1,2", "--variants", "nf_wn", "--workdir", str(work),
                       "--output-dir", str(out)])
    assert run.returncode == 0, log[-6000:]
    assert log.count("already done (") == 4 + 1, log  # four prepare stages and nf_wn_seed1
    assert "[run] started nf_wn_seed2" in log and "[run] started nf_wn_seed1" not in log
    second = json.loads((out / "results.json").read_text())["runs"]
    curves = {r["seed"]: r["validation"] for r in second}
    assert curves[1] == records["nf_wn_seed1"]["validation"] and curves[2] != curves[1]
