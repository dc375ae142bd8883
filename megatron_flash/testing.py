"""Run a function in N local processes that form one torch.distributed job (gloo on CPU, NCCL on GPUs).

Used by the tests to check TP/PP/DP equivalence and by benchmarks; nothing leaves the loopback interface.
:func:`weight_norm_invariants` is the per-step check both use on the optimizer's state; :func:`relative_error`,
:func:`step_times_ms` / :func:`median_ms` and :class:`CheckReport` are what the GPU check scripts and benchmarks
(benchmarks/) measure with and report through; :class:`OpTrace` records the aten ops a piece of code runs.

    def body(tp):                      # module-level, so spawned processes can import it
        ...                            # runtime.initialize() has already run: groups and seeds are set
        return {"loss": loss.item()}   # anything torch.save can write

    results = run_distributed(body, world_size=2, tensor_model_parallel_size=2, args=(2,))
    results[rank]  # -> what rank returned
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from unittest import mock

import zlib

import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_flash import runtime


def _entry(local_rank, fn, args, world_size, port, tp, pp, seed, outdir, extra_env):
    os.environ.update(extra_env)
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = os.path.join(outdir, f"rank{local_rank}.pt")
    try:
        runtime.initialize(tp, pp, seed=seed, timeout_minutes=5)
        result = fn(*args)
        runtime.shutdown()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def run_distributed(
    fn,
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    args: tuple = (),
    seed: int = 1234,
    timeout: float = 300.0,
    env: dict | None = None,
) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks after :func:`runtime.initialize`; return each rank's result.

    Raises RuntimeError with the failing rank's traceback, or on timeout (the processes are killed).
    """
    extra_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    # NCCL takes one GPU per rank: with fewer, the ranks run on the CPU with gloo, as on a machine without one. The
    # ranks must not see the GPU from birth: unpickling ``fn`` imports its module (fla, megatron), which may query
    # CUDA before _entry runs, and CUDA reads CUDA_VISIBLE_DEVICES only once
    hide_gpus = torch.cuda.is_available() and world_size > torch.cuda.device_count()
    # (patch.dict sets the variable in this process while the ranks spawn and run, then restores it)
    with tempfile.TemporaryDirectory(prefix="mf_dist_") as outdir, mock.patch.dict(
            os.environ, {"CUDA_VISIBLE_DEVICES": ""} if hide_gpus else {}):
        ctx = mp.start_processes(
            _entry,
            args=(fn, args, world_size, runtime.free_port(), tensor_model_parallel_size,
                  pipeline_model_parallel_size, seed, outdir, extra_env),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"distributed run of {fn.__name__} timed out after {timeout:.0f} s")
        except mp.ProcessRaisedException as exc:
            raise RuntimeError(_first_error(outdir, world_size) or str(exc)) from None
        except mp.ProcessExitedException as exc:
            raise RuntimeError(_first_error(outdir, world_size) or str(exc)) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            out = torch.load(os.path.join(outdir, f"rank{rank}.pt"), weights_only=False)
            results.append(out["result"])
        return results


def _first_error(outdir, world_size):
    """Every failed rank's traceback, the root cause first (others often only report a closed connection)."""
    errors = []
    for rank in range(world_size):
        path = os.path.join(outdir, f"rank{rank}.pt")
        if os.path.exists(path):
            out = torch.load(path, weights_only=False)
            if not out["ok"]:
                errors.append((rank, out["error"]))
    errors.sort(key=lambda e: "by peer" in e[1] or "Connection reset" in e[1])
    return "\n".join(f"rank {rank} failed:\n{error}" for rank, error in errors) or None


@torch.no_grad()
def init_layout_invariant(model, global_name=lambda name: name, seed: int = 0, std: float = 0.02) -> None:
    """Re-initialize every parameter from its global name, the same way under any TP/PP layout.

    megatron initializes layers in construction order, so a pipeline stage or a TP rank draws different numbers
    than one process would. Tests that compare layouts need identical models: each full logical tensor is drawn
    from a generator seeded by its global name, then this rank's TP shard is taken.
    """
    from megatron.core import parallel_state as ps

    from megatron_flash.models.layout import is_tp_sharded, shard_of

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        full_shape = list(param.shape)
        if is_tp_sharded(param):
            full_shape[param.partition_dim] *= tp
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name(name).encode()))
        full = torch.randn(full_shape, generator=gen, dtype=torch.float32)
        full = full * std if param.dim() >= 2 else 1.0 + 0.1 * full
        param.copy_(shard_of(full, param, tp, tp_rank))


