"""Train and evaluate one candidate architecture with the real trainer, and run many of them as parallel jobs.

A candidate lives in a folder::

    candidate.json   what to train: {"id", "preset_fields" (a megatron_flash.presets dict), "trainer_args"}
    result.json      written (atomically) when it is done: {"status": "done", "valid_loss", "valid_ppl", ...}
                     or {"status": "failed", "error": ...}
    train.log        the trainer's output

``python -m megatron_flash.design.candidates --candidate DIR`` trains it in this process: the trainer flags plus
``--preset-file DIR/candidate.json`` are parsed by megatron_flash.training.arguments (so every pretraining flag
works: data, batch, LR, bf16...), then ``megatron_flash.pretrain.train`` runs with an evaluation after the final
iteration, whose validation loss is the candidate's fitness. The same ``--preset-file`` trains a chosen candidate
at full scale with the ordinary trainer.

Launchers run a list of candidate folders: :class:`LocalLauncher` (subprocesses, ``parallel`` at a time, each
optionally pinned to its own GPUs) and :class:`SlurmLauncher` (a job array over launch/search_array.sbatch). Both
call back as each candidate finishes, so the caller can save its state after every candidate; a candidate whose
result.json already exists is never started again. :meth:`LocalLauncher.run_jobs` is the local job queue itself
(any commands, with an optional deadline, progress callback and warm-up gate); experiments/paper_findings.py runs
its trainings with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Callable, Optional

from megatron_flash.design.latency import write_json_atomic

RUN_LOG_ENV = "MEGATRON_FLASH_RUN_LOG"  # a JSONL file every training start / end is appended to (tests count runs)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CandidateError(RuntimeError):
    """A candidate that could not be set up or trained; the message says why."""


# --------------------------------------------------------------------------------------------------------------
# One candidate
# --------------------------------------------------------------------------------------------------------------


def write_candidate(folder: str, cid: str, preset_fields: dict, trainer_args: list, info: Optional[dict] = None):
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(os.path.join(folder, "candidate.json"), {
        "id": cid, "preset_fields": preset_fields, "trainer_args": list(trainer_args), "info": info or {}})


def read_result(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "result.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _log_run(event: str, cid: str, **extra) -> None:
    path = os.environ.get(RUN_LOG_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "id": cid, "pid": os.getpid(), "time": time.time(), **extra}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def train_candidate(preset_file: str, trainer_args: list) -> dict:
    """Train one candidate in this process with megatron_flash.pretrain and return its figures.

    ``preset_file``: the model (``--preset-file``: a candidate.json); ``trainer_args`` are pretraining flags
    (without --preset, --preset-file or --pattern); evaluation happens after the final iteration (--eval-interval
    is set to --train-iters), so --eval-iters must be > 0.
    """
    import torch

    from megatron_flash import pretrain, runtime
    from megatron_flash.training import arguments

    for flag in ("--preset", "--preset-file", "--pattern"):
        if flag in trainer_args:
            raise CandidateError(f"trainer flags must not contain {flag}: the candidate sets the model")
    argv = list(trainer_args) + ["--preset-file", preset_file]
    try:
        args = arguments.parse_args(argv, world_size=1)
    except arguments.ArgumentError as exc:
        raise CandidateError(f"trainer flags {shlex.join(trainer_args)}: {exc}") from None
    if not args.eval_iters:
        raise CandidateError("candidates are ranked by validation loss: give --eval-iters > 0")
    args.eval_interval = args.train_iters
    runtime.initialize(1, 1, seed=args.seed)
    start = time.perf_counter()
    try:
        summary = pretrain.train(args)
    finally:
        runtime.shutdown()
    valid = summary.get("valid_loss")
    if valid is None:
        raise CandidateError("the trainer returned no validation loss (is there validation data?)")
    return {
        "valid_loss": float(valid), "valid_ppl": math.exp(min(float(valid), 50.0)),
        "train_loss": float(summary["losses"][-1]) if summary["losses"] else None,
        "iterations": summary["iteration"], "train_seconds": time.perf_counter() - start,
        "tokens": summary["iteration"] * args.global_batch_size * args.seq_length,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def run_candidate_folder(folder: str) -> dict:
    """Train the candidate in ``folder`` and write its result.json (done or failed); returns the result."""
    with open(os.path.join(folder, "candidate.json"), encoding="utf-8") as f:
        cand = json.load(f)
    cid = cand["id"]
    _log_run("start", cid)
    print(f"[candidate {cid}] pattern {cand['preset_fields']['layer_pattern']} hidden "
          f"{cand['preset_fields']['hidden_size']} | trainer flags: {shlex.join(cand['trainer_args'])}", flush=True)
    try:
        result = {"status": "done", "id": cid,
                  **train_candidate(os.path.join(folder, "candidate.json"), cand["trainer_args"])}
    except Exception as exc:  # noqa: BLE001 - recorded as the candidate's outcome
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "id": cid, "error": f"{type(exc).__name__}: {exc}"}
    write_json_atomic(os.path.join(folder, "result.json"), result)
    _log_run("end", cid, status=result["status"])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_flash.design.candidates", allow_abbrev=False,
                                description="Train one search candidate (a folder with candidate.json) and write "
                                            "its result.json.")
    p.add_argument("--candidate", help="candidate folder (holds candidate.json)")
    p.add_argument("--manifest", help="a file of candidate folders, one per line; with --index (SLURM arrays)")
    p.add_argument("--index", type=int, help="line of --manifest to run (default: $SLURM_ARRAY_TASK_ID)")
    args = p.parse_args(argv)
    folder = args.candidate
    if args.manifest:
        index = args.index if args.index is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "-1"))
        with open(args.manifest, encoding="utf-8") as f:
            folders = [line.strip() for line in f if line.strip()]
        if not 0 <= index < len(folders):
            print(f"error: index {index} outside the {len(folders)} candidates of {args.manifest}", file=sys.stderr)
            return 2
        folder = folders[index]
    if not folder or not os.path.isfile(os.path.join(folder, "candidate.json")):
        print(f"error: {folder!r} is not a candidate folder (no candidate.json); give --candidate or --manifest",
              file=sys.stderr)
        return 2
    if read_result(folder) is not None:
        print(f"[candidate] {folder} already has a result; not training it again", flush=True)
        return 0
    result = run_candidate_folder(folder)
    return 0 if result["status"] == "done" else 1


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def die_with_parent():
    """preexec_fn: the worker gets SIGKILL when the process that started it dies (Linux), so killing a search
    never leaves orphans training."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _failure(folder: str, message: str) -> dict:
    log = os.path.join(folder, "train.log")
    tail = ""
    if os.path.exists(log):
        with open(log, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-5:]).strip()
    result = {"status": "failed", "error": message + (f"; log tail: {tail}" if tail else "")}
    write_json_atomic(os.path.join(folder, "result.json"), result)
    return result


