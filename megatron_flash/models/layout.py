"""How a TP shard relates to the full logical tensor: one place for tests, weight checks and checkpoint export.

A TP-sharded parameter (megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes) is a contiguous
chunk of the full tensor along ``partition_dim``, except for matrices marked ``glu_stacked`` (megatron's fused
SwiGLU fc1): there each shard is [gate_r; up_r] and the full tensor is [gate; up].
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard_of(full: torch.Tensor, param, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's shard of a full logical tensor."""
    if not is_tp_sharded(param) or tp_size == 1:
        return full
    dim = param.partition_dim
    if getattr(param, "glu_stacked", False):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def full_from_shards(shards: list[torch.Tensor], param) -> torch.Tensor:
    """The full logical tensor from all TP ranks' shards (in rank order)."""
    if not is_tp_sharded(param) or len(shards) == 1:
        return shards[0]
    dim = param.partition_dim
    if getattr(param, "glu_stacked", False):
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)],
                         dim=dim)
    return torch.cat(shards, dim=dim)


def gather_full(tensor: torch.Tensor, param, group) -> torch.Tensor:
    """All-gather a TP-sharded tensor (a parameter or its gradient) into the full logical tensor."""
    size = dist.get_world_size(group) if group is not None else 1
    if not is_tp_sharded(param) or size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return full_from_shards(parts, param)


def global_names(model) -> dict:
    """Parameter name -> name in the whole model (pipeline stages number their layers locally).

    ``decoder.layers.{i}.`` becomes the layer's global index; on a last stage that holds a copy of tied
    embeddings, ``output_layer.weight`` becomes ``embedding.word_embeddings.weight``.
    """
    inner = getattr(model, "module", model)
    local_to_global = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
                       for i, layer in enumerate(inner.decoder.layers)}
    names = {}
    for name, _ in inner.named_parameters():
        glob = name
        for local, g in local_to_global.items():
            if name.startswith(local):
                glob = g + name[len(local):]
                break
        if glob == "output_layer.weight" and inner.share_embeddings_and_output_weights:
            glob = "embedding.word_embeddings.weight"
        names[name] = glob
    return names


def full_named_tensors(model, use_grads: bool = False) -> dict:
    """This pipeline stage's parameters (or their gradients) as full TP-gathered tensors under global names."""
    from megatron.core import parallel_state

    inner = getattr(model, "module", model)
    names = global_names(inner)
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, param in inner.named_parameters():
        tensor = (getattr(param, "main_grad", None) if use_grads else None)
        if use_grads and tensor is None:
            tensor = param.grad
        if not use_grads:
            tensor = param.data
        out[names[name]] = gather_full(tensor.detach().float().clone(), param, group)
    return out
