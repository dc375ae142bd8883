"""Process start-up shared by every entry point: distributed init, Megatron groups, seeding, CPU support.

One call, :func:`initialize`, does the same thing under torchrun, srun or a plain ``python``:

* ranks come from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` or SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID`` (single-process defaults otherwise);
* NCCL on GPU, gloo on CPU; megatron ``parallel_state`` groups for the requested TP/PP sizes;
* seeding: megatron's CUDA RNG tracker on GPU, :class:`CPURNGStatesTracker` (same three named states) on CPU.

megatron-core 0.16.1 assumes CUDA in many places. On a machine without a GPU :func:`install_cpu_support` makes
those paths run on the CPU (see ``../shared/notes/cpu_megatron.md`` for each failure it answers):

* ``torch.cuda.current_device()`` (called in ~80 places to place tensors) returns ``"cpu"``;
  ``torch.cuda.synchronize`` is a no-op;
* a :class:`torch.overrides.TorchFunctionMode` rewrites literal ``device="cuda"`` arguments (optimizer scale
  tensors, clip_grads buffers, pipeline-schedule token counters) to the CPU, makes ``Tensor.cuda()`` a no-op and
  answers megatron's ``tensor.type() == 'torch.cuda.FloatTensor'`` checks with CUDA type names;
* megatron's jit fuser (``torch.compile``) is disabled, which otherwise compiles for ~20 s per kernel on CPU;
* megatron's CUDA RNG get/set (used by activation recomputation) act on the CPU generator.

Nothing here is imported by model code: model code is written for CUDA megatron and runs unchanged on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_CPU_SUPPORT_INSTALLED = False


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def read_distributed_env(environ=None) -> DistributedEnv:
    """Ranks from torchrun (RANK...), else SLURM (SLURM_PROCID...), else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR") or _first_slurm_host(env) or "127.0.0.1"
    # A single process needs no agreed port: take a free one, so several single-process jobs can run side by side.
    default_port = 29500 if world > 1 else free_port()
    port = int(env.get("MASTER_PORT") or _slurm_port(env) or default_port)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}: check RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS")
    return DistributedEnv(rank, world, local, addr, port)


def _first_slurm_host(env) -> str | None:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    # "node[003-005,007],gpu1" -> "node003": enough to pick the rendezvous host without scontrol.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def _slurm_port(env) -> int | None:
    job = env.get("SLURM_JOB_ID")
    return 20000 + int(job) % 10000 if job and job.isdigit() else None


def free_port() -> int:
    """A free TCP port on the loopback interface (for tests and single-node runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# CPU support for megatron-core's CUDA-assuming paths
# --------------------------------------------------------------------------------------------------------------


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for code written for CUDA (megatron-core)."""

    _CUDA_TYPE_NAMES = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
        "torch.IntTensor": "torch.cuda.IntTensor",
        "torch.LongTensor": "torch.cuda.LongTensor",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return self._CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


def install_cpu_support() -> None:
    """Let megatron-core's CUDA-assuming paths run on the CPU. Idempotent; only for machines without CUDA."""
    global _CPU_SUPPORT_INSTALLED
    if _CPU_SUPPORT_INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("install_cpu_support() is for machines without CUDA; this one has a GPU")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    # torch.compile of megatron's fused kernels takes ~20 s per kernel on CPU and buys nothing there.
    import torch._dynamo as dynamo

    dynamo.config.disable = True
    # Activation recomputation saves and restores "the CUDA RNG state" around each recomputed layer; on the CPU
    # that generator is the CPU one.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _CudaToCpuMode().__enter__()  # stays pushed for the life of the process
    _CPU_SUPPORT_INSTALLED = True


class CPURNGStatesTracker:
    """megatron's CudaRNGStatesTracker with the CPU generator in place of the CUDA one.

    Model code forks named states (``model-parallel-rng`` for TP-sharded init and dropout); on CPU those states are
    CPU generator states, seeded exactly as :func:`megatron.core.tensor_parallel.model_parallel_cuda_manual_seed`
    seeds its CUDA states.
    """

    def __new__(cls, *args, **kwargs):
        from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

        class _Tracker(CudaRNGStatesTracker):
            def add(self, name, seed):
                if seed in self.seeds_:
                    raise Exception(f"seed {seed} already exists")
                if name in self.states_:
                    raise Exception(f"rng state {name} already exists")
                self._is_initialized = True
                self.seeds_.add(seed)
                saved = torch.get_rng_state()
                torch.manual_seed(seed)
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

            @contextlib.contextmanager
            def fork(self, name="model-parallel-rng"):
                if name not in self.states_:
                    raise Exception(f"rng state {name} is not added")
                saved = torch.get_rng_state()
                torch.set_rng_state(self.states_[name])
                try:
                    yield
                finally:
                    self.states_[name] = torch.get_rng_state()
                    torch.set_rng_state(saved)

        return _Tracker(*args, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed python/numpy/torch and megatron's named RNG states (CUDA tracker on GPU, CPU tracker on CPU)."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    # Pipeline stages get different default seeds, as in Megatron-LM's _set_random_seed.
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tracker = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


# --------------------------------------------------------------------------------------------------------------
# Start and stop
# --------------------------------------------------------------------------------------------------------------


def device() -> torch.device:
    """The device this process computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
    environ=None,
) -> DistributedEnv:
    """Start torch.distributed and megatron's model-parallel groups, and seed. Safe to call once per process."""
    from megatron.core import parallel_state

    env = read_distributed_env(environ)
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if env.world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {env.world_size} is not divisible by tensor-parallel {tp} x pipeline-parallel {pp}"
        )
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        install_cpu_support()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device() if use_cuda else None,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=timeout_minutes,
        )
    seed_everything(seed)
    return env


def shutdown() -> None:
    """Tear down megatron groups and the process group (tests call initialize/shutdown repeatedly)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