@dataclass
class Job:
    """One worker process for :meth:`LocalLauncher.run_jobs`: ``command`` runs in the repository, in the
    environment of the slot it runs in, with its output in ``log_path``."""

    key: str
    command: list
    log_path: str


@dataclass
class RunningJob:
    job: Job
    process: subprocess.Popen
    log: IO
    started: float  # time.time() at the start
    master_port: Optional[int] = None  # with LocalLauncher(master_ports=True)
    stop_sent: Optional[float] = None  # time.time() of the SIGTERM a deadline sent


class LocalLauncher:
    """Runs worker processes on this machine, ``parallel`` at a time: candidate folders (:meth:`run`) or any
    commands (:meth:`run_jobs`, also used by experiments/paper_findings.py).

    ``devices``: GPU ids to spread over the workers (each worker gets ``len(devices) // parallel`` of them through
    CUDA_VISIBLE_DEVICES); None leaves the environment alone. Workers get ``threads`` CPU threads each.
    ``base_env``: the environment workers start from (default: this process's). ``master_ports``: every worker is
    its own single-process torch.distributed job and gets MASTER_ADDR=127.0.0.1 and a MASTER_PORT no other running
    worker holds (two workers initializing on one port would fail).
    """

    def __init__(self, parallel: int = 1, devices: Optional[list] = None, threads: Optional[int] = None,
                 python: str = sys.executable, poll_seconds: float = 0.2, base_env: Optional[dict] = None,
                 master_ports: bool = False):
        if parallel < 1:
            raise CandidateError("parallel must be >= 1")
        if devices is not None and len(devices) < parallel:
            raise CandidateError(f"{parallel} parallel candidates need at least as many GPUs, got {devices}")
        self.parallel, self.devices, self.threads = parallel, devices, threads
        self.python, self.poll_seconds = python, poll_seconds
        self.base_env, self.master_ports = base_env, master_ports

    def _env(self, slot: int) -> dict:
        env = dict(os.environ if self.base_env is None else self.base_env)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != REPO]
        env["PYTHONPATH"] = os.pathsep.join([REPO] + paths)
        if self.devices is not None:
            share = len(self.devices) // self.parallel
            mine = self.devices[slot * share:(slot + 1) * share]
            inherited = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            if inherited:  # our ids index the GPUs this process was given
                mine = [inherited[d] for d in mine]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in mine)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        # Workers share fla's autotuning results through Triton's on-disk cache instead of each autotuning again
        # (on an H200, first-use costs took up to 200 s of a 300 s search candidate; docs/design_tools.md).
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        return env

    def _start(self, job: Job, slot: int, running: dict, append_logs: bool) -> RunningJob:
        env = self._env(slot)
        port = None
        if self.master_ports:
            from megatron_flash.runtime import free_port

            taken = {r.master_port for r in running.values()}
            port = free_port()
            while port in taken:  # a port a running worker was given may not be bound by it yet
                port = free_port()
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(job.log_path, "a" if append_logs else "w", encoding="utf-8")
        process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   preexec_fn=die_with_parent)
        return RunningJob(job, process, log, time.time(), port)

    def run_jobs(self, jobs: list, on_done: Callable[[RunningJob, int], None], *,
                 on_start: Callable[[RunningJob], None] = lambda r: None,
                 warmed_up: Optional[Callable[[RunningJob], bool]] = None,
                 deadline: Optional[float] = None, stop_grace_s: float = 30.0,
                 on_deadline: Callable[[int, list], None] = lambda queued, running: None,
                 on_kill: Callable[[RunningJob], None] = lambda r: None,
                 on_progress: Optional[Callable[[list, int, int], None]] = None, progress_interval_s: float = 30.0,
                 append_logs: bool = False) -> None:
        """Run every :class:`Job` in order, ``parallel`` at a time; ``on_done(running_job, exit_code)`` as each
        ends and ``on_start(running_job)`` as each starts (both in this thread).

        ``warmed_up``: while no job has ended, further jobs start only once it is true of a running one (the first
        job starts alone, e.g. until it has filled a compilation cache the others then read).
        ``deadline`` (a time.time()): no job starts later; ``on_deadline(jobs dropped, running jobs)`` is called,
        the running jobs get SIGTERM, and SIGKILL (after ``on_kill(job)``) when still alive ``stop_grace_s`` later.
        ``on_progress(running jobs, jobs queued, jobs ended)`` every ``progress_interval_s`` while any runs.
        ``append_logs``: add to existing log files instead of overwriting them (a resumed job keeps its history).
        Workers still running when this returns by an exception are killed.
        """
        queue = list(jobs)
        running = {}  # slot -> RunningJob
        ended, stopping, last_progress = 0, False, time.time()
        warmed = warmed_up is None
        try:
            while queue or running:
                now = time.time()
                if deadline is not None and now >= deadline and not stopping:
                    stopping = True
                    on_deadline(len(queue), list(running.values()))
                    queue.clear()
                    for r in running.values():
                        r.process.send_signal(signal.SIGTERM)
                        r.stop_sent = now
                for r in running.values():
                    if r.stop_sent and now - r.stop_sent > stop_grace_s and r.process.poll() is None:
                        on_kill(r)
                        r.process.kill()
                if not warmed:
                    warmed = ended > 0 or any(warmed_up(r) for r in running.values())
                free = [s for s in range(self.parallel) if s not in running]
                while queue and free and (warmed or not running):
                    slot = free.pop(0)
                    running[slot] = self._start(queue.pop(0), slot, running, append_logs)
                    on_start(running[slot])
                time.sleep(self.poll_seconds)
                for slot, r in list(running.items()):
                    code = r.process.poll()
                    if code is None:
                        continue
                    r.log.close()
                    del running[slot]
                    ended += 1
                    on_done(r, code)
                if on_progress and running and time.time() - last_progress >= progress_interval_s:
                    last_progress = time.time()
                    on_progress(list(running.values()), len(queue), ended)
        finally:
            for r in running.values():  # interrupted: leave no worker behind
                r.process.kill()
                r.process.wait()
                r.log.close()

    def run(self, folders: dict, on_done: Callable[[str, dict], None]) -> None:
        """Run every {id: folder} without a result; ``on_done(id, result)`` as each finishes (this thread)."""
        jobs = []
        for cid, folder in folders.items():
            existing = read_result(folder)
            if existing is not None:
                on_done(cid, existing)
            else:
                jobs.append(Job(cid, [self.python, "-m", "megatron_flash.design.candidates", "--candidate", folder],
                                os.path.join(folder, "train.log")))

        def finished(r: RunningJob, code: int) -> None:
            folder = folders[r.job.key]
            on_done(r.job.key, read_result(folder) or _failure(folder, f"worker exited with code {code} and no result"))

        self.run_jobs(jobs, finished)


