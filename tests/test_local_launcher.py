"""LocalLauncher.run_jobs, the local job queue of the architecture search and experiments/paper_findings.py: the
deadline (SIGTERM, then SIGKILL after the grace), the warm-up gate, per-job MASTER_PORT, log append and progress.

The jobs are tiny Python processes (a few seconds in all)."""

import os
import sys
import time

from megatron_flash.design.candidates import REPO, Job, LocalLauncher


def _job(tmp_path, key: str, code: str) -> Job:
    return Job(key, [sys.executable, "-c", code], str(tmp_path / f"{key}.log"))


def test_deadline_drops_queued_jobs_and_stops_running_ones(tmp_path):
    ignores_sigterm = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
                      "time.sleep(60)"
    jobs = [_job(tmp_path, "stubborn", ignores_sigterm), _job(tmp_path, "polite", "import time; time.sleep(60)"),
            _job(tmp_path, "queued", "print('ran')")]
    events, ended = [], {}
    start = time.time()
    LocalLauncher(parallel=2, poll_seconds=0.05).run_jobs(
        jobs, lambda r, code: ended.__setitem__(r.job.key, (code, r.stop_sent is not None)),
        on_start=lambda r: events.append(("start", r.job.key)),
        deadline=start + 1.5, stop_grace_s=1.0,
        on_deadline=lambda queued, running: events.append(("deadline", queued, sorted(r.job.key for r in running))),
        on_kill=lambda r: events.append(("kill", r.job.key)))
    took = time.time() - start
    assert events == [("start", "stubborn"), ("start", "polite"), ("deadline", 1, ["polite", "stubborn"]),
                      ("kill", "stubborn")]
    assert ended == {"polite": (-15, True), "stubborn": (-9, True)}  # SIGTERM ends one; the other needs SIGKILL
    assert 2.5 <= took < 10
    assert not os.path.exists(tmp_path / "queued.log")


def test_first_job_starts_alone_until_warm_then_the_rest_with_own_ports(tmp_path):
    warms_slowly = "import time; time.sleep(1.0); print('warm', flush=True); time.sleep(1.0)"
    reports_env = "import os; print(os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'], os.environ['FROM_BASE'], " \
                  "os.environ['OMP_NUM_THREADS'], os.environ['PYTHONPATH'])"
    jobs = [_job(tmp_path, "first", warms_slowly)]
    jobs += [_job(tmp_path, f"next{i}", reports_env) for i in range(2)]
    (tmp_path / "next0.log").write_text("an earlier attempt\n")
    started, ended, progress = {}, {}, []

    def warmed_up(r) -> bool:
        with open(r.job.log_path) as f:
            return "warm" in f.read()

    launcher = LocalLauncher(parallel=3, threads=2, poll_seconds=0.05, master_ports=True,
                             base_env={**os.environ, "FROM_BASE": "yes", "PYTHONPATH": REPO})
    launcher.run_jobs(jobs, lambda r, code: ended.__setitem__(r.job.key, (code, time.time())),
                      on_start=lambda r: started.__setitem__(r.job.key, (time.time(), r.master_port)),
                      warmed_up=warmed_up, append_logs=True, progress_interval_s=0.3,
                      on_progress=lambda running, queued, done: progress.append(
                          (sorted(r.job.key for r in running), queued, done)))
    assert {k: code for k, (code, _) in ended.items()} == {"first": 0, "next0": 0, "next1": 0}
    first_start = started["first"][0]
    for key in ("next0", "next1"):  # after "warm" appeared in the first log, while the first job still ran
        assert first_start + 1.0 <= started[key][0] < ended["first"][1]
    assert progress[0] == (["first"], 2, 0)  # the two others waited for the warm-up
    ports = {port for _, port in started.values()}
    assert len(ports) == 3 and None not in ports
    for i in range(2):
        lines = (tmp_path / f"next{i}.log").read_text().splitlines()
        assert lines[-1] == f"127.0.0.1 {started[f'next{i}'][1]} yes 2 {REPO}"  # REPO once on PYTHONPATH
    assert (tmp_path / "next0.log").read_text().startswith("an earlier attempt\n")  # appended, not overwritten


def test_workers_keep_triton_autotuning_results_unless_told_otherwise(tmp_path):
    """Workers share fla's autotuning through Triton's on-disk cache by default; an explicit setting wins."""
    reports = "import os; print(os.environ.get('TRITON_CACHE_AUTOTUNING'))"
    base = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_AUTOTUNING"}
    for key, env, expected in (("default", base, "1"), ("explicit", {**base, "TRITON_CACHE_AUTOTUNING": "0"}, "0")):
        ended = {}
        LocalLauncher(poll_seconds=0.05, base_env=env).run_jobs(
            [_job(tmp_path, key, reports)], lambda r, code: ended.__setitem__(r.job.key, code))
        assert ended == {key: 0}
        assert (tmp_path / f"{key}.log").read_text().split() == [expected]
