"""Where our Triton kernels' tests run: on GPUs, or on the CPU under Triton's interpreter, which triton reads from
TRITON_INTERPRET=1 at import, so a test starts it in a subprocess (:func:`run_under_interpreter`)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton_kernels = pytest.mark.skipif(
    not HAVE_TRITON or not (torch.cuda.is_available() or INTERPRETED),
    reason="the Triton kernels run on GPUs, or on the CPU under TRITON_INTERPRET=1 "
           "(each file's test_triton_kernels_under_the_interpreter starts that)")
# the test that starts the interpreter's subprocess: where triton is installed, on the CPU, outside that subprocess
starts_the_interpreter = pytest.mark.skipif(
    not HAVE_TRITON or INTERPRETED or torch.cuda.is_available(),
    reason="needs triton; on GPUs (and inside the interpreter's run) the kernel tests run directly")


def run_under_interpreter(pytest_args: list) -> str:
    """pytest with ``pytest_args`` in a subprocess under TRITON_INTERPRET=1; asserts that it passed and returns its
    summary line (callers check the count: a kernel test that skipped would be missing from it)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return summary