class SlurmLauncher:
    """Submits the candidates without a result as one SLURM job array (launch/search_array.sbatch) and waits.

    The job id is handed to ``remember_job`` so a resumed search waits for a still-running array instead of
    submitting the same candidates again (``job_id`` is then given back to :meth:`run`).
    """

    def __init__(self, script: str = os.path.join(REPO, "launch", "search_array.sbatch"),
                 sbatch_args: Optional[list] = None, max_parallel: Optional[int] = None, poll_seconds: float = 30.0):
        self.script, self.sbatch_args = script, list(sbatch_args or [])
        self.max_parallel, self.poll_seconds = max_parallel, poll_seconds

    @staticmethod
    def job_alive(job_id: str) -> bool:
        """Whether any task of the job is still queued or running (a failing squeue counts as alive: retry)."""
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%i"], capture_output=True, text=True)
        if out.returncode != 0:
            return "invalid job id" not in out.stderr.lower()
        return bool(out.stdout.strip())

    def submit(self, manifest: str, count: int) -> str:
        array = f"0-{count - 1}" + (f"%{self.max_parallel}" if self.max_parallel else "")
        cmd = ["sbatch", "--parsable", f"--array={array}",
               f"--output={os.path.join(os.path.dirname(manifest), 'slurm-%A_%a.out')}",
               *self.sbatch_args, self.script, manifest]
        env = {**os.environ, "MF_PYTHON": os.environ.get("MF_PYTHON", sys.executable), "MF_REPO_DIR": REPO}
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if out.returncode != 0:
            raise CandidateError(f"sbatch failed ({shlex.join(cmd)}): {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def run(self, folders: dict, on_done: Callable[[str, dict], None], manifest: str,
            job_id: Optional[str] = None, remember_job: Callable[[str], None] = lambda job: None) -> None:
        pending = {cid: f for cid, f in folders.items() if read_result(f) is None}
        for cid, folder in folders.items():
            if cid not in pending:
                on_done(cid, read_result(folder))
        if not pending:
            return
        if job_id is None or not self.job_alive(job_id):
            with open(manifest, "w", encoding="utf-8") as f:
                f.write("".join(os.path.abspath(folder) + "\n" for folder in pending.values()))
            job_id = self.submit(manifest, len(pending))
            remember_job(job_id)
            print(f"[search] submitted SLURM array job {job_id} ({len(pending)} candidates)", flush=True)
        while pending:
            time.sleep(self.poll_seconds)
            alive = self.job_alive(job_id)
            for cid, folder in list(pending.items()):
                result = read_result(folder)
                if result is None and not alive:
                    result = _failure(folder, f"SLURM job {job_id} ended without a result (see slurm-*.out)")
                if result is not None:
                    del pending[cid]
                    on_done(cid, result)


