"""Mamba2Mixer: against a plain implementation in the released mamba_ssm layout, packed documents, TP=2 (with and
without sequence parallelism) against one process, and the parameter count at the 1B shape."""

import pytest
import torch
import torch.nn.functional as F

from megatron_flash.testing import run_distributed

HIDDEN, SEQ, BATCH = 64, 70, 2
PACKED_BOUNDS = [0, 9, 40, SEQ]  # three documents, none a multiple of the chunk (16)


def _config(sequence_parallel=False, **overrides):
    from megatron.core import parallel_state as ps

    from megatron_flash.config import make_config

    fields = dict(hidden_size=HIDDEN, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  layer_pattern="M", mamba_head_dim=16, mamba_state_dim=16, mamba_chunk_size=16,
                  use_cpu_initialization=True, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                  sequence_parallel=sequence_parallel, params_dtype=torch.float32)
    fields.update(overrides)
    return make_config(**fields)


def _build(config):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_flash.models.specs import mixer_spec

    # use_cpu_initialization draws from the default generator only: the same seed gives the same model in any
    # process and at any TP size, whatever ran before
    torch.manual_seed(0)
    return build_module(mixer_spec("M"), config=config, layer_number=1)


def _packed_inputs(bounds):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_flash.layers.base import MixerInputs

    cu = torch.tensor(bounds, dtype=torch.int32)
    return MixerInputs(packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))


# --------------------------------------------------------------------------------------------------------------
# The plain implementation: mamba_ssm's Mamba2 (ngroups=1 generalised to G, norm_before_gate=False) written
# directly in the released layout, from the mixer's full (TP=1) weights
# --------------------------------------------------------------------------------------------------------------


def released_weights(mixer) -> dict:
    """The mixer's weights in mamba_ssm's layout: in_proj rows [z, x, B, C, dt], conv1d channels [x, B, C]."""
    z, x, dt = mixer.in_proj.weight.split([mixer.inner, mixer.inner, mixer.heads])
    B, C = mixer.bc_proj_weight.chunk(2, dim=0)
    return {
        "in_proj": torch.cat([z, x, B, C, dt]),
        "conv_weight": torch.cat([mixer.conv_x_weight, mixer.conv_bc_weight]),
        "conv_bias": torch.cat([mixer.conv_x_bias, mixer.conv_bc_bias]),
        "dt_bias": mixer.dt_bias, "A_log": mixer.A_log, "D": mixer.D, "norm_weight": mixer.norm_weight,
        "out_proj": mixer.out_proj.weight,
    }


def plain_mamba2(w: dict, u: torch.Tensor, head_dim: int, state_dim: int, groups: int, eps: float) -> torch.Tensor:
    """u [b, s, hidden] -> [b, s, hidden], one sequence per batch row; sequential SSD (ops.ssd.ssd_reference)."""
    from megatron_flash.ops.ssd import ssd_reference

    batch, seq, _ = u.shape
    inner = w["out_proj"].shape[1]
    heads = inner // head_dim
    z, xbc, dt = (u @ w["in_proj"].t()).split([inner, inner + 2 * groups * state_dim, heads], dim=-1)
    kernel = w["conv_weight"].shape[1]
    conv = F.conv1d(xbc.transpose(1, 2), w["conv_weight"][:, None], w["conv_bias"], padding=kernel - 1,
                    groups=xbc.shape[-1])[..., :seq]
    x, B, C = F.silu(conv).transpose(1, 2).split([inner, groups * state_dim, groups * state_dim], dim=-1)
    y, _ = ssd_reference(x.reshape(batch, seq, heads, head_dim), F.softplus(dt + w["dt_bias"]), -torch.exp(w["A_log"]),
                         B.reshape(batch, seq, groups, state_dim), C.reshape(batch, seq, groups, state_dim), w["D"])
    gated = (y.reshape(batch, seq, inner) * F.silu(z)).view(batch, seq, groups, inner // groups)
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.view(batch, seq, inner) * w["norm_weight"]) @ w["out_proj"].t()