@torch.no_grad()
def weight_norm_invariants(optimizer) -> dict:
    """The weight-normalization invariants after an optimizer step, on the full matrices.

    ``worst_norm_error``: the largest |norm - 1| over the normalized rows/columns of every full (TP-gathered,
    DP-assembled) fp32 main param; ``checked_matrices``: how many matrices that covers (0 would make the check
    vacuous); ``bf16_mismatches``: how many low-precision model params differ from their rounded main param.
    Collective: every rank calls it (the distributed optimizer's shards are assembled with all-reduces over DP, TP
    shards with all-gathers); each rank reports its own pipeline stage.
    """
    from megatron.core import parallel_state as ps

    from megatron_flash.models import layout
    from megatron_flash.training.checkpointing import _full, _optimizer_entries

    worst, checked, mismatched = 0.0, 0, 0
    for _, model_param, main_param, start, group in _optimizer_entries(optimizer):
        full_main = _full(model_param, main_param, start, group)
        if model_param.dtype != torch.float32:
            mismatched += int(not torch.equal(full_main.to(model_param.dtype), model_param.data))
        kind = getattr(model_param, "weight_norm", None)
        if kind is None:
            continue
        full = layout.gather_full(full_main, model_param, ps.get_tensor_model_parallel_group())
        norms = full.norm(dim=1 if kind == "rows" else 0)
        worst = max(worst, float((norms - 1).abs().max()))
        checked += 1
    return {"worst_norm_error": worst, "checked_matrices": checked, "bf16_mismatches": mismatched}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (the measure every GPU check reports against its reference)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def step_times_ms(step, warmup: int = 2, iters: int = 5, cuda: bool | None = None) -> list:
    """Milliseconds of each of ``iters`` calls of ``step()`` after ``warmup`` calls: CUDA events on a GPU (``cuda``
    defaults to whether one is available), the wall clock otherwise."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def median_ms(step, warmup: int = 2, iters: int = 5) -> float:
    """Median of :func:`step_times_ms`."""
    return statistics.median(step_times_ms(step, warmup, iters))


def time_and_compare(variants: dict, run, want: list, keys: tuple, warmup: int, iters: int) -> dict:
    """A kernel benchmark's table: for each named variant ``fn``, ``run(fn)`` (it returns the results and gradients,
    one per ``keys`` entry) timed as the median ms of ``iters`` calls after ``warmup``, and the relative error of each
    result against ``want``; each row printed as it is done."""
    rows = {}
    for name, fn in variants.items():
        got = run(fn)
        rows[name] = {"fwd_bwd_ms": round(median_ms(lambda: run(fn), warmup, iters), 4),
                      **{f"rel_diff_{key}": relative_error(g, r) for key, g, r in zip(keys, got, want, strict=True)}}
        print(f"{name:10s} {rows[name]}", flush=True)
    return rows


def kernel_benchmark_arguments(description: str, argv=None) -> argparse.Namespace:
    """The kernel benchmarks' flags: ``--out DIR`` (default $OUT, else the current folder) and ``--smoke``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true")
    return parser.parse_args(argv)


def write_json(folder: str, file_name: str, results: dict) -> dict:
    """``results`` to folder/file_name (the folder made if needed); returns them."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, file_name), "w") as f:
        json.dump(results, f, indent=1)
    return results


class OpTrace(TorchDispatchMode):
    """Every aten op run: its name, the shapes/dtypes of its tensor arguments and its other arguments."""

    # Ops that read a tensor's value on the host (or size an output by it): a device synchronization, and a value
    # frozen into a CUDA graph at capture.
    HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "item", "unique", "_unique2"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def describe(a):
            if isinstance(a, torch.Tensor):
                return ("tensor", tuple(a.shape), a.dtype)
            if isinstance(a, (list, tuple)):
                return tuple(describe(x) for x in a)
            return repr(a)

        self.ops.append((func.__name__, describe(args), describe(sorted(kwargs.items()))))
        return func(*args, **kwargs)

    def host_reads(self):
        """The ops that read a tensor's value on the host."""
        return [op[0] for op in self.ops if op[0].split(".")[0] in self.HOST_READS]

    def tensor_dtypes(self, *op_names: str) -> set:
        """The dtypes of the tensor arguments of the ops called ``op_names`` (e.g. "bmm.default")."""
        return {a[2] for name, args, _ in self.ops if name in op_names for a in args
                if isinstance(a, tuple) and a[:1] == ("tensor",)}


class _SavingRows(list):
    def __init__(self, report: "CheckReport"):
        super().__init__()
        self.report = report

    def append(self, row) -> None:
        super().append(row)
        self.report.save()


class CheckReport(dict):
    """The results of a GPU check script: a dict written to ``$OUT/<file_name>`` (when OUT is set) each time
    :meth:`save` is called, so a run cut short by the machine's time limit still leaves what it measured, and a log
    whose lines carry the seconds since the script started."""

    def __init__(self, file_name: str):
        super().__init__()
        self.file_name, self.start = file_name, time.perf_counter()

    @property
    def path(self):
        return os.path.join(os.environ["OUT"], self.file_name) if os.environ.get("OUT") else None

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", flush=True)

    def save(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(self, f, indent=1, default=str)

    def rows(self, name: str) -> list:
        """A list stored under ``name`` that saves the report at every ``append``: rows measured before a time
        limit cuts the run short are kept."""
        self[name] = _SavingRows(self)
        return self[name]

    def finish(self, ok: bool, what: str) -> int:
        """Record the verdict, save, say where and whether every ``what`` passed; the script's exit code."""
        self.update(ok=ok, seconds=time.perf_counter() - self.start)
        self.save()
        if self.path:
            print(f"\nwrote {self.path}")
        print(f"\nall {what} passed" if ok else f"\nSOME {what.upper()} FAILED")
        return 0 if ok else 1