# --------------------------------------------------------------------------------------------------------------
# Command-line helpers shared by the design tools
# --------------------------------------------------------------------------------------------------------------


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("running candidates")
    g.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: subprocesses on this machine; slurm: a job array of launch/search_array.sbatch")
    g.add_argument("--parallel", type=int, default=1,
                   help="candidates trained at the same time (local launcher; the paper trains 10 in parallel)")
    g.add_argument("--gpus-per-candidate", type=int, default=None,
                   help="local launcher: GPUs per candidate (CUDA_VISIBLE_DEVICES); default 1 when GPUs are "
                        "visible, else none")
    g.add_argument("--threads-per-candidate", type=int, default=None, help="OMP_NUM_THREADS of each candidate")
    g.add_argument("--sbatch-args", default="", help="extra sbatch flags, e.g. '--partition=gpu --time=2:00:00'")
    g.add_argument("--slurm-max-parallel", type=int, help="array throttle (%%N): tasks running at once")
    g.add_argument("--slurm-poll-seconds", type=float, default=30.0)


def launcher_from_args(args):
    if args.launcher == "slurm":
        return SlurmLauncher(sbatch_args=shlex.split(args.sbatch_args), max_parallel=args.slurm_max_parallel,
                             poll_seconds=args.slurm_poll_seconds)
    devices = None
    gpus = args.gpus_per_candidate
    try:
        import torch

        visible = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA
        visible = 0
    if gpus is None:
        gpus = 1 if visible else 0
    if gpus:
        if visible < gpus * args.parallel:
            raise CandidateError(f"--parallel {args.parallel} x --gpus-per-candidate {gpus} needs "
                                 f"{gpus * args.parallel} GPUs; {visible} visible")
        devices = list(range(gpus * args.parallel))
    return LocalLauncher(parallel=args.parallel, devices=devices, threads=args.threads_per_candidate)


