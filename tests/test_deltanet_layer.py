"""DeltaNetMixer: against a plain implementation written here from the layer's own weights (unfused q/k/v/b slices,
F.conv1d, the delta-rule loop); packed documents against running each document alone; TP=2 (with and without
sequence parallelism) against one process: outputs, input gradients and TP-gathered parameter gradients;
layout-invariant CPU initialization and the checkpoint sharding metadata. On CUDA also against fla's DeltaNet
layer with the same weights (fla's layer needs Triton kernels for its convs, norm and delta rule)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_flash.ops.delta_rule import delta_rule_reference
from megatron_flash.testing import init_layout_invariant, run_distributed

HIDDEN, HEADS, HEAD_DIM, KERNEL, EPS = 64, 4, 16, 4, 1e-5
SEQ, BATCH = 70, 2
DOC_BOUNDS = [0, 29, 30, 70]  # three packed documents, one of a single token


def _config(**overrides):
    from megatron.core import parallel_state as ps

    from megatron_flash.config import make_config

    fields = dict(hidden_size=HIDDEN, ffn_hidden_size=2 * HIDDEN, num_attention_heads=HEADS, num_query_groups=HEADS,
                  layer_pattern="D", deltanet_head_dim=HEAD_DIM, deltanet_conv_kernel=KERNEL, deltanet_norm_eps=EPS,
                  use_cpu_initialization=True, params_dtype=torch.float32, delta_rule_backend="torch",
                  tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size())
    fields.update(overrides)
    return make_config(**fields)


def _mixer(config):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_flash.models.specs import mixer_spec

    return build_module(mixer_spec("D"), config=config, layer_number=1)


def _case_inputs(packed):
    """(x [s, b, hidden], output-gradient weights, cu_seqlens or None), identical in every process."""
    g = torch.Generator().manual_seed(7 if packed else 5)
    batch = 1 if packed else BATCH
    x = torch.randn(SEQ, batch, HIDDEN, generator=g)
    out_weights = torch.randn(SEQ, batch, HIDDEN, generator=g)
    cu_seqlens = torch.tensor(DOC_BOUNDS, dtype=torch.int32) if packed else None
    return x, out_weights, cu_seqlens


def _packed_params(cu_seqlens):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=int(cu_seqlens.diff().max()), max_seqlen_kv=int(cu_seqlens.diff().max()))


# --------------------------------------------------------------------------------------------------------------
# what each rank runs
# --------------------------------------------------------------------------------------------------------------


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_group()


def _gather(t, dim):
    size, _, group = _tp()
    if size == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _full_tensors(module, grads):
    """Every parameter (or its gradient) as the full logical tensor, TP shards gathered."""
    from megatron_flash.models.layout import gather_full

    group = _tp()[2]
    return {name: gather_full((p.grad if grads else p.data).detach().clone(), p, group)
            for name, p in module.named_parameters()}


def _forward_backward(mixer, x_full, out_weights, cu_seqlens, sequence_parallel):
    """Run one case on this rank; return the full output, input gradient and parameter gradients."""
    from megatron_flash.layers.base import MixerInputs

    inputs = MixerInputs(packed_seq_params=_packed_params(cu_seqlens) if cu_seqlens is not None else None)
    return _forward_backward_inputs(mixer, x_full, out_weights, inputs, sequence_parallel)


def _forward_backward_inputs(mixer, x_full, out_weights, inputs, sequence_parallel=False):
    size, rank, _ = _tp()
    shard = (lambda t: t.chunk(size, dim=0)[rank]) if sequence_parallel else (lambda t: t)
    x = shard(x_full).clone().requires_grad_()
    mixer.zero_grad()
    out = mixer(x, inputs)
    (out * shard(out_weights)).sum().backward()
    gather_seq = (lambda t: _gather(t, 0)) if sequence_parallel else (lambda t: t.detach().clone())
    return {"out": gather_seq(out), "x_grad": gather_seq(x.grad), "grads": _full_tensors(mixer, grads=True)}


def _checkpoint_layout(mixer):
    """Checkpoint key -> (global shape, global offset, replica id), stacked tensors by section."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    tensors = []
    for t in mixer.sharded_state_dict(prefix="mixer.").values():
        tensors += t.build() if isinstance(t, ShardedTensorFactory) else [t]
    return {t.key: (tuple(t.global_shape), tuple(t.global_offset), t.replica_id) for t in tensors}


