"""Pieces the training loop uses: batches from megatron datasets, exit signals, and progress logging."""

from __future__ import annotations

import math
import os
import signal
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_flash import runtime
from megatron_flash.layers.base import LAYER_RANGE_PREFIX

BACKWARD_RANGE_PREFIX = "autograd::engine::evaluate_function: "  # torch's range around each backward function


# --- data -----------------------------------------------------------------------------------------------------

def microbatches(dataset, first_sample: int, micro_batch_size: int, num_microbatches: int):
    """This DP rank's micro-batches of one global batch starting at sample ``first_sample``.

    Global batch b covers samples [first, first + global) in order; DP rank r takes the r-th contiguous block, as
    Megatron-LM's MegatronPretrainingSampler does, so a layout change keeps the data order.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = micro_batch_size * num_microbatches
    start = first_sample + dp_rank * per_rank
    for m in range(num_microbatches):
        samples = [dataset[(start + m * micro_batch_size + i) % len(dataset)] for i in range(micro_batch_size)]
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(runtime.device())
               for key in ("tokens", "labels", "loss_mask")}


# --- exit signals ---------------------------------------------------------------------------------------------

class ExitSignal:
    """SIGTERM / SIGUSR1 (what SLURM sends before the time limit) ask for a save and a clean exit.

    The handler only records the signal; ranks agree through :func:`global_batch_loss` (any rank signalled -> all
    stop), so every rank saves the same iteration.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum


def global_batch_loss(micro_batch_losses: list, exit_requested: bool) -> tuple[float, bool]:
    """The global batch's mean loss, on every rank, and whether any rank asked to exit.

    ``micro_batch_losses`` are the schedule's per-micro-batch losses (empty off the last pipeline stage). One
    all-reduce and one host read per iteration: the loop reads the loss anyway (its inf/NaN skip), so the exit
    check rides along instead of costing a collective and a device synchronization of its own. The last stage's
    first tensor-parallel rank of each data-parallel replica contributes (the other TP ranks hold the same value).
    """
    contributes = (parallel_state.is_pipeline_last_stage()
                   and parallel_state.get_tensor_model_parallel_rank() == 0)
    values = torch.zeros(2, dtype=torch.float64, device=runtime.device())
    if contributes:
        values[0] = torch.stack(micro_batch_losses).double().mean() / parallel_state.get_data_parallel_world_size()
    values[1] = float(exit_requested)
    dist.all_reduce(values)
    loss, exits = values.tolist()
    return loss, exits > 0


def gather_parameters(ddp) -> None:
    """Bring every parameter up to date on every rank now. With ``--overlap-param-gather`` the distributed
    optimizer's step updates only each rank's shard, and each bucket's all-gather waits for the forward pre-hook
    of the first module that reads it; whatever reads parameters outside a forward (a checkpoint, a callback, the
    caller of training) needs them gathered first. Without the option the step has gathered them already."""
    if ddp.use_forward_hook:
        ddp.start_param_sync(force_sync=True)


# --- logging --------------------------------------------------------------------------------------------------

def is_logging_rank() -> bool:
    """The last rank is on the last pipeline stage, where losses are known."""
    return dist.get_rank() == dist.get_world_size() - 1


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def memory_outside_allocator_gib() -> float:
    """GPU memory in use that PyTorch's allocator did not reserve (CUDA context, kernels' local memory, libraries'
    own allocations, and any other process on the same GPU): what limits the micro-batch beyond ``memory_gib``.
    NaN without a GPU."""
    if not torch.cuda.is_available():
        return float("nan")
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / 2**30


# CUDA's per-thread stack limit (CU_LIMIT_STACK_SIZE) and its default
STACK_SIZE_LIMIT, DEFAULT_STACK_BYTES = 0, 1024


def shrink_kernel_local_memory(stack_bytes: int = DEFAULT_STACK_BYTES) -> int:
    """Set the current CUDA context's per-thread stack to ``stack_bytes``; returns the limit the driver set.

    The driver keeps local memory for every thread the GPU can hold at the largest stack any kernel launched so
    far needed, growing it at launch and never shrinking it; setting the limit reallocates it (cuCtxSetLimit). So
    after autotuning, which launches every candidate kernel (the worst spillers too), this hands back what only
    those needed; later launches grow it again to what the kernels in use need. The hypothesis for the 8-14 GiB
    ``memory_outside_allocator_gib`` measures (docs/performance.md, sessions 19-21)."""
    import ctypes

    libcuda = ctypes.CDLL("libcuda.so.1")
    torch.cuda.synchronize()  # makes the primary context current on this thread, and nothing runs on it
    rc = libcuda.cuCtxSetLimit(STACK_SIZE_LIMIT, ctypes.c_size_t(stack_bytes))
    if rc != 0:
        raise RuntimeError(f"cuCtxSetLimit(CU_LIMIT_STACK_SIZE, {stack_bytes}) failed: CUresult {rc}")
    value = ctypes.c_size_t(0)
    rc = libcuda.cuCtxGetLimit(ctypes.byref(value), STACK_SIZE_LIMIT)
    if rc != 0:
        raise RuntimeError(f"cuCtxGetLimit(CU_LIMIT_STACK_SIZE) failed: CUresult {rc}")
    return value.value


