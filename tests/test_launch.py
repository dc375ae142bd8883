"""The launchers in launch/: shellcheck, dry runs, and real runs of the unchanged scripts.

The SLURM launchers run under a simulated allocation: SLURM_* variables as sbatch sets them, and on PATH an
``srun`` that starts the step's tasks as local processes with SLURM_PROCID/SLURM_LOCALID/SLURM_NODEID (and
forwards signals to them, as srun does) plus an ``scontrol`` that records what it is asked (requeue). Everything
else is real: the tiny model trains on CPU (gloo), is stopped by SIGUSR1 sent to the batch script as SLURM's
``--signal=B:USR1@...`` does, saves, and a second submission resumes from the saved iteration.

docs/cli.md's flag tables are generated from the trainer's parser: ``python tests/test_launch.py --write-cli-doc``
rewrites them, and a test fails when they are out of date.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["common.sh", "local.sh", "pretrain_1b.sh", "pretrain_3b.sh", "pretrain_longctx.sh"]
TRACKER = "latest_checkpointed_iteration.txt"

FAKE_SRUN = r'''#!PYTHON
"""srun for tests: the step's tasks as local processes, with the variables srun gives each task."""
import json, os, signal, subprocess, sys, time

argv = sys.argv[1:]
opts, i = {}, 0
while i < len(argv) and argv[i].startswith("-"):
    key, _, value = argv[i].partition("=")
    opts[key] = value
    i += 1