def _body(sequence_parallel):
    """Native init (gathered), then layout-invariant weights; the unpacked and packed cases; at TP=1 also each
    packed document on its own."""
    mixer = _mixer(_config(sequence_parallel=sequence_parallel))
    result = {"init": _full_tensors(mixer, grads=False), "checkpoint": _checkpoint_layout(mixer)}
    init_layout_invariant(mixer)
    result["params"] = _full_tensors(mixer, grads=False)
    for packed in (False, True):
        x, w, cu = _case_inputs(packed)
        result["packed" if packed else "unpacked"] = _forward_backward(mixer, x, w, cu, sequence_parallel)
    if _tp()[0] == 1:
        x, w, _ = _case_inputs(packed=True)
        result["documents"] = [_forward_backward(mixer, x[s:e], w[s:e], None, False)
                               for s, e in zip(DOC_BOUNDS[:-1], DOC_BOUNDS[1:])]
    return result


@pytest.fixture(scope="module")
def single():
    return run_distributed(_body, world_size=1, args=(False,))[0]


# --------------------------------------------------------------------------------------------------------------
# the plain implementation: fla's DeltaNet math, unfused weights read from the stacked layout
# --------------------------------------------------------------------------------------------------------------


def _unfused(params):
    """q/k/v/b projections [H*d, hidden] / [H, hidden] and q/k/v conv weights [H*d, K], by the stacked layout
    [q; k; v; b] and [q; k; v]."""
    proj = dict(zip("qkvb", params["in_proj.weight"].split([HEADS * HEAD_DIM] * 3 + [HEADS])))
    conv = dict(zip("qkv", params["conv_weight"].split(HEADS * HEAD_DIM)))
    return proj, conv


def _plain_deltanet(x, params, cu_seqlens=None):
    """x [s, b, hidden] -> [s, b, hidden], computed in fp64."""
    params = {n: p.double() for n, p in params.items()}
    proj, conv = _unfused(params)
    xb = x.double().transpose(0, 1)  # [b, s, hidden]
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, x.shape[0]]

    def short_conv_silu(y, weight):  # depthwise causal conv restarting at every document, then silu
        pieces = [F.conv1d(F.pad(y[:, s:e].transpose(1, 2), (KERNEL - 1, 0)), weight.unsqueeze(1),
                           groups=weight.shape[0]) for s, e in zip(bounds[:-1], bounds[1:])]
        return F.silu(torch.cat(pieces, dim=-1).transpose(1, 2))

    def heads(y):
        return y.view(*y.shape[:2], HEADS, HEAD_DIM)

    def l2(y):
        return y / torch.sqrt(y.square().sum(-1, keepdim=True) + 1e-6)

    q, k, v = (heads(short_conv_silu(xb @ proj[n].t(), conv[n])) for n in "qkv")
    beta = torch.sigmoid(xb @ proj["b"].t())
    o, _ = delta_rule_reference(l2(q), l2(k), v, beta, cu_seqlens=cu_seqlens)
    o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + EPS) * params["o_norm_weight"]
    return (o.flatten(2) @ params["out_proj.weight"].t()).transpose(0, 1)


def _plain_forward_backward(params, packed):
    x, out_weights, cu_seqlens = _case_inputs(packed)
    leaves = {n: p.double().requires_grad_() for n, p in params.items()}
    x = x.double().requires_grad_()
    out = _plain_deltanet(x, leaves, cu_seqlens)
    (out * out_weights.double()).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "grads": {n: p.grad for n, p in leaves.items()}}


