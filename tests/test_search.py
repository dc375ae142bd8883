"""The architecture search end to end on the CPU: real training of tiny candidates, parallel workers, a SIGKILL
in the middle, a resume that trains nothing twice; plus the Pareto front, Spearman and the SLURM array script."""

import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_flash.design import candidates, evolution, latency
from megatron_flash.design.space import Architecture, SearchSpace, WidthRule
from tests.tool_loading import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "3", "--eval-iters", "1",
           "--log-interval", "100", "--lr", "3e-3"]
SPACE_FLAGS = ["--hidden-sizes", "64,128", "--ratios", "0:1,1:1", "--ffn-counts", "0,1", "--max-blocks", "2",
               "--max-operators", "10"]
SPACE = SearchSpace(ratios=((0, 1), (1, 1)), ffn_counts=(0, 1), max_blocks=2, max_operators=10, hidden_sizes=(64, 128))


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """A CPU latency table of the tiny preset at widths 64 and 128, and a target that about half of the space's
    architectures meet at width 128 (so hidden sizes differ between candidates)."""
    rule = WidthRule.from_preset("tiny")
    setting = latency.DecodeSetting(new_tokens=4, timed_steps=2, repeats=1, warmup=1)
    table = latency.measure_table(rule, [64, 128], operators=("D", "M", "A", "F"), setting=setting,
                                  layers_per_measurement=1, progress=lambda line: None)
    path = tmp_path_factory.mktemp("latency") / "tiny.json"
    table.save(str(path))
    rng = random.Random(0)
    at_128 = sorted(table.predict(SPACE.pattern(SPACE.sample(rng)), 128) for _ in range(200))
    return str(path), table, at_128[len(at_128) // 2]


def read_state(workdir):
    try:
        with open(os.path.join(workdir, evolution.STATE_FILE)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_runs(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _search(tmp_path, tiny_table, *options):
    """(work folder, run log, command line, environment) of a tools/search_arch.py run on the tiny table's space
    with two parallel candidates; ``options`` are the evolution flags."""
    table_path, _, target = tiny_table
    work = str(tmp_path / "search")
    run_log = str(tmp_path / "runs.jsonl")
    cmd = [sys.executable, os.path.join(REPO, "tools", "search_arch.py"), "--workdir", work,
           "--latency-table", table_path, "--latency-target-ms", str(target), *SPACE_FLAGS, *options,
           "--parallel", "2", "--threads-per-candidate", "1", "--", *TRAINER]
    return work, run_log, cmd, {**os.environ, candidates.RUN_LOG_ENV: run_log, "OMP_NUM_THREADS": "1"}


def test_search_end_to_end_killed_and_resumed(tmp_path, tiny_table):
    _, table, target = tiny_table
    work, run_log, cmd, env = _search(tmp_path, tiny_table, "--population", "3", "--sample-size", "2", "--cycles",
                                      "1", "--per-cycle", "2", "--seed", "3")

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    finished_before = []
    while time.monotonic() < deadline and first.poll() is None:
        state = read_state(work)
        if state:
            finished_before = [cid for cid, c in state["candidates"].items() if c["status"] != "pending"]
            if finished_before:
                break
        time.sleep(0.2)
    assert first.poll() is None, f"the search ended before it could be killed:\n{first.stdout.read()}"
    assert finished_before, "no candidate finished in time"
    first.send_signal(signal.SIGKILL)
    first.wait()
    first_output = first.stdout.read()
    state = read_state(work)  # the state file is whole: it is only ever replaced atomically
    finished_before = [cid for cid, c in state["candidates"].items() if c["status"] != "pending"]
    assert 1 <= len(finished_before) < 5, first_output
    # workers die with the search (no orphan keeps training)
    started = {r["pid"] for r in read_runs(run_log) if r["event"] == "start"}
    ended = {r["pid"] for r in read_runs(run_log) if r["event"] == "end"}
    time.sleep(1.0)
    assert not [pid for pid in started - ended if alive(pid)]

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout

    state = read_state(work)
    records = state["candidates"]
    assert len(records) == 5 and state["batch"] is None and state["cycle"] == 1
    assert sorted(c["origin"] for c in records.values()) == ["mutation"] * 2 + ["random"] * 3
    assert len(state["population"]) == 3  # aging: two children joined, the two oldest left
    assert state["population"] == ["c0002", "c0003", "c0004"]

    # every candidate trained to completion exactly once; the ones finished before the kill were not started again
    runs = read_runs(run_log)
    starts, ends = {}, {}
    for r in runs:
        (starts if r["event"] == "start" else ends).setdefault(r["id"], []).append(r)
    for cid in finished_before:
        assert len(starts[cid]) == 1, cid
    for cid, record in records.items():
        if record["status"] == "cached":
            continue
        assert record["status"] == "done", record
        assert len(ends[cid]) == 1, cid
        assert math.isfinite(record["valid_loss"]) and record["valid_ppl"] == pytest.approx(
            math.exp(record["valid_loss"]))
    # one progress line per candidate
    lines = [line for line in (first_output + second.stdout).splitlines() if line.startswith("[search] c0")]
    assert sorted(line.split()[1] for line in lines) == sorted(records)

    # everything inside the space, at the largest width that meets the latency target
    for record in records.values():
        arch = Architecture.from_dict(record["arch"])
        SPACE.check(arch)
        assert record["pattern"] == SPACE.pattern(arch).replace(" ", "")
        assert record["hidden"] in (64, 128)
        assert record["latency_ms"] == pytest.approx(table.predict(record["pattern"], record["hidden"]))
        assert record["latency_ms"] <= target
        if record["hidden"] == 64:
            assert table.predict(record["pattern"], 128) > target
        if record["origin"] == "mutation":
            assert record["parent"] in records and record["mutation"]

    # reports
    with open(os.path.join(work, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(records)
    assert [float(r["valid_ppl"]) for r in rows] == sorted(float(r["valid_ppl"]) for r in rows)
    assert any(r["pareto"] == "1" for r in rows)
    report = open(os.path.join(work, "results.md")).read()
    assert "| rank | id | pattern |" in report
    best_trained = next(r["id"] for r in rows if r["status"] == "done")
    best_file = os.path.join(os.path.abspath(work), "candidates", best_trained, "candidate.json")
    assert f"--preset-file {best_file} ..." in report and os.path.isfile(best_file)
    assert os.path.getsize(os.path.join(work, "pareto.png")) > 0

    # a finished search reruns without training; a changed option is refused
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and len(read_runs(run_log)) == len(runs)
    changed = [c if c != "3" else "4" for c in cmd]  # --seed 3 -> 4
    refused = subprocess.run(changed, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "seed: 3 -> 4" in refused.stderr


def test_search_time_budget_stops_between_batches_and_the_same_command_resumes(tmp_path, tiny_table):
    """With --time-budget-min, no batch starts after the budget: the initial population (started in time) finishes,
    the children wait in the state, and the same command (budget included) trains them and ends the search."""
    work, run_log, cmd, env = _search(tmp_path, tiny_table, "--population", "2", "--sample-size", "1", "--cycles",
                                      "1", "--per-cycle", "2", "--seed", "5", "--time-budget-min", "0.1")
    # Margins on both sides of the 6 s budget on a busy 2-core machine: the first batch starts well within it (the
    # search needs ~1 s to get there), and its candidates train long enough (~15 s) to end well after it.
    cmd += ["--train-iters", "150"]

    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 3, first.stdout + first.stderr
    assert "time budget spent: stopping with 2 candidates evaluated, cycle 0/1" in first.stdout
    state = read_state(work)
    assert state["evaluated"] == 2 and state["cycle"] == 0
    assert state["batch"]["kind"] == "cycle"  # proposed, saved, not started
    children = state["batch"]["ids"]
    assert len(children) == 2 and all(state["candidates"][c]["status"] == "pending" for c in children)
    assert {r["id"] for r in read_runs(run_log)} == {"c0000", "c0001"}

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    state = read_state(work)
    assert state["cycle"] == 1 and state["batch"] is None and state["evaluated"] == 4
    started = sorted(r["id"] for r in read_runs(run_log) if r["event"] == "start")
    assert started == sorted(["c0000", "c0001", *children])  # the initial population was not trained again


def test_search_refuses_an_impossible_target(tmp_path, tiny_table, capsys):
    table_path, table, _ = tiny_table
    tool = load_tool("search_arch")
    code = tool.main(["--workdir", str(tmp_path / "w"), "--latency-table", table_path, "--latency-target-ms", "1e-6",
                      *SPACE_FLAGS, "--population", "2", "--sample-size", "1", "--", *TRAINER])
    assert code == 2
    assert not (tmp_path / "w" / evolution.STATE_FILE).exists()  # a search that could not start leaves no state
    code = tool.main(["--workdir", str(tmp_path / "w1"), "--latency-table", table_path, "--latency-target-like",
                      "DFMF", *SPACE_FLAGS, "--", *TRAINER])
    assert code == 2 and "give PATTERN@HIDDEN" in capsys.readouterr().err
    code = tool.main(["--workdir", str(tmp_path / "w2"), "--latency-table", table_path, "--latency-target-ms", "1",
                      "--hidden-sizes", "64,256", "--ratios", "0:1", "--ffn-counts", "0,1", "--", *TRAINER])
    assert code == 2


def test_pareto_front():
    recs = [{"id": str(i), "status": "done", "latency_ms": lat, "valid_ppl": ppl}
            for i, (lat, ppl) in enumerate([(1.0, 50), (2.0, 40), (1.5, 60), (3.0, 45), (2.5, 30), (0.5, 80)])]
    recs.append({"id": "x", "status": "failed", "latency_ms": 0.1, "valid_ppl": None})
    assert [r["id"] for r in evolution.pareto_front(recs)] == ["5", "0", "1", "4"]


def test_spearman_matches_scipy_and_a_hand_computed_example():
    from scipy.stats import spearmanr

    # hand-computed: ranks (1,2,3,4,5) vs (2,1,4,3,5): d^2 = 4, rho = 1 - 6*4 / (5*24) = 0.8
    assert evolution.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert evolution.rankdata([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    rng = random.Random(0)
    for n in (2, 5, 12, 40):
        a = [rng.random() for _ in range(n)]
        b = [x + rng.gauss(0, 0.3) for x in a]
        assert evolution.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
        ties_a, ties_b = [round(x, 1) for x in a], [round(x, 1) for x in b]
        if len(set(ties_a)) > 1 and len(set(ties_b)) > 1:
            assert evolution.spearman(ties_a, ties_b) == pytest.approx(spearmanr(ties_a, ties_b).statistic,
                                                                       abs=1e-12)


def test_rank_correlation_tool_on_two_result_tables(tmp_path, capsys):
    tool = load_tool("rank_correlation")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    rows_a = [("DFMF", 64, 5.0), ("MFMF", 64, 4.0), ("AFAF", 128, 6.0), ("DFAF", 128, 4.5), ("MMMF", 64, 7.0)]
    rows_b = [("DFMF", 64, 3.1), ("MFMF", 64, 3.0), ("AFAF", 128, 3.5), ("DFAF", 128, 3.3), ("XF", 64, 1.0)]
    for path, rows in ((a, rows_a), (b, rows_b)):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["pattern", "hidden", "valid_loss"])
            w.writerows(rows)
    assert tool.main(["--results-a", str(a), "--results-b", str(b)]) == 0
    out = capsys.readouterr().out
    # common: DFMF 5.0/3.1, MFMF 4.0/3.0, AFAF 6.0/3.5, DFAF 4.5/3.3 -> rankings (3,1,4,2) and (2,1,4,3): rho = 0.8
    assert "Spearman rank correlation: 0.800 over 4 architectures (1 only in A, 1 only in B: left out)" in out


def test_slurm_array_script_refuses_a_bad_task(tmp_path):
    """launch/search_array.sbatch run by hand (no SLURM here) with a task id past the manifest's end."""
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"{tmp_path / 'c0000'}\n")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "MF_PYTHON": sys.executable, "MF_REPO_DIR": REPO}
    bad = subprocess.run(["bash", os.path.join(REPO, "launch", "search_array.sbatch"), str(manifest)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is not a candidate folder" in bad.stderr
    env.pop("SLURM_ARRAY_TASK_ID")
    bad = subprocess.run(["bash", os.path.join(REPO, "launch", "search_array.sbatch"), str(manifest)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "submit as a job array" in bad.stderr


FAKE_SBATCH = r"""#!/bin/bash
# Stand-in for sbatch: runs every array task of launch/search_array.sbatch in the background, prints a job id.
array="" out="" rest=()
for a in "$@"; do
    case $a in
        --array=*) array=${a#--array=} ;;
        --output=*) out=${a#--output=} ;;
        --*) ;;
        *) rest+=("$a") ;;
    esac
done
range=${array%%%*}
job=$$
for i in $(seq "${range%-*}" "${range#*-}"); do
    log=${out//%A/$job}
    log=${log//%a/$i}
    SLURM_ARRAY_JOB_ID=$job SLURM_ARRAY_TASK_ID=$i bash "${rest[@]}" >"$log" 2>&1 &
    echo $! >>"$FAKE_SLURM_DIR/$job.pids"
done
echo "$job"
"""

FAKE_SQUEUE = r"""#!/bin/bash
# Stand-in for squeue -h -j JOB -o %i: prints JOB while one of its tasks is alive (zombies count as ended).
while [[ $# -gt 0 ]]; do
    if [[ $1 == -j ]]; then job=$2; shift; fi
    shift
done
while read -r pid; do
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
    if [[ -n $state && $state != Z ]]; then echo "$job"; exit 0; fi
done <"$FAKE_SLURM_DIR/$job.pids"
"""


def test_slurm_launcher_submits_an_array_and_collects_results(tmp_path, tiny_table, monkeypatch):
    """SlurmLauncher against stand-in sbatch / squeue commands that run the real array script locally: a good
    candidate, one that fails (recorded by the worker) and one whose worker crashes (no result when the job ends);
    a second run submits nothing."""
    _, table, _ = tiny_table
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folders = {name: str(tmp_path / name) for name in ("good", "bad", "crash")}
    candidates.write_candidate(folders["good"], "good", table.rule.megatron_fields("MFAF", 64), TRAINER)
    candidates.write_candidate(folders["bad"], "bad", table.rule.megatron_fields("MF", 64),
                               [a if a != "1" else "0" for a in TRAINER])  # --eval-iters 0
    os.makedirs(folders["crash"])
    (tmp_path / "crash" / "candidate.json").write_text("{not json")
    launcher = candidates.SlurmLauncher(poll_seconds=0.5)
    results, jobs = {}, []
    candidates.run_folders(launcher, folders, results.__setitem__, manifest=str(tmp_path / "manifest.txt"),
                           remember_job=jobs.append)
    assert len(jobs) == 1 and len(open(tmp_path / "manifest.txt").read().split()) == 3
    assert results["good"]["status"] == "done" and math.isfinite(results["good"]["valid_loss"])
    assert results["good"]["iterations"] == 3
    assert "validation at iteration 3" in (tmp_path / "good" / "train.log").read_text()
    assert results["bad"]["status"] == "failed" and "--eval-iters > 0" in results["bad"]["error"]
    assert results["crash"]["status"] == "failed" and "ended without a result" in results["crash"]["error"]
    again = {}
    candidates.run_folders(launcher, folders, again.__setitem__, manifest=str(tmp_path / "manifest.txt"),
                           remember_job=jobs.append)
    assert len(jobs) == 1 and again == results


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_slurm_array_script_passes_shellcheck():
    out = subprocess.run(["shellcheck", os.path.join(REPO, "launch", "search_array.sbatch")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout


def test_a_candidate_with_bad_trainer_flags_fails_clearly(tmp_path):
    folder = tmp_path / "c"
    rule = WidthRule.from_preset("tiny")
    candidates.write_candidate(str(folder), "c", rule.megatron_fields("MF", 64),
                               [a if a != "1" else "0" for a in TRAINER])  # --eval-iters 0
    result = candidates.run_candidate_folder(str(folder))
    assert result["status"] == "failed" and "--eval-iters > 0" in result["error"]
    assert candidates.read_result(str(folder)) == result