def _plain_body(groups):
    """World size 1, fp64: the mixer vs plain_mamba2, outputs and gradients of the input and every parameter."""
    from megatron_flash.layers.base import MixerInputs

    mixer = _build(_config(mamba_num_groups=groups)).double()
    with torch.no_grad():  # move D and the norm weight off their constant init so a mix-up of them shows
        mixer.D.add_(torch.linspace(-0.5, 0.5, mixer.D.numel(), dtype=torch.float64))
        mixer.norm_weight.mul_(torch.linspace(0.5, 1.5, mixer.norm_weight.numel(), dtype=torch.float64))
    u = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cotangent = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for run in ("mixer", "plain"):
        mixer.zero_grad()
        x = u.clone().requires_grad_()
        if run == "mixer":
            out = mixer(x, MixerInputs())
        else:
            out = plain_mamba2(released_weights(mixer), x.transpose(0, 1), mixer.head_dim, mixer.state_dim, groups,
                               mixer.config.mamba_norm_eps).transpose(0, 1)
        (out * cotangent).sum().backward()
        results.append({"out": out.detach(), "input": x.grad,
                        **{name: p.grad.clone() for name, p in mixer.named_parameters()}})
    return results


def _single_process_body():
    return {"plain": {groups: _plain_body(groups) for groups in (1, 2)}, "tp": _tp_body(False),
            "packed": _packed_body(), "count": _count_body()}


@pytest.fixture(scope="module")
def single_process():
    """Every world-size-1 result, from one spawned process (each spawn costs ~6 s of imports on 2 cores)."""
    return run_distributed(_single_process_body, world_size=1)[0]


@pytest.mark.parametrize("groups", [1, 2])
def test_mixer_matches_plain_mamba2(single_process, groups):
    got, want = single_process["plain"][groups]
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------------------------------------------
# Tensor parallelism
# --------------------------------------------------------------------------------------------------------------