def run_folders(launcher, folders: dict, on_done: Callable[[str, dict], None], manifest: str,
                job_id: Optional[str] = None, remember_job: Callable[[str], None] = lambda job: None) -> None:
    """Run {id: folder} with either launcher (the manifest and job id only matter to SLURM)."""
    if isinstance(launcher, SlurmLauncher):
        launcher.run(folders, on_done, manifest, job_id=job_id, remember_job=remember_job)
    else:
        launcher.run(folders, on_done)


def train_many(workdir: str, jobs: dict, rule, launcher, progress: Callable[[str], None] = print) -> dict:
    """Train {name: {"pattern", "hidden", "trainer_args", ...info}} (each in workdir/name) and return
    {name: result}. Folders that already have a result are not trained again, so a rerun resumes."""
    folders = {}
    for name, job in jobs.items():
        folder = os.path.join(workdir, name)
        if not os.path.exists(os.path.join(folder, "candidate.json")):
            info = {k: v for k, v in job.items() if k not in ("trainer_args",)}
            write_candidate(folder, name, rule.megatron_fields(job["pattern"], job["hidden"]), job["trainer_args"],
                            info=info)
        folders[name] = folder
    results, started = {}, time.time()

    def on_done(name: str, result: dict) -> None:
        results[name] = result
        job = jobs[name]
        outcome = (f"val loss {result['valid_loss']:.4f} (ppl {result['valid_ppl']:.3f})"
                   if result.get("status") == "done" else f"FAILED ({result.get('error', '?')[:200]})")
        progress(f"[train] {name} | {job['pattern']} @ {job['hidden']} | {outcome} | {time.time() - started:.0f} s | "
                 f"{len(results)}/{len(jobs)} done")

    run_folders(launcher, folders, on_done, manifest=os.path.join(workdir, "manifest.txt"))
    return results


if __name__ == "__main__":
    sys.exit(main())