cmd = argv[i:]
if not cmd:
    sys.exit("srun (test): no command")
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write(json.dumps({"srun": argv}) + "\n")
nodes = int(opts.get("--nodes", opts.get("-N", "1")))
total = int(opts.get("--ntasks", opts.get("-n", "0")) or 0)
per_node = int(opts.get("--ntasks-per-node", "0") or 0) or max(1, total // nodes)
total = total or nodes * per_node
procs = []
for rank in range(total):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
               SLURM_NODEID=str(rank // per_node), SLURM_NTASKS=str(total), SLURM_STEP_NUM_TASKS=str(total),
               SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_ID="0")
    procs.append(subprocess.Popen(cmd, env=env))

def forward(signum, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)

for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
status = 0
while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed and "--kill-on-bad-exit" in opts:  # like srun --kill-on-bad-exit=1
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.1)
codes = [p.returncode for p in procs]
bad = [c for c in codes if c != 0]
sys.exit((128 - bad[0] if bad[0] < 0 else bad[0]) if bad else 0)
'''

FAKE_SCONTROL = r'''#!/usr/bin/env bash
# scontrol for tests: records the request
printf '{"scontrol": "%s"}\n' "$*" >> "$FAKE_SLURM_LOG"
'''


# --- helpers -------------------------------------------------------------------------------------------------

def _write_exe(path, text):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _free_job_id() -> int:
    """A SLURM job id whose rendezvous port (megatron_flash.runtime: 20000 + id % 10000) is free here."""
    for _ in range(100):
        job = random.randint(100000, 999999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job % 10000))
            except OSError:
                continue
        return job
    raise RuntimeError("no free port for the simulated job")


def _fake_slurm(tmp_path, nodes: int, tasks_per_node: int) -> dict:
    """Environment of a simulated sbatch allocation (fake srun/scontrol first on PATH)."""
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir(exist_ok=True)
    _write_exe(bin_dir / "srun", FAKE_SRUN.replace("#!PYTHON", "#!" + sys.executable))
    _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    job = _free_job_id()
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(tmp_path / "slurm_calls.jsonl"),
        "SLURM_JOB_ID": str(job), "SLURM_JOBID": str(job), "SLURM_JOB_NAME": "nemotron-flash-test",
        # two "nodes" that both resolve to this machine; the runtime takes the first as rendezvous host
        "SLURM_JOB_NODELIST": f"127.0.0.[1-{nodes}]" if nodes > 1 else "127.0.0.1",
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_SUBMIT_DIR": REPO,
    }


def _slurm_calls(env) -> list:
    path = env["FAKE_SLURM_LOG"]
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _base_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MF_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


# tiny preset on mock data, CPU, a few iterations; everything else from the recipe (bf16, distributed optimizer...)
TINY = {"MF_PRESET": "tiny", "MF_SEQ_LENGTH": "64", "MF_MICRO_BATCH": "2", "MF_GLOBAL_BATCH": "4",
        "MF_LR": "3e-3", "MF_MIN_LR": "3e-4", "MF_WARMUP_ITERS": "2", "MF_SAVE_INTERVAL": "1000",
        "MF_EVAL_INTERVAL": "1000", "MF_EVAL_ITERS": "0", "MF_LOG_INTERVAL": "1"}


def _launch(script, env, args=(), signal_at=None, sig=signal.SIGUSR1, timeout=300):
    """Run launch/SCRIPT to the end; with ``signal_at`` send ``sig`` to the script once that iteration is logged.

    Returns (exit status, output).
    """
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline, sent = [], time.monotonic() + timeout, False
    try:
        for line in proc.stdout:
            lines.append(line)
            match = re.match(r"iteration\s+(\d+) \|", line)
            if signal_at is not None and not sent and match and int(match.group(1)) >= signal_at:
                proc.send_signal(sig)  # to the batch script only, as SLURM's --signal=B:USR1@... does
                sent = True
            if time.monotonic() > deadline:
                raise TimeoutError(f"{script} did not finish in {timeout} s")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "".join(lines)


def _tracker(folder) -> int:
    with open(os.path.join(folder, TRACKER), encoding="utf-8") as fh:
        return int(fh.read().strip())


def _dry_run(script, extra_env, args=()) -> str:
    env = _base_env({"MF_DRY_RUN": "1", **extra_env})
    env["PATH"] = os.pathsep.join([env.get("FAKE_FAIL_BIN", ""), env["PATH"]]).lstrip(os.pathsep)
    out = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _trainer_args(output: str) -> list:
    """The trainer's arguments from the first task command a dry run prints."""
    import shlex

    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "each running:" in line or line.startswith("[launch] this node runs"):
            words = shlex.split(lines[i + 1])
            return words[words.index("megatron_flash.pretrain") + 1:]
    raise AssertionError("no command in the dry run output:\n" + output)


def _value(args: list, flag: str):
    """The last value given to ``flag`` (argparse keeps the last), or True for a present switch."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag:
            nxt = args[i + 1] if i + 1 < len(args) else None
            found = nxt if nxt is not None and not nxt.startswith("--") else True
    return found


# --- static checks ---------------------------------------------------------------------------------------------

def test_shellcheck_passes_on_launch():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    shell_files = sorted(os.path.join("launch", f) for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch")))
    assert set(SCRIPTS) <= {os.path.basename(f) for f in shell_files}
    out = subprocess.run(["shellcheck", "-x", *shell_files], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_mf_variable_is_documented():
    used = set()
    for script in SCRIPTS:
        with open(os.path.join(LAUNCH, script), encoding="utf-8") as fh:
            used |= set(re.findall(r"\bMF_[A-Z0-9_]+", fh.read()))
    internal = {v for v in used if v.startswith(("MF_ARGS", "MF_CMD", "MF_CHILD", "MF_FORWARD_TO", "MF_GOT_",
                                                  "MF_WAIT_", "MF_RC", "MF_TRACKER", "MF_ENV_NAMES", "MF_SCRIPT",
                                                  "MF_CONTAINER_ARGS", "MF_RECIPE_NAME"))
                or v.endswith("_NOTE")}
    with open(os.path.join(LAUNCH, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    missing = sorted(v for v in used - internal if f"`{v}`" not in readme)
    assert not missing, f"launch/README.md does not document {missing}"


def test_sbatch_headers():
    for script, signal_spec in (("pretrain_1b.sh", "B:USR1@300"), ("pretrain_3b.sh", "B:USR1@600"),
                                ("pretrain_longctx.sh", "B:USR1@600")):
        with open(os.path.join(LAUNCH, script), encoding="utf-8") as fh:
            header = [line.strip() for line in fh if line.startswith("#SBATCH")]
        assert "#SBATCH --requeue" in header, script
        assert f"#SBATCH --signal={signal_spec}" in header, script
        assert "#SBATCH --ntasks-per-node=8" in header and "#SBATCH --gpus-per-node=8" in header, script


# --- dry runs -------------------------------------------------------------------------------------------------

@pytest.fixture
def no_srun(tmp_path):
    """PATH entries whose srun/scontrol fail loudly: a dry run must not start anything."""
    bin_dir = tmp_path / "fail_bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        _write_exe(bin_dir / name, f"#!/bin/sh\necho '{name} must not run in a dry run' >&2\nexit 99\n")
    return str(bin_dir)


def test_dry_run_prints_each_node_command_with_the_recipe(tmp_path, no_srun):
    out = _dry_run("pretrain_1b.sh", {"FAKE_FAIL_BIN": no_srun, "MF_TOKENIZER_MODEL": "/models/tok",
                                      "MF_DATA_ROOT": str(tmp_path / "data"), "MF_OUTPUT_ROOT": str(tmp_path)},
                   ["--log-interval", "5"])
    assert "srun --nodes=4 --ntasks-per-node=8 --ntasks=32 --kill-on-bad-exit=1" in out  # from the #SBATCH header
    assert [f"SLURM_PROCID {n * 8}-{n * 8 + 7}" in out for n in range(4)] == [True] * 4
    args = _trainer_args(out)
    expected = {"--preset": "nemotron_flash_1b", "--tensor-model-parallel-size": "1", "--global-batch-size": "512",
                "--micro-batch-size": "8", "--seq-length": "4096", "--lr": "1e-3", "--lr-decay-style": "cosine",
                "--weight-decay": "0", "--bf16": True, "--use-distributed-optimizer": True,
                "--overlap-grad-reduce": True, "--train-tokens": "4500000000000", "--tokenizer-model": "/models/tok", "--log-interval": "5",
                "--split": "99,1,0"}
    assert {k: _value(args, k) for k in expected} == expected and "--overlap-param-gather" not in args
    ckpt = str(tmp_path / "nemotron_flash_1b" / "checkpoints")
    assert _value(args, "--save") == ckpt and _value(args, "--load") == ckpt
    # phase 1 mixture (no held-out sources): --data-path from build_blend (planned with --estimate: no data yet)
    assert args[args.index("--data-path") + 1:args.index("--data-path") + 3] == [
        "1", str(tmp_path / "data" / "zyda2" / "zyda2_text_document")]
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in out and "export NCCL_NVLS_ENABLE=0" in out
    assert "TRITON_CACHE_DIR=/tmp/" in out
    assert not os.path.exists(tmp_path / "nemotron_flash_1b"), "a dry run must not write anything"


def test_dry_run_3b_environment_overrides_and_container(tmp_path, no_srun):
    out = _dry_run("pretrain_3b.sh", {"FAKE_FAIL_BIN": no_srun, "MF_OUTPUT_ROOT": str(tmp_path), "MF_NODES": "2",
                                      "MF_TP": "2", "MF_CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.01-py3",
                                      "NCCL_NVLS_ENABLE": "1", "MF_OVERLAP_PARAM_GATHER": "1"}, ["--mock-data"])
    assert "srun --nodes=2 --ntasks-per-node=8 --ntasks=16" in out
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in out and f"--container-workdir={REPO}" in out
    args = _trainer_args(out)
    assert _value(args, "--preset") == "nemotron_flash_3b" and _value(args, "--micro-batch-size") == "2"
    assert _value(args, "--tensor-model-parallel-size") == "2" and _value(args, "--sequence-parallel") is True
    assert _value(args, "--mock-data") is True and "--data-path" not in args
    assert _value(args, "--overlap-param-gather") is True and _value(args, "--overlap-grad-reduce") is True
    assert "export NCCL_NVLS_ENABLE=1" in out  # the environment wins over the launcher's defaults


def test_dry_run_with_a_preset_file_passes_it_instead_of_the_preset(tmp_path, no_srun):
    shape = tmp_path / "candidate.json"
    shape.write_text("{}")
    out = _dry_run("pretrain_1b.sh", {"FAKE_FAIL_BIN": no_srun, "MF_OUTPUT_ROOT": str(tmp_path),
                                      "MF_PRESET_FILE": str(shape)}, ["--mock-data"])
    args = _trainer_args(out)
    assert _value(args, "--preset-file") == str(shape) and "--preset" not in args
    assert f"model {shape}" in out


@pytest.mark.parametrize("env,message", [
    ({"MF_GLOBAL_BATCH": "100"}, "MF_GLOBAL_BATCH=100 is not divisible"),
    ({"MF_TP": "3"}, "32 processes are not divisible by MF_TP=3"),
    ({"MF_TP": "two"}, "MF_TP must be a positive integer"),
    ({"MF_DATA_ROOT": "/data"}, "set MF_TOKENIZER_MODEL"),
    ({"MF_TOKENIZER_MODEL": "/t", "MF_MIXTURE": "nope.yaml"}, "MF_MIXTURE=nope.yaml: no such file"),
    ({"MF_PRESET_FILE": "/nowhere/candidate.json"}, "MF_PRESET_FILE=/nowhere/candidate.json: no such file"),
    ({"MF_DRY_RUN": "0", "MF_TOKENIZER_MODEL": "/t"}, "not inside a SLURM allocation"),
])
def test_clear_errors(tmp_path, no_srun, env, message):
    env = _base_env({"MF_DRY_RUN": "1", "MF_OUTPUT_ROOT": str(tmp_path), **env})
    env["PATH"] = no_srun + os.pathsep + env["PATH"]
    out = subprocess.run(["bash", os.path.join(LAUNCH, "pretrain_1b.sh")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr, out.stdout + out.stderr


# --- real runs ------------------------------------------------------------------------------------------------

def test_slurm_1b_stops_on_the_pre_timeout_signal_requeues_and_resumes(tmp_path):
    """pretrain_1b.sh, unchanged, on 2 simulated nodes x 1 task: SIGUSR1 -> save + requeue; resubmit -> resume."""
    slurm = _fake_slurm(tmp_path, nodes=2, tasks_per_node=1)
    env = _base_env({**slurm, **TINY, "MF_TRAIN_ITERS": "40", "MF_OUTPUT_ROOT": str(tmp_path / "runs")})
    ckpt = tmp_path / "runs" / "nemotron_flash_1b" / "checkpoints"

    rc, out = _launch("pretrain_1b.sh", env, ["--mock-data"], signal_at=3)
    assert rc == 0, out
    saved = re.search(r"exit signal received: saving at iteration (\d+)", out)
    assert saved, out
    stopped_at = int(saved.group(1))
    assert 3 <= stopped_at < 40, out
    assert _tracker(ckpt) == stopped_at
    assert "TP 1 PP 1 DP 2" in out  # two ranks from SLURM_PROCID / SLURM_NTASKS
    calls = _slurm_calls(env)
    srun = [c["srun"] for c in calls if "srun" in c]
    assert len(srun) == 1 and "--nodes=2" in srun[0] and "--ntasks-per-node=1" in srun[0]
    assert {"scontrol": f"requeue {env['SLURM_JOB_ID']}"} in calls, calls

    rc, out = _launch("pretrain_1b.sh", env, ["--mock-data"])  # the requeued job: same script, same environment
    assert rc == 0, out
    assert f"resuming from iteration {stopped_at}" in out
    assert re.search(rf"resumed from \S+iter_{stopped_at:07d} at iteration {stopped_at}\b", out), out
    assert re.search(rf"iteration\s+{stopped_at + 1} \|", out) and not re.search(rf"iteration\s+{stopped_at} \|", out)
    assert _tracker(ckpt) == 40
    assert sum("scontrol" in c for c in _slurm_calls(env)) == 1  # finished: no second requeue


@pytest.fixture(scope="module")
def sample_data_root(tmp_path_factory):
    """A data root laid out as data_prep/mixtures/sample_corpus.yaml expects, from the data tests' sample corpus."""
    from tests import test_data_fixtures as fx

    root = tmp_path_factory.mktemp("data_root")
    (root / "sample").mkdir()
    for split, source in (("train", "train.jsonl"), ("valid", "valid.jsonl")):
        corpus = os.path.join(fx.sample_corpus(), source)
        if split == "train":  # the fixture corpus is sharded: use one shard
            corpus = fx.train_files()[0]
        subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", corpus,
                        "--output-prefix", str(root / "sample" / split), "--tokenizer-type", "HuggingFaceTokenizer",
                        "--tokenizer-model", fx.hf_tokenizer_dir(), "--append-eod", "--no-progress-bar"],
                       cwd=REPO, check=True, capture_output=True)
    return str(root), fx.hf_tokenizer_dir()


def test_local_two_cpu_processes_on_the_sample_mixture_stop_on_sigterm_and_resume(tmp_path, sample_data_root):
    """local.sh (torchrun, 2 gloo processes) with the blend built from a data_prep mixture; SIGTERM -> save."""
    root, tokenizer = sample_data_root
    env = _base_env({**TINY, "MF_NPROC": "2", "MF_TRAIN_ITERS": "30", "MF_OUTPUT_ROOT": str(tmp_path / "runs"),
                     "MF_MIXTURE": "data_prep/mixtures/sample_corpus.yaml", "MF_DATA_ROOT": root,
                     "MF_TOKENIZER_MODEL": tokenizer, "MF_EVAL_INTERVAL": "10", "MF_EVAL_ITERS": "1"})
    run_dir = tmp_path / "runs" / "nemotron_flash_1b"
    rc, out = _launch("local.sh", env, signal_at=2, sig=signal.SIGTERM)
    assert rc == 0, out
    blend = json.loads((run_dir / "blend.json").read_text())
    assert blend["train"] == ["1", os.path.join(root, "sample", "train_text_document")]
    assert blend["valid"] == ["1", os.path.join(root, "sample", "valid_text_document")]
    stopped_at = int(re.search(r"exit signal received: saving at iteration (\d+)", out).group(1))
    assert _tracker(run_dir / "checkpoints") == stopped_at < 30

    rc, out = _launch("local.sh", env)
    assert rc == 0, out
    assert f"resumed from {run_dir / 'checkpoints'}/iter_{stopped_at:07d} at iteration {stopped_at}" in out
    assert "validation at iteration 30" in out
    assert _tracker(run_dir / "checkpoints") == 30
    assert os.listdir(run_dir / "tensorboard")


def test_longctx_continues_phase1_with_its_own_schedule(tmp_path):
    """pretrain_longctx.sh under SLURM: --load phase 1, new sequence length, data from the start, cosine MF_LR ->
    MF_MIN_LR over the phase; TP 2 with sequence parallelism (the 3B's layout) on 2 CPU processes."""
    slurm = _fake_slurm(tmp_path, nodes=1, tasks_per_node=2)
    runs = tmp_path / "runs"
    phase1 = _base_env({**slurm, **TINY, "MF_TRAIN_ITERS": "6", "MF_OUTPUT_ROOT": str(runs)})
    rc, out = _launch("pretrain_1b.sh", phase1, ["--mock-data"])
    assert rc == 0, out
    assert _tracker(runs / "nemotron_flash_1b" / "checkpoints") == 6

    env = _base_env({**slurm, **TINY, "MF_OUTPUT_ROOT": str(runs), "MF_SEQ_LENGTH": "96", "MF_GLOBAL_BATCH": "2",
                     "MF_MICRO_BATCH": "1", "MF_TRAIN_ITERS": "5", "MF_LR": "1e-3", "MF_MIN_LR": "1e-4",
                     "MF_PHASE1_GLOBAL_BATCH": "4", "MF_TP": "2"})
    rc, out = _launch("pretrain_longctx.sh", env, ["--mock-data"])
    assert rc == 0, out
    assert "TP 2 PP 1 DP 1" in out
    assert "sequence length changes from 64 to 96" in out
    assert re.search(r"resumed from \S+nemotron_flash_1b/checkpoints/iter_0000006 at iteration 6\b", out), out
    lrs = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"iteration\s+(\d+) \| loss \S+ \| lr (\S+)", out)}
    assert sorted(lrs) == [7, 8, 9, 10, 11], out
    import math

    for it, lr in lrs.items():  # a cosine over the 5 iterations of this phase
        expected = 1e-4 + 0.5 * (1 + math.cos(math.pi * (it - 6) / 5)) * (1e-3 - 1e-4)
        assert lr == pytest.approx(expected, rel=1e-3), (it, lr, expected)
    phase2 = runs / "nemotron_flash_1b_longctx"
    assert _tracker(phase2 / "checkpoints") == 11
    assert (phase2 / "phase1_iteration.txt").read_text().strip() == "6"

    # a requeued phase 2 continues phase 2 (its own checkpoint, data position kept)
    args = _trainer_args(_dry_run("pretrain_longctx.sh", {**env, "MF_DRY_RUN": "1"}, ["--mock-data"]))
    assert _value(args, "--load") == str(phase2 / "checkpoints") and "--reset-data-position" not in args
    assert _value(args, "--seq-length") == "96" and _value(args, "--train-iters") == "11"


def test_longctx_refuses_flags_it_computes(tmp_path, no_srun):
    env = _base_env({"MF_DRY_RUN": "1", "MF_OUTPUT_ROOT": str(tmp_path), "PATH": no_srun + os.pathsep
                     + os.environ["PATH"]})
    out = subprocess.run(["bash", os.path.join(LAUNCH, "pretrain_longctx.sh"), "--mock-data"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "has no latest_checkpointed_iteration.txt: train phase 1 first" in out.stderr
    ckpt = tmp_path / "p1"
    ckpt.mkdir()
    (ckpt / TRACKER).write_text("100\n")
    (ckpt / "iter_0000100").mkdir()
    env["MF_PHASE1_DIR"] = str(ckpt)
    out = subprocess.run(["bash", os.path.join(LAUNCH, "pretrain_longctx.sh"), "--mock-data", "--train-iters", "5"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "computes --train-iters itself" in out.stderr
    args = _trainer_args(_dry_run("pretrain_longctx.sh", {"MF_OUTPUT_ROOT": str(tmp_path), "MF_PHASE1_DIR": str(ckpt),
                                                          "FAKE_FAIL_BIN": no_srun}, ["--mock-data"]))
    # 100 phase-1 steps of 512 samples = 800 steps of 64; this phase: 20B tokens / (64 x 29696) = 10524 steps
    assert _value(args, "--seq-length") == "29696" and _value(args, "--tensor-model-parallel-size") == "1"
    assert _value(args, "--train-iters") == str(100 + 10524) and _value(args, "--lr-decay-iters") == str(800 + 10524)
    assert _value(args, "--lr-wsd-decay-iters") == "10524" and _value(args, "--lr-decay-style") == "wsd"
    assert _value(args, "--load") == str(ckpt) and _value(args, "--reset-data-position") is True
    assert _value(args, "--override-opt-param-scheduler") is True and _value(args, "--recompute-activations") is True
    args = _trainer_args(_dry_run("pretrain_longctx.sh", {"MF_OUTPUT_ROOT": str(tmp_path), "MF_PHASE1_DIR": str(ckpt),
                                                          "MF_MODEL": "3b", "FAKE_FAIL_BIN": no_srun},
                                  ["--mock-data"]))
    assert _value(args, "--preset") == "nemotron_flash_3b" and _value(args, "--tensor-model-parallel-size") == "2"
    assert _value(args, "--sequence-parallel") is True


# --- docs/cli.md ----------------------------------------------------------------------------------------------

CLI_DOC = os.path.join(REPO, "docs", "cli.md")
GENERATED = {  # section name -> the function that builds its argparse parser
    "trainer": "megatron_flash.training.arguments:build_parser",
    "quickstart": "megatron_flash.quickstart:build_parser",
}


# Meanings of the flags whose parser entry has no help text (Megatron-LM's meaning in every case). A flag with
# neither fails test_cli_doc_lists_every_flag, so a new flag cannot go undocumented.
FLAG_NOTES = {
    "--tensor-model-parallel-size": "tensor parallelism (TP): each layer's matrices split over TP GPUs",
    "--pipeline-model-parallel-size": "pipeline stages (PP): `|` in the layer pattern places the stage boundaries, "
                                      "else an even split",
    "--sequence-parallel": "shard the norms' and residual activations along the sequence over the TP group "
                           "(needs TP > 1; sequence + meta tokens divisible by TP)",
    "--use-distributed-optimizer": "shard the fp32 main weights and Adam moments over the data-parallel ranks",
    "--overlap-grad-reduce": "overlap the data-parallel gradient reduction with the backward pass",
    "--micro-batch-size": "sequences per forward/backward pass on each rank",
    "--seq-length": "tokens per training sequence (the model's meta tokens come on top)",
    "--train-iters": "training iterations (optimizer steps); or --train-tokens",
    "--lr": "peak learning rate",
    "--min-lr": "learning rate at the end of the decay",
    "--lr-decay-style": "learning-rate decay after the warmup (wsd: constant, then a cosine decay over "
                        "--lr-wsd-decay-iters)",
    "--lr-warmup-iters": "linear warmup from 0 over this many iterations",
    "--weight-decay": "Adam weight decay (decoupled, AdamW; the Nemotron-Flash recipe uses 0)",
    "--adam-beta1": "Adam beta1",
    "--adam-beta2": "Adam beta2",
    "--adam-eps": "Adam epsilon",
    "--clip-grad": "clip the global gradient norm to this value (0: no clipping)",
    "--bf16": "bf16 weights and activations, fp32 main weights, optimizer states and gradient reduction",
    "--split": "train,valid,test shares of each --data-path prefix's documents",
    "--tokenizer-type": "HuggingFaceTokenizer, SentencePieceTokenizer or NullTokenizer (docs/data.md)",
    "--save-interval": "iterations between checkpoints (the last iteration is always saved)",
    "--eval-interval": "iterations between validations",
    "--eval-iters": "validation batches per evaluation (0: no validation)",
    "--tensorboard-dir": "TensorBoard event folder (written by the last rank)",
    "--log-interval": "iterations per console log line (and throughput / MFU figures)",
}
_METAVARS = {int: "N", float: "X"}


def _markers(name):
    return (f"<!-- {name} flags: generated by `python tests/test_launch.py --write-cli-doc` -->",
            f"<!-- end of generated {name} flags -->")


def render_flags(name: str) -> str:
    """Markdown tables of every flag of a parser (by argument group), between the section's markers."""
    import argparse
    import importlib

    module, func = GENERATED[name].split(":")
    parser = getattr(importlib.import_module(module), func)()
    begin, end = _markers(name)
    out = [begin]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = "general" if group.title in ("options", "optional arguments") else group.title
        out += ["", f"#### {title}", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for a in actions:
            flag = ", ".join(f"`{o}`" for o in a.option_strings)
            if a.nargs == 0:
                default = "off" if a.default is False else "on" if a.default is True else ""
            else:
                metavar = a.metavar or _METAVARS.get(a.type) or ("NAME" if a.choices else "VALUE")
                flag += f" `{metavar}`" + (" ..." if a.nargs in ("*", "+") else "")
                default = "" if a.default is None else f"`{a.default}`"
            meaning = a.help or FLAG_NOTES.get(a.option_strings[0])
            assert meaning, f"{a.option_strings[0]} ({name}) has no help text: add one to its parser or FLAG_NOTES"
            meaning = meaning.replace("%%", "%").replace("|", "\\|")
            if a.choices:
                meaning = (meaning + "; " if meaning else "") + "one of " + ", ".join(f"`{c}`" for c in a.choices)
            out.append(f"| {flag} | {default} | {meaning} |")
    out += ["", end]
    return "\n".join(out)


def _read_cli_doc() -> str:
    with open(CLI_DOC, encoding="utf-8") as fh:
        return fh.read()


def _generated_section(text: str, name: str):
    begin, end = _markers(name)
    start, stop = text.find(begin), text.find(end)
    assert start >= 0 and stop > start, f"{CLI_DOC} lacks the markers of the generated {name} flags"
    return start, stop + len(end)


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_cli_doc_lists_every_flag(name):
    text = _read_cli_doc()
    start, stop = _generated_section(text, name)
    assert text[start:stop] == render_flags(name), \
        f"docs/cli.md's {name} flags are out of date: run python tests/test_launch.py --write-cli-doc"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-cli-doc"]:
        sys.path.insert(0, REPO)
        text = _read_cli_doc()
        for section in GENERATED:
            start, stop = _generated_section(text, section)
            text = text[:start] + render_flags(section) + text[stop:]
        with open(CLI_DOC, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {CLI_DOC}")
    else:
        sys.exit("usage: python tests/test_launch.py --write-cli-doc")