def _run_full_and_gather(mixer, u_full, cotangent_full, inputs, sequence_parallel):
    """Forward/backward one input; return the full output, input grad and TP-gathered params and grads."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from megatron_flash.models.layout import gather_full

    tp_group, tp_rank, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_world_size()
    mixer.zero_grad()
    shard = (lambda t: t.chunk(tp, dim=0)[tp_rank]) if sequence_parallel else (lambda t: t)
    x = shard(u_full).clone().requires_grad_()
    out = mixer(x, inputs)
    (out * shard(cotangent_full)).sum().backward()  # the sum over ranks of these is the loss under SP
    full = (lambda t: gather_from_sequence_parallel_region(t, group=tp_group)) if sequence_parallel else (lambda t: t)
    result = {"out": full(out.detach()), "grad:input": full(x.grad)}
    for name, p in mixer.named_parameters():
        result[f"param:{name}"] = gather_full(p.detach(), p, tp_group)
        result[f"grad:{name}"] = gather_full(p.grad, p, tp_group)
        if not getattr(p, "tensor_model_parallel", False) and tp > 1:  # replicated: the same on every rank
            both = [torch.empty_like(p.grad) for _ in range(tp)]
            torch.distributed.all_gather(both, p.grad.contiguous(), group=tp_group)
            result[f"replica_gap:{name}"] = (both[0] - both[1]).abs().max()
    return result


def _tp_body(sequence_parallel):
    from megatron_flash.layers.base import MixerInputs
    from megatron_flash.models.layout import shard_of
    from megatron.core import parallel_state as ps

    # fp32 init (as configured), fp64 compute: TP changes reduction order, and fp64 makes that invisible so the
    # comparison can be tight enough to catch any real difference
    mixer = _build(_config(sequence_parallel)).double()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():  # full-tensor perturbations of the constant-initialized sharded parameters
        g = torch.Generator().manual_seed(3)
        for p in (mixer.D, mixer.norm_weight):
            p.add_(shard_of(0.3 * torch.randn(p.numel() * tp, generator=g, dtype=torch.float64), p, tp, tp_rank))
    gen = torch.Generator().manual_seed(4)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    batched = (rand(SEQ, BATCH, HIDDEN), rand(SEQ, BATCH, HIDDEN))
    packed = (rand(SEQ, 1, HIDDEN), rand(SEQ, 1, HIDDEN))
    return {"batched": _run_full_and_gather(mixer, *batched, MixerInputs(), sequence_parallel),
            "packed": _run_full_and_gather(mixer, *packed, _packed_inputs(PACKED_BOUNDS), sequence_parallel)}


def _tp2_body():
    return {sequence_parallel: _tp_body(sequence_parallel) for sequence_parallel in (False, True)}


@pytest.fixture(scope="module")
def tp2():
    """Both TP=2 runs (without and with sequence parallelism) from one spawn of 2 ranks."""
    return run_distributed(_tp2_body, world_size=2, tensor_model_parallel_size=2)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_matches_single_process(single_process, tp2, sequence_parallel):
    ranks = [rank_result[sequence_parallel] for rank_result in tp2]
    for case in ("batched", "packed"):
        want = single_process["tp"][case]
        for rank, got in enumerate(ranks):
            gaps = {k: v for k, v in got[case].items() if k.startswith("replica_gap:")}
            assert gaps and all(v == 0 for v in gaps.values()), f"{case}: replicated grads differ over TP: {gaps}"
            got = {k: v for k, v in got[case].items() if k not in gaps}
            assert got.keys() == want.keys()
            for name, value in want.items():
                # params: identical init at every TP size; the rest to fp64 reduction-order rounding
                tol = dict(rtol=0, atol=0) if name.startswith("param:") else dict(rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(got[name], value, **tol,
                                           msg=lambda m, n=name: f"{case} {n} rank {rank}: {m}")


# --------------------------------------------------------------------------------------------------------------
# Packed documents
# --------------------------------------------------------------------------------------------------------------


def _packed_body():
    mixer = _build(_config()).double()
    u = torch.randn(SEQ, 1, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    packed = mixer(u, _packed_inputs(PACKED_BOUNDS))
    separate = torch.cat([mixer(u[a:b], None) for a, b in zip(PACKED_BOUNDS[:-1], PACKED_BOUNDS[1:])])
    # trailing tokens past the last bound are one more document (megatron's convention for padding)
    tail = mixer(u, _packed_inputs(PACKED_BOUNDS[:-1]))
    unpacked = mixer(u, None)
    return packed, separate, tail, unpacked


def test_packed_documents_equal_separate_runs(single_process):
    packed, separate, tail, unpacked = single_process["packed"]
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tail, separate, rtol=1e-10, atol=1e-12)
    first = PACKED_BOUNDS[1]
    torch.testing.assert_close(packed[:first], unpacked[:first], rtol=1e-10, atol=1e-12)
    assert (packed[first:] - unpacked[first:]).abs().max() > 1e-3  # the restart is real


# --------------------------------------------------------------------------------------------------------------
# Shape at the 1B configuration
# --------------------------------------------------------------------------------------------------------------


def _count_body():
    from megatron_flash.layers.mamba2 import REPLICATED_PARAMS, TP_SHARDED_PARAMS

    config = _config(hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16, num_query_groups=4,
                     mamba_head_dim=64, mamba_state_dim=128, mamba_expand=2, mamba_chunk_size=64,
                     perform_initialization=False)  # shapes only: allocation without init is cheap (~100 MB)
    mixer = _build(config)
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    return shapes, sum(p.numel() for p in mixer.parameters()), list(TP_SHARDED_PARAMS + REPLICATED_PARAMS)


def test_parameter_count_at_1b_shape(single_process):
    shapes, count, own = single_process["count"]
    # the released Nemotron-Flash-1B Mamba2 layer, less its input_layernorm weight [2048]
    assert count == 155095680 // 6 - 2048 == 25847232
    heads, inner, state = 64, 4096, 128
    assert shapes == {
        "in_proj.weight": (heads * (2 * 64 + 1), 2048), "bc_proj_weight": (2 * state, 2048),
        "conv_x_weight": (inner, 4), "conv_x_bias": (inner,), "conv_bc_weight": (2 * state, 4),
        "conv_bc_bias": (2 * state,), "dt_bias": (heads,), "A_log": (heads,), "D": (heads,),
        "norm_weight": (inner,), "out_proj.weight": (2048, inner)}
    assert set(own) | {"in_proj.weight", "out_proj.weight"} == set(shapes)
