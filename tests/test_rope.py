"""ops/rope.py against megatron's own RoPE: the op on random awkward shapes (plain and per-document positions),
and the attention mixer, which applies it itself, against megatron's SelfAttention applying its unfused RoPE."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_flash.ops.rope import apply_rope, rope_angles
from megatron_flash.testing import relative_error, run_distributed

SEQ, BATCH, HEADS, DIM = 37, 3, 5, 24
BOUNDS = [0, 11, 12, 30, SEQ]  # four documents, one of a single token


def _angles(n, dim=DIM, dtype=torch.float32):
    """megatron's RotaryEmbedding table: position * inverse frequency, the half repeated, [n, 1, 1, dim]."""
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    half = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([half, half], dim=-1)[:, None, None, :].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_apply_rope_is_megatrons_rope(dtype):
    t = torch.randn(SEQ, BATCH, HEADS, DIM, dtype=dtype)
    angles = _angles(SEQ, dtype=dtype)
    assert relative_error(apply_rope(t, angles), _apply_rotary_pos_emb_bshd(t, angles)) < 1e-6


def test_bf16_rope_is_the_fp64_rope_rounded():
    t = torch.randn(SEQ, BATCH, HEADS, DIM, dtype=torch.bfloat16)
    exact = apply_rope(t.double(), _angles(SEQ, dtype=torch.float64))
    got = apply_rope(t, _angles(SEQ))
    assert got.dtype == torch.bfloat16
    assert relative_error(got, exact) < 4e-3  # one bf16 rounding (2^-8 relative at most)


def test_packed_positions_restart_at_each_document():
    t = torch.randn(SEQ, 1, HEADS, DIM, dtype=torch.float64)
    table = _angles(max(b - a for a, b in zip(BOUNDS, BOUNDS[1:])), dtype=torch.float64)
    angles = rope_angles(table, SEQ, torch.tensor(BOUNDS, dtype=torch.int32))
    want = torch.cat([_apply_rotary_pos_emb_bshd(t[a:b], table[:b - a]) for a, b in zip(BOUNDS, BOUNDS[1:])])
    assert relative_error(apply_rope(t, angles), want) < 1e-12


def test_plain_positions_and_a_short_table():
    table = _angles(SEQ + 5)
    assert torch.equal(rope_angles(table, SEQ), table[:SEQ])
    with pytest.raises(ValueError, match="cover 36 positions, the sequence has 37"):
        rope_angles(_angles(SEQ - 1), SEQ)


def _attention_body():
    """The mixer's output and input gradient, and megatron's SelfAttention.forward given the angles on the same
    module (its unfused RoPE; the mixer's own is off outside its forward), plain and with packed documents."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.spec_utils import build_module

    from megatron_flash.config import make_config
    from megatron_flash.layers.base import MixerInputs
    from megatron_flash.models.specs import mixer_spec

    config = make_config(hidden_size=48, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                         layer_pattern="A", use_cpu_initialization=True, params_dtype=torch.float32)
    torch.manual_seed(0)
    mixer = build_module(mixer_spec("A"), config=config, layer_number=1)
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    cases = {"plain": (BATCH, _angles(SEQ, 12), None),
             "packed": (1, _angles(18, 12), PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                            max_seqlen_q=18, max_seqlen_kv=18))}
    results = {}
    for name, (batch, table, packed) in cases.items():
        x = torch.randn(SEQ, batch, 48)
        runs = {"ours": lambda h: mixer(h, MixerInputs(rotary_pos_emb=table, packed_seq_params=packed)),
                "megatron": lambda h: SelfAttention.forward(mixer, h, attention_mask=None, rotary_pos_emb=table,
                                                            packed_seq_params=packed)[0]}
        for run, forward in runs.items():
            h = x.clone().requires_grad_()
            out = forward(h)
            out.pow(2).sum().backward()
            results[name, run] = (out.detach(), h.grad)
    return results


def test_attention_mixer_applies_megatrons_rope():
    results = run_distributed(_attention_body, world_size=1)[0]
    for name in ("plain", "packed"):
        (out, grad), (want_out, want_grad) = results[name, "ours"], results[name, "megatron"]
        assert relative_error(out, want_out) < 1e-5, name
        assert relative_error(grad, want_grad) < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel runs on GPUs")
def test_compiled_rope_on_the_gpu():
    t = torch.randn(4099, 2, 4, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    angles = _angles(4099, 128).cuda()
    exact = apply_rope(t.detach().double(), angles.double())
    got = apply_rope(t, angles)
    assert relative_error(got, exact) < 4e-3
    dy = torch.randn_like(got)
    got.backward(dy)
    t64 = t.detach().double().requires_grad_()
    apply_rope(t64, angles.double()).backward(dy.double())
    assert relative_error(t.grad, t64.grad) < 4e-3
