"""The runtime on CPU/gloo: a megatron-core GPTModel gives the same loss and gradients in 1 process, TP=2 and PP=2,
and the same parameters after one optimizer step (and the same losses over three) with DP=2 and the distributed
optimizer."""

import pytest
import torch

from megatron_flash import runtime
from megatron_flash.testing import init_layout_invariant, run_distributed

SEQ, MBS, VOCAB = 24, 2, 96


def test_read_distributed_env_sources():
    torchrun = runtime.read_distributed_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                             "MASTER_ADDR": "h", "MASTER_PORT": "123"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr, torchrun.master_port) == (
        3, 4, 1, "h", 123)
    slurm = runtime.read_distributed_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                          "SLURM_JOB_NODELIST": "gpu[017-018,020]", "SLURM_JOB_ID": "4242"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank) == (5, 8, 1)
    assert slurm.master_addr == "gpu017" and slurm.master_port == 24242
    single = runtime.read_distributed_env({})
    assert (single.rank, single.world_size) == (0, 1)
    with pytest.raises(ValueError, match="outside world size"):
        runtime.read_distributed_env({"RANK": "2", "WORLD_SIZE": "2"})


def _gpt():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core import parallel_state as ps

    cfg = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, use_cpu_initialization=True,
        bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(), pipeline_dtype=torch.float32,
    )
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    init_layout_invariant(model, _global_name_fn(model))
    return model


def _global_name_fn(model):
    local_to_global = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
                       for i, layer in enumerate(model.decoder.layers)}

    def global_name(name):
        for local, glob in local_to_global.items():
            if name.startswith(local):
                return glob + name[len(local):]
        return name
    return global_name


def _batches(n, batch):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g) for _ in range(n)]


def _full_named_grads_or_params(model, use_grads):
    """Full (TP-gathered) tensors keyed by global layer names, from this pipeline stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    inner = model.module if hasattr(model, "module") else model
    global_name = _global_name_fn(inner)
    out = {}
    for name, p in inner.named_parameters():
        t = (p.main_grad if hasattr(p, "main_grad") else p.grad) if use_grads else p.data
        t = t.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
            t = torch.cat(parts, dim=p.partition_dim)
        out[global_name(name)] = t
    return out


def _train_steps(steps, use_ddp_optimizer):

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = _gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=use_ddp_optimizer, grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=1.0,
                                                 # eps well above fp32 rounding of tiny grads: Adam's first step
                                                 # is ~lr*sign(g), which turns 1e-9 grad noise into lr-sized flips
                                                 adam_eps=1e-6,
                                                 use_distributed_optimizer=use_ddp_optimizer), [ddp])
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    positions = torch.arange(SEQ).unsqueeze(0)

    def forward_step(data_iter, m):
        tokens = next(data_iter)
        out = m(tokens[:, :-1], positions.expand(tokens.shape[0], -1), mask, labels=tokens[:, 1:])

        def loss_fn(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place
        return out, loss_fn

    losses, grads, params = [], None, None
    for step, full in enumerate(_batches(steps, MBS * 2)):
        local = full.chunk(dp)[dp_rank]
        ddp.zero_grad_buffer()
        opt.zero_grad()
        res = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(local.chunk(2 // dp)), model=[ddp],
            num_microbatches=2 // dp, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        if step == 0:
            grads = _full_named_grads_or_params(ddp, use_grads=True)
        opt.step()
        if step == 0:
            params = _full_named_grads_or_params(ddp, use_grads=False)
        if ps.is_pipeline_last_stage():
            loss = torch.stack([r["loss"] for r in res]).mean()
            torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
            losses.append(loss.item() / dp)
    return {"losses": losses, "grads": grads, "params": params}


def _body(use_ddp_optimizer):
    return _train_steps(3, use_ddp_optimizer)


def _merge(results):
    merged = {"losses": None, "grads": {}, "params": {}}
    for r in results:
        if r["losses"]:
            merged["losses"] = r["losses"]
        merged["grads"].update(r["grads"])
        merged["params"].update(r["params"])
    return merged


@pytest.fixture(scope="module")
def single():
    return _merge(run_distributed(_body, world_size=1, args=(False,)))


@pytest.mark.parametrize("tp,pp,dp,dist_opt", [(2, 1, 1, False), (1, 2, 1, False), (1, 1, 2, True)],
                         ids=["tp2", "pp2", "dp2-distopt"])
def test_gpt_parallel_layouts_match_single_process(single, tp, pp, dp, dist_opt):
    world = tp * pp * dp
    got = _merge(run_distributed(_body, world_size=world, tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp, args=(dist_opt,)))
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    assert got["grads"].keys() == single["grads"].keys()
    # with the distributed optimizer each DP rank holds reduced grads only for its own shard of the buffer
    for name, g in ({} if dist_opt else single["grads"]).items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad of {n}: {m}")
    for name, p in single["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-4, atol=2e-5, msg=lambda m, n=name: f"param {n}: {m}")
