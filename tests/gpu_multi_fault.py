"""A benchmarks/gpu_multi.py worker whose part named by $GPU_MULTI_FAIL_PART raises on every rank, as a bug in the
code under test would (tests/test_gpu_multi.py: the parts after it must still run)."""

import os


def worker(launch: str, options: dict) -> None:
    import gpu_multi

    real_run_part = gpu_multi.run_part

    def run_part(part, opts, checkpoint_dir):
        if part.name == os.environ["GPU_MULTI_FAIL_PART"]:
            raise RuntimeError(f"injected failure in {part.name}")
        return real_run_part(part, opts, checkpoint_dir)

    gpu_multi.run_part = run_part
    gpu_multi.worker(launch, options)
