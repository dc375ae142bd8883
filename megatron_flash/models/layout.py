"""How a TP shard relates to the full logical tensor: one place for tests, weight checks and checkpoint export.

A TP-sharded parameter (megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes) is a contiguous
chunk of the full tensor along ``partition_dim``, except for tensors stacked from sections (:func:`stack_sections`:
megatron's fused SwiGLU fc1 [gate; up], the DeltaNet and Mamba2 input projections): there each section is split
over TP on its own, so a shard is [section_0 of rank r; section_1 of rank r; ...] and the full tensor is [section_0;
section_1; ...], the layout megatron's own MambaMixer and GatedDeltaNet use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def stack_sections(param, local_sizes) -> None:
    """Mark ``param`` (TP-sharded on dim 0) as stacked from sections along dim 0: on every rank it holds this
    rank's part of each section, of sizes ``local_sizes`` (summing to the shard's rows)."""
    if getattr(param, "partition_dim", 0) != 0 or sum(local_sizes) != param.shape[0]:
        raise ValueError(f"sections {list(local_sizes)} do not stack into dim 0 of a {list(param.shape)} parameter "
                         f"sharded on dim {getattr(param, 'partition_dim', 0)}")
    param.tp_sections = tuple(local_sizes)


def local_sections(param):
    """The local section sizes of a stacked parameter (:func:`stack_sections`), or None."""
    return getattr(param, "tp_sections", None)


def shard_of(full: torch.Tensor, param, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's shard of a full logical tensor."""
    if not is_tp_sharded(param) or tp_size == 1:
        return full
    dim, sections = param.partition_dim, local_sections(param)
    if sections:  # dim is 0
        pieces = full.split([size * tp_size for size in sections], dim=dim)
        return torch.cat([piece.chunk(tp_size, dim=dim)[tp_rank] for piece in pieces], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def full_from_shards(shards: list[torch.Tensor], param) -> torch.Tensor:
    """The full logical tensor from all TP ranks' shards (in rank order)."""
    if not is_tp_sharded(param) or len(shards) == 1:
        return shards[0]
    dim, sections = param.partition_dim, local_sections(param)
    if sections:
        pieces = [shard.split(list(sections), dim=dim) for shard in shards]  # [rank][section]
        return torch.cat([torch.cat(ranks_pieces, dim=dim) for ranks_pieces in zip(*pieces)], dim=dim)
    return torch.cat(shards, dim=dim)


def initialize_as_full(param, init_method, tp_size: int, tp_rank: int) -> None:
    """Draw the full logical tensor of ``param`` (sharded on dim 0) with ``init_method`` in fp32 from the default
    generator (seeded alike on all TP ranks) and keep this rank's shard: the same numbers under every TP size.
    megatron's CPU initialization draws the full matrix too but shards it contiguously, which for a stacked
    parameter is another layout."""
    if getattr(param, "partition_dim", 0) != 0:
        raise ValueError(f"initialize_as_full needs a parameter sharded on dim 0, got dim {param.partition_dim}")
    full = torch.empty(param.shape[0] * tp_size, *param.shape[1:], dtype=torch.float32)
    init_method(full)
    with torch.no_grad():
        param.copy_(shard_of(full, param, tp_size, tp_rank))


def split_sharded_sections(sharded_tensor, param, names):
    """A stacked parameter's ShardedTensor as one checkpoint tensor per section (named ``<key>.<name>``), each
    sharded over TP on its own: the checkpoint then holds [section_0; section_1; ...] whatever the TP size."""
    from megatron.core.ssm.gated_delta_net import _split_tensor_factory  # megatron's, as its mixers use it

    return _split_tensor_factory(sharded_tensor, list(local_sections(param)), list(names), 0)


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