class ProgressLog:
    """Console lines and TensorBoard scalars, written by the logging rank only."""

    def __init__(self, tensorboard_dir, log_interval: int, tokens_per_iter: int, flops_per_iter: float,
                 peak_flops: float):
        self.log_interval, self.tokens_per_iter = log_interval, tokens_per_iter
        self.flops_per_iter, self.peak_flops = flops_per_iter, peak_flops
        self.writer = None
        if tensorboard_dir and is_logging_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self._t0, self._iters, self._losses = time.perf_counter(), 0, []
        self._device_scalars = []  # (name, 0-dim device tensor, iteration), written at the next console line
        self.last = {}  # the figures of the last console line (benchmarks read them)
        self._first = True  # the run's first iteration gets a line of its own (below)

    def restart_timer(self) -> None:
        """Leave evaluation and checkpoint time out of the throughput figures."""
        self._t0, self._iters = time.perf_counter(), 0

    def scalar(self, name: str, value, iteration: int) -> None:
        """A TensorBoard scalar; a tensor ``value`` is read (a device synchronization) at the next console line,
        together with the others held since the last one."""
        if self.writer is None:
            return
        if isinstance(value, torch.Tensor):
            self._device_scalars.append((name, value.detach(), iteration))
        else:
            self.writer.add_scalar(name, value, iteration)

    def _write_device_scalars(self) -> None:
        if self._device_scalars:
            values = torch.stack([v.float().reshape(()) for _, v, _ in self._device_scalars]).tolist()
            for (name, _, iteration), value in zip(self._device_scalars, values):
                self.writer.add_scalar(name, value, iteration)
            self._device_scalars = []

    def step(self, iteration: int, loss: float, lr: float, grad_norm, skipped: int, extra: dict) -> None:
        self._iters += 1
        if math.isfinite(loss):
            self._losses.append(loss)
        for name, value in {"lm-loss": loss, "learning-rate": lr, **extra}.items():
            self.scalar(f"train/{name}", value, iteration)
        if grad_norm is not None:
            self.scalar("train/grad-norm", grad_norm, iteration)
        if self._first and iteration % self.log_interval and is_logging_rank():
            # otherwise nothing shows for the first log interval, whose first iteration alone compiles and autotunes
            # the GPU kernels (minutes on a fresh machine)
            print(f"first iteration of this run ({iteration}) took {time.perf_counter() - self._t0:.1f} s, "
                  f"kernel compilation included", flush=True)
        self._first = False
        if iteration % self.log_interval:
            return
        self._write_device_scalars()
        elapsed = time.perf_counter() - self._t0
        per_iter = elapsed / max(self._iters, 1)
        tokens_per_s = self.tokens_per_iter / per_iter
        mfu = self.flops_per_iter / per_iter / self.peak_flops if self.peak_flops else float("nan")
        avg_loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        self.scalar("throughput/tokens-per-second", tokens_per_s, iteration)
        self.scalar("throughput/mfu", mfu, iteration)
        self.scalar("memory/gib", memory_gib(), iteration)
        self.last = {"iteration": iteration, "ms_per_iter": per_iter * 1000, "tokens_per_s": tokens_per_s,
                     "mfu": mfu, "memory_gib": memory_gib(), "outside_allocator_gib": memory_outside_allocator_gib(),
                     "loss": avg_loss}
        if is_logging_rank():
            gn = f"{grad_norm:.3f}" if grad_norm is not None else "-"
            mfu_text = f"{mfu:.1%}" if math.isfinite(mfu) else "-"
            print(f"iteration {iteration:>7d} | loss {avg_loss:.4f} | lr {lr:.3e} | grad norm {gn} | "
                  f"{per_iter * 1000:.0f} ms/it | {tokens_per_s:,.0f} tokens/s | MFU {mfu_text} | "
                  f"mem {memory_gib():.2f} GiB | skipped {skipped}", flush=True)
        self._t0, self._iters, self._losses = time.perf_counter(), 0, []

    def close(self):
        if self.writer is not None:
            self._write_device_scalars()
            self.writer.close()


