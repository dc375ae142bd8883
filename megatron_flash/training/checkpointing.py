"""Checkpoints with megatron.core.dist_checkpointing: model, optimizer, scheduler, RNG, data position, args.

Layout of ``--save``::

    iter_0000100/                 one checkpoint (dist_checkpointing torch_dist format)
    iter_0000200/
    latest_checkpointed_iteration.txt

Atomicity: a checkpoint is written to ``iter_N.tmp`` and renamed once every rank has finished; the tracker file is
replaced (write + rename) after that. A process killed mid-save leaves only a ``.tmp`` folder, which is never read
and is removed by the next save, so the previous checkpoint stays loadable and marked latest.

Optimizer state is stored in *model space*: for every parameter, its fp32 main copy and Adam moments as full
tensors sharded over TP like the parameter itself. That format is the same whether or not the distributed optimizer
was used and loads under any TP/PP/DP layout. (megatron's own distributed-optimizer formats fail without TE/Apex:
see ../shared/notes/cpu_megatron.md.) With the distributed optimizer, each DP rank's flat shard is assembled into the
full tensor by one all-reduce per state, and each rank takes its range back on load.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                        make_sharded_optimizer_tensor)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_flash.training.optimizer_params import leaf_optimizers, main_params

TRACKER = "latest_checkpointed_iteration.txt"
ADAM_STATES = ("exp_avg", "exp_avg_sq")
# Test hook: when set to an iteration, the save of that iteration exits right after the shards are written and
# before the rename, which is what a kill mid-save leaves behind.
CRASH_BEFORE_COMMIT_ENV = "MEGATRON_FLASH_CRASH_BEFORE_CHECKPOINT_COMMIT"


class CheckpointError(RuntimeError):
    """A missing or inconsistent checkpoint; the message names the folder."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str):
    """The iteration recorded in ``root``'s tracker file, or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    iteration = int(text)
    if not os.path.isdir(checkpoint_dir(root, iteration)):
        raise CheckpointError(f"{path} names iteration {iteration} but {checkpoint_dir(root, iteration)} is missing")
    return iteration


# --- optimizer state in model space ---------------------------------------------------------------------------

def _optimizer_entries(optimizer):
    """(leaf, model param, main param, flat start or None, DP group or None) for every optimized parameter."""
    for leaf in leaf_optimizers(optimizer):
        group = leaf.data_parallel_group if isinstance(leaf, DistributedOptimizer) else None
        for model_param, main_param, start in main_params(leaf):
            yield leaf, model_param, main_param, start, group


def _full(model_param, piece, start, group):
    """A main param / moment as a full tensor shaped like the model param (assembled over DP if sharded).

    With the distributed optimizer every DP rank calls this for every param, ``piece`` None where it holds none.
    """
    if group is None:
        return piece.detach().float().reshape(model_param.shape).clone()
    full = torch.zeros(model_param.numel(), dtype=torch.float32, device=model_param.device)
    if piece is not None:
        full[start:start + piece.numel()] = piece.detach().float().view(-1)
    dist.all_reduce(full, group=group)
    return full.view(model_param.shape)


def optimizer_sharded_state(optimizer, model_sharded_sd, for_load: bool = False) -> dict:
    """The optimizer's state as ShardedTensors keyed like the model's parameters."""
    entries = list(_optimizer_entries(optimizer))
    sharded_by_index = get_param_id_to_sharded_param_map(model_sharded_sd, (e[1] for e in entries))
    out = {}
    for index, (leaf, model_param, main_param, start, group) in enumerate(entries):
        state = leaf.optimizer.state.get(main_param, {}) if main_param is not None else {}
        for name in ("param",) + ADAM_STATES:
            if for_load:
                full = torch.empty(model_param.shape, dtype=torch.float32, device=model_param.device)
            else:
                piece = main_param if name == "param" or main_param is None else \
                    state.get(name, torch.zeros_like(main_param))
                full = _full(model_param, piece, start, group)
            sharded = make_sharded_optimizer_tensor(sharded_by_index[index], full, prefix=f"optimizer.{name}")
            out[f"{name}.{sharded.key}"] = sharded
    return out


def _adam_step(optimizer) -> int:
    for leaf in leaf_optimizers(optimizer):
        for state in leaf.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
    return 0


@torch.no_grad()
def _restore_optimizer(optimizer, loaded: dict, model_sharded_sd, step: int) -> None:
    entries = list(_optimizer_entries(optimizer))
    sharded_by_index = get_param_id_to_sharded_param_map(model_sharded_sd, (e[1] for e in entries))
    for index, (leaf, model_param, main_param, start, group) in enumerate(entries):
        if main_param is None:
            continue
        key = sharded_by_index[index].key
        state = leaf.optimizer.state.setdefault(main_param, {})
        for name in ("param",) + ADAM_STATES:
            full = loaded[f"{name}.optimizer.{name}.{key}"].view(-1)
            piece = full if start is None else full[start:start + main_param.numel()]
            target = main_param if name == "param" else state.setdefault(name, torch.zeros_like(main_param))
            target.copy_(piece.view(target.shape))
        state["step"] = torch.tensor(float(step), device=main_param.device)  # fused Adam's place for it
    # Model params must agree with the restored fp32 main params (bf16: their rounding).
    for leaf in leaf_optimizers(optimizer):
        if hasattr(leaf, "_copy_main_params_to_model_params"):
            leaf._copy_main_params_to_model_params()


# --- RNG ------------------------------------------------------------------------------------------------------

def _rng_state():
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state):
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(data):
    ps = parallel_state
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


def _layout():
    ps = parallel_state
    return [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size()]


# --- save / load ----------------------------------------------------------------------------------------------

def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, common: dict, keep_last: int = 0):
    """Write ``iter_{iteration}`` under ``root`` atomically; ``common`` holds args, data position, etc.

    With ``optimizer`` and ``scheduler`` None the checkpoint holds the model only (``common["model_only"]``), as
    written by tools/convert_from_hf.py: see :func:`load_checkpoint`.
    """
    final, tmp = checkpoint_dir(root, iteration), checkpoint_dir(root, iteration) + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        for stale in (tmp, final):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd = model.sharded_state_dict()
    model_only = optimizer is None
    if model_only != (scheduler is None):
        raise ValueError("save_checkpoint: give both optimizer and scheduler, or neither (a model-only checkpoint)")
    state = {
        "model": model_sd,
        "rng": _rng_sharded(_rng_state()),
        "common": {**common, "iteration": iteration, "adam_step": 0 if model_only else _adam_step(optimizer),
                   "scheduler": None if model_only else scheduler.state_dict(), "layout": _layout(),
                   "model_only": model_only},
    }
    if not model_only:
        state["optimizer"] = optimizer_sharded_state(optimizer, model_sd)
    dist_checkpointing.save(state, tmp)
    dist.barrier()
    if os.environ.get(CRASH_BEFORE_COMMIT_ENV) == str(iteration):
        os._exit(17)
    if dist.get_rank() == 0:
        os.rename(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w", encoding="utf-8") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        _prune(root, keep_last, iteration)
    dist.barrier()
    return final


def _prune(root, keep_last, newest):
    if keep_last <= 0:
        return
    done = sorted(int(d[5:]) for d in os.listdir(root)
                  if d.startswith("iter_") and d[5:].isdigit() and int(d[5:]) <= newest)
    for iteration in done[:-keep_last]:
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, load_rng: bool = True, iteration=None):
    """Restore the latest checkpoint under ``root`` (or ``iteration``); returns its ``common`` dict (None if there is
    none).

    A model-only checkpoint (``common["model_only"]``, e.g. from tools/convert_from_hf.py) restores the weights only:
    ``optimizer`` keeps its fresh state, its main params are refreshed from the loaded weights, and ``scheduler``
    and the RNG are left as they are, so training starts anew from those weights.
    """
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            return None
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:
        common = dist_checkpointing.load_common_state_dict(path)["common"]
    except Exception as exc:  # noqa: BLE001 - report which checkpoint is unreadable
        raise CheckpointError(f"{path}: cannot read the checkpoint's common state: {exc}") from exc
    model_only = bool(common.get("model_only"))
    model_sd = model.sharded_state_dict()
    request = {"model": model_sd}
    if optimizer is not None and not model_only:
        request["optimizer"] = optimizer_sharded_state(optimizer, model_sd, for_load=True)
    same_layout = common.get("layout") == _layout()
    if load_rng and same_layout and not model_only:
        request["rng"] = _rng_sharded(None)
    loaded = dist_checkpointing.load(request, path)
    model.load_state_dict(loaded["model"])
    if optimizer is not None and model_only:
        optimizer.reload_model_params()  # fp32 main params (bf16 / distributed optimizer) from the loaded weights
    elif optimizer is not None:
        _restore_optimizer(optimizer, loaded["optimizer"], model.sharded_state_dict(), common["adam_step"])
    if scheduler is not None and not model_only:
        scheduler.load_state_dict(common["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    common["loaded_from"] = path
    return common
