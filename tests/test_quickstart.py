"""README command 1, ``python -m megatron_flash.quickstart``, end to end with fewer steps and a smaller corpus.

Everything is real: the stdlib corpus, a trained tokenizer, preprocessing, the blend, the tiny model trained on CPU,
stopped halfway by --exit-interval and resumed with --load, and (when tools/convert_to_hf.py exists) the Hugging
Face export and generation. A rerun skips every finished stage.
"""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--size-mb", "0.5", "--vocab-size", "512", "--train-iters", "20", "--seq-length", "64",
         "--micro-batch-size", "4"]


def _quickstart(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "megatron_flash.quickstart", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quickstart_runs_every_stage_then_skips_them(tmp_path):
    work = tmp_path / "qs"
    run = _quickstart(["--workdir", str(work), *SMALL])
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    export = os.path.isfile(os.path.join(REPO, "tools", "convert_to_hf.py"))
    stages = 8 if export else 6
    assert re.findall(r"=== \[(\d+)/(\d+)\]", run.stdout) == [(str(i), str(stages)) for i in range(1, stages + 1)]
    # the first run stops at half (--exit-interval 10), the second resumes from that checkpoint
    assert "saved checkpoint at iteration 10" in out
    assert f"resumed from {work / 'checkpoints'}/iter_0000010 at iteration 10" in out
    assert "saved checkpoint at iteration 20" in out
    assert (work / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    assert f"TensorBoard logs: {work / 'tensorboard'}" in out
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(work / "tensorboard"))
    assert re.search(r"validation at iteration \d+: loss \d", out)
    if export:
        assert (work / "hf_model" / "config.json").is_file()
        assert out.count("--- prompt ") == 4
    assert "quickstart finished" in out

    again = _quickstart(["--workdir", str(work), *SMALL])
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert out.count("already done") == (7 if export else 6), out  # generation reruns; nothing else does
    assert "iteration " not in re.sub(r"(checkpoint at|continue to) iteration \d+", "", out.split("=== [7/")[0])


def test_quickstart_reports_a_failed_stage_clearly(tmp_path):
    run = _quickstart(["--workdir", str(tmp_path / "qs"), "--size-mb", "0.1", "--vocab-size", "100"], timeout=300)
    assert run.returncode == 1
    assert "quickstart error: stage 'tokenizer' failed (exit status 2)" in run.stderr, run.stdout + run.stderr
    assert "--vocab-size 100 is too small" in run.stderr
    assert "rerun the quickstart: finished stages are skipped" in run.stderr


def test_quickstart_rejects_bad_settings(tmp_path):
    run = _quickstart(["--workdir", str(tmp_path / "qs"), "--train-iters", "1"], timeout=120)
    assert run.returncode == 1 and "--train-iters must be at least 2" in run.stderr