def kernel_table(profiler, steps: int) -> list[dict]:
    """Rows ``name, ms_per_iter, share, calls_per_iter`` of a finished torch.profiler run over ``steps``
    iterations, most time first: on a GPU the kernels (operators would count their kernels twice), else the CPU
    operators (self time); HybridLayer's named ranges left out."""
    unit = "device" if torch.cuda.is_available() else "cpu"
    kind = torch.autograd.DeviceType.CUDA if unit == "device" else torch.autograd.DeviceType.CPU
    kernels = [e for e in profiler.key_averages() if e.device_type == kind
               and getattr(e, f"self_{unit}_time_total") > 0 and not e.key.startswith(LAYER_RANGE_PREFIX)]
    kernels.sort(key=lambda e: getattr(e, f"self_{unit}_time_total"), reverse=True)
    total = sum(getattr(e, f"self_{unit}_time_total") for e in kernels) or 1.0
    return [{"name": e.key[:120], "ms_per_iter": getattr(e, f"self_{unit}_time_total") / 1000 / steps,
             "share": getattr(e, f"self_{unit}_time_total") / total, "calls_per_iter": e.count / steps}
            for e in kernels]


class StepProfiler:
    """torch.profiler over iterations [start, end) on the chosen ranks (Megatron's --profile flags).

    Writes a Chrome trace and a table into ``folder``: forward time by layer type, backward time by autograd
    function and the kernels with the most device time (CPU time without a GPU); ``table`` keeps the three
    (``layers_forward``, ``backward``, ``kernels``) for callers.
    """

    def __init__(self, folder: str | None, start: int, end: int, ranks, enabled: bool):
        self.folder, self.start, self.end = folder, start, end
        self.enabled = enabled and dist.get_rank() in ranks
        self.profiler, self.table = None, []

    def step(self, iteration: int) -> None:
        """Call after finishing ``iteration`` (1-based): the profiled window covers iterations start+1 .. end."""
        if not self.enabled:
            return
        if iteration == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        elif iteration == self.end and self.profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            self._write()
            self.profiler = None

    def _write(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        rank = dist.get_rank()
        self.profiler.export_chrome_trace(os.path.join(self.folder, f"trace_rank{rank}.json"))
        unit = "device" if torch.cuda.is_available() else "cpu"
        steps = self.end - self.start
        kernels = kernel_table(self.profiler, steps)
        self.table = {"kernels": kernels[:40]}
        total = sum(row["ms_per_iter"] for row in kernels) * 1000 * steps or 1.0  # us, as the ranges below
        # forward time by layer type (HybridLayer's named ranges) and backward time by autograd function (the
        # engine's ranges), each with the kernels launched inside (inclusive)
        self.table["layers_forward"] = self._ranges(LAYER_RANGE_PREFIX, "layer", unit, steps, total)
        self.table["backward"] = self._ranges(BACKWARD_RANGE_PREFIX, "function", unit, steps, total)[:25]
        with open(os.path.join(self.folder, f"kernels_rank{rank}.txt"), "w") as f:
            f.write(f"iterations {self.start + 1}..{self.end}, {unit} time per iteration\n")
            sections = (("forward by layer type (inclusive)", "layers_forward", "layer", "share_of_step"),
                        ("backward by autograd function (inclusive)", "backward", "function", "share_of_step"),
                        ("kernels / operators (self time)", "kernels", "name", "share"))
            for title, table, key, share in sections:
                f.write(f"\n{title}:\n")
                for row in self.table[table]:
                    f.write(f"{row['ms_per_iter']:9.3f} ms {row[share]:6.1%} {row['calls_per_iter']:6.0f}x  "
                            f"{row[key]}\n")

    def _ranges(self, prefix: str, key: str, unit: str, steps: int, total: float) -> list[dict]:
        """Rows for the CPU ranges named ``prefix`` + name, summed by name, most time first."""
        sums: dict[str, list] = {}
        for e in self.profiler.events():
            if e.name.startswith(prefix) and e.device_type == torch.autograd.DeviceType.CPU:
                entry = sums.setdefault(e.name[len(prefix):], [0.0, 0])
                entry[0] += getattr(e, f"{unit}_time_total")
                entry[1] += 1
        return sorted(({key: name, "ms_per_iter": t / 1000 / steps, "share_of_step": t / total,
                        "calls_per_iter": n / steps} for name, (t, n) in sums.items() if t > 0),
                      key=lambda row: -row["ms_per_iter"])

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None


def peak_flops_per_second() -> float:
    """bf16 dense peak of this GPU (per device), for MFU; 0 on CPU (MFU is then not reported)."""
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("B200", 2250e12)):
        if key in name:
            return peak
    return 0.0
