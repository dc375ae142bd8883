"""Which fp32 main parameter a megatron optimizer updates for each model parameter, and the kernels its step runs.

megatron keeps that mapping in different attributes per optimizer class; weight normalization and checkpointing
both need it, so it is read here once. Without Transformer Engine or Apex, megatron falls back to torch's Adam and
to Python loops for its multi-tensor ops; the two ``use_*`` functions put torch's fused kernels in their place.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import ChainedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer


def leaf_optimizers(optimizer):
    return list(optimizer.chained_optimizers) if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def main_params(opt):
    """(model param, main param, flat start) for every param a leaf megatron optimizer updates.

    The list and its order are the same on every DP rank. With the distributed optimizer a rank whose shard holds
    none of a param gets (param, None, None): it still takes part in the collectives over that param.
    """
    if isinstance(opt, DistributedOptimizer):
        local = {}
        for model_groups, shard_groups in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                                           (opt.model_fp32_groups, opt.shard_fp32_groups)):
            for model_group, shard_group in zip(model_groups, shard_groups):
                for mp, sp in zip(model_group, shard_group):
                    local[mp] = (sp, opt._get_model_param_range_map(mp)["param"].start)
        return [(p, *local.get(p, (None, None))) for buf in opt.buffers for p in buf.params]
    if isinstance(opt, Float16OptimizerWithFloat16Params):
        pairs = [(mp, sp, None) for mg, sg in zip(opt.float16_groups, opt.fp32_from_float16_groups)
                 for mp, sp in zip(mg, sg)]
        pairs += [(p, p, None) for g in opt.fp32_from_fp32_groups for p in g]
        return pairs
    if isinstance(opt, FP32Optimizer):
        return [(p, p, None) for g in opt.optimizer.param_groups for p in g["params"]]
    raise TypeError(f"unsupported megatron optimizer type {type(opt).__name__}")


def use_fused_torch_adam(optimizer) -> None:
    """Run torch's fused Adam kernel where megatron fell back to torch's Adam (no TE or Apex installed).

    megatron builds ``torch.optim.Adam(W)`` with the default ``foreach`` implementation: ~10 multi-tensor passes
    per step (19 ms per 1B step on an H200) where the fused kernel makes one. The fused kernel wants each state
    ``step`` on its parameter's device; torch creates it there, and checkpointing restores it there.
    """
    for leaf in leaf_optimizers(optimizer):
        inner = getattr(leaf, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue  # TE's or Apex's FusedAdam, or no local params
        for group in inner.param_groups:
            group["foreach"], group["fused"] = False, True


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's ``local_multi_tensor_l2_norm`` contract (a [1] fp32 tensor: the L2 norm over every tensor of
    ``tensor_lists[0]``; None) in two launches on the tensors' device. The local fallback builds its result with
    ``torch.tensor`` from the per-tensor norms: one device-to-host read, a sync, per gradient tensor."""
    norms = torch._foreach_norm(tensor_lists[0], dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def use_foreach_grad_norm() -> None:
    """Compute the gradient norm (``--clip-grad``) with torch's multi-tensor norm where megatron fell back to its
    local L2 norm (no TE or Apex installed), so the step has one host sync for it instead of one per parameter."""
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