def _assert_same(got, want, what, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _assert_runs_match(got, want, label, **tol):
    _assert_same(got["out"], want["out"], f"{label} output", **tol)
    _assert_same(got["x_grad"], want["x_grad"], f"{label} input grad", **tol)
    assert got["grads"].keys() == want["grads"].keys()
    for name, g in want["grads"].items():
        _assert_same(got["grads"][name], g, f"{label} grad of {name}", **tol)


# --------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------


def test_parameters_and_layout(single):
    params = single["init"]
    assert {n: tuple(p.shape) for n, p in params.items()} == {
        "in_proj.weight": (HEADS * (3 * HEAD_DIM + 1), HIDDEN), "conv_weight": (HEADS * 3 * HEAD_DIM, KERNEL),
        "o_norm_weight": (HEAD_DIM,), "out_proj.weight": (HIDDEN, HEADS * HEAD_DIM)}
    assert torch.equal(params["o_norm_weight"], torch.ones(HEAD_DIM))
    bound = KERNEL ** -0.5  # nn.Conv1d's default init for a depthwise conv
    conv = params["conv_weight"]
    assert conv.abs().max() <= bound and conv.abs().max() > 0.8 * bound and abs(conv.mean()) < 0.05


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_matches_plain_implementation(single, packed):
    _assert_runs_match(single["packed" if packed else "unpacked"], _plain_forward_backward(single["params"], packed),
                       "mixer vs plain")


def test_packed_documents_equal_separate_runs(single):
    packed, docs = single["packed"], single["documents"]
    _assert_same(packed["out"], torch.cat([d["out"] for d in docs]), "output")
    _assert_same(packed["x_grad"], torch.cat([d["x_grad"] for d in docs]), "input grad")
    for name, g in packed["grads"].items():
        _assert_same(g, sum(d["grads"][name] for d in docs), f"grad of {name}")


def test_fla_state_conversion_round_trips(single):
    from megatron_flash.layers.deltanet import fla_to_fused_state, fused_to_fla_state

    params = single["params"]
    fla_state = fused_to_fla_state(params, HEADS)
    proj, conv = _unfused(params)
    for n in "qkv":
        assert torch.equal(fla_state[f"{n}_proj.weight"], proj[n])
        assert torch.equal(fla_state[f"{n}_conv1d.weight"], conv[n].unsqueeze(1))  # nn.Conv1d's [C, 1, K]
    assert torch.equal(fla_state["b_proj.weight"], proj["b"])
    back = fla_to_fused_state(fla_state)
    assert back.keys() == params.keys() and all(torch.equal(back[n], params[n]) for n in params)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_matches_single_process(single, sequence_parallel):
    got = run_distributed(_body, world_size=2, tensor_model_parallel_size=2, args=(sequence_parallel,))
    for rank, result in enumerate(got):
        # use_cpu_initialization draws full tensors and shards them: the same model at any TP size
        for name, p in single["init"].items():
            torch.testing.assert_close(result["init"][name], p, rtol=0, atol=0, msg=lambda m: f"init {name}: {m}")
        for case in ("unpacked", "packed"):
            # the o_norm grad is all-reduced over TP in backward, so each rank holds the full sum
            _assert_runs_match(result[case], single[case], f"rank {rank} {case}")
    # checkpoint metadata: each section of the stacked conv and in_proj and the out_proj sharded on their head dim,
    # the norm weight replicated
    layout = got[1]["checkpoint"]
    width = HEADS * HEAD_DIM
    for n in "qkv":
        assert layout[f"mixer.conv_weight.{n}"][:2] == ((width, KERNEL), (width // 2, 0))
        assert layout[f"mixer.in_proj.weight.{n}"][:2] == ((width, HIDDEN), (width // 2, 0))
    assert layout["mixer.in_proj.weight.beta"][:2] == ((HEADS, HIDDEN), (HEADS // 2, 0))
    assert layout["mixer.out_proj.weight"][:2] == ((HIDDEN, HEADS * HEAD_DIM), (0, HEADS * HEAD_DIM // 2))
    assert layout["mixer.o_norm_weight"][:2] == ((HEAD_DIM,), (0,))
    assert layout["mixer.o_norm_weight"][2] != got[0]["checkpoint"]["mixer.o_norm_weight"][2]  # replicas differ


# --------------------------------------------------------------------------------------------------------------
# fla's own layer (CUDA only)
# --------------------------------------------------------------------------------------------------------------


def _fla_body(hidden, heads, head_dim, seq, batch):
    """bf16 on one GPU: DeltaNetMixer (fla kernels) and fla.layers.DeltaNet loaded with the same weights."""
    from fla.layers import DeltaNet

    from megatron_flash.layers.base import MixerInputs
    from megatron_flash.layers.deltanet import fused_to_fla_state

    config = _config(hidden_size=hidden, num_attention_heads=heads, num_query_groups=heads, deltanet_head_dim=head_dim,
                     ffn_hidden_size=2 * hidden, use_cpu_initialization=False, params_dtype=torch.bfloat16,
                     delta_rule_backend="auto")
    mixer = _mixer(config)
    layer = DeltaNet(hidden_size=hidden, num_heads=heads, expand_k=heads * head_dim / hidden,
                     expand_v=heads * head_dim / hidden, norm_eps=EPS).cuda()
    state = {n: p.detach().float() for n, p in mixer.state_dict().items() if not n.endswith("_extra_state")}
    layer.load_state_dict(fused_to_fla_state(state, heads))
    layer.to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(seq, batch, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    ours = mixer(x, MixerInputs())
    theirs, _, _ = layer(x.transpose(0, 1))
    return {"ours": ours.float().cpu(), "theirs": theirs.transpose(0, 1).float().cpu()}


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="fla's DeltaNet layer runs Triton kernels only (ShortConvolution, RMSNorm, "
                           "chunk_delta_rule): on this CPU machine it fails with '0 active drivers'")
def test_matches_fla_deltanet_layer_on_cuda():
    pytest.importorskip("fla")
    result = run_distributed(_fla_body, world_size=1, args=(HIDDEN, HEADS, HEAD_DIM, 200, 2))[0]
    rel = ((result["ours"] - result["theirs"]).norm() / result["theirs"].norm()).item()
    assert rel < 1e-2, f"relative difference to fla's DeltaNet: {rel:.3g}"
