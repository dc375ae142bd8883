"""The shipped Hugging Face modeling code (megatron_flash/hf): released parameter layout, every mixer against a
plain sequential fp64 reference written here, the whole model against a reference composition, cached decoding,
generate(), and a save_pretrained -> AutoModelForCausalLM(trust_remote_code) round trip."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_flash.hf import configuration_nemotron_flash, modeling_nemotron_flash
from megatron_flash.hf.configuration_nemotron_flash import NemotronFlashConfig
from megatron_flash.hf.modeling_nemotron_flash import (
    NemotronFlashAttention,
    NemotronFlashCache,
    NemotronFlashDeltaNet,
    NemotronFlashForCausalLM,
    NemotronFlashMamba2,
)

# NVIDIA's released parameter names/shapes, in the shared/ folder beside the developer checkout.
OFFICIAL_LAYOUT = (Path(__file__).resolve().parents[2] / "shared" / "data" / "official_layout")
RELEASED_LAYER_TYPES = {"deltanet", "m2", "a", "f"}
RELEASED_1B_CONFIG = {
    "vocab_size": 131072, "num_memory_tokens": 256, "intermediate_size": 0, "ffn_expand_ratio": 3,
    "mlp_hidden_act": "silu", "hidden_act": "silu", "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_expand": 2,
    "mamba2_headdim": 64, "mamba_conv_bias": True, "mamba_proj_bias": False, "rms_norm_eps": 1e-06,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "attn_implementation_new": "fused_mha",
    "hybrid_decoder_layer": "mamba", "d_conv": 4, "rope": True, "rope_type": None, "rope_theta": 10000.0,
    "kq_norm": "none", "attn_hidden_size": -1, "kq_head_dim": -1, "v_head_dim": -1, "sliding_window": None,
    "global_attn_idx": [], "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 4,
    "layer_types": ["deltanet", "f", "m2", "f", "a", "f", "m2", "f"] * 2
    + ["deltanet", "f", "m2", "f", "deltanet", "f", "m2", "f"],
    "num_hidden_layers": 24, "tie_word_embeddings": True,
}


def tiny_config(**overrides) -> NemotronFlashConfig:
    """One block of each type; attention layer 3 global, layer 5 with a 5-token sliding window."""
    fields = dict(
        vocab_size=97,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["deltanet", "f", "m2", "a", "f", "a"],
        sliding_window=5,
        global_attn_idx=[3],
        num_memory_tokens=6,
        ffn_expand_ratio=3,
        mamba_d_state=16,
        mamba_expand=2,
        mamba2_headdim=16,
        eos_token_id=None,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return NemotronFlashConfig(**fields)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Weights far from the init (norm weights != 1, D != 1, random biases) so that every term matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("A_log"):
                param.copy_(torch.empty(param.shape).uniform_(1.0, 16.0, generator=generator).log())
            elif name.endswith("dt_bias"):
                param.copy_(noise - 2.0)
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith(".D"):
                param.copy_(1.0 + 0.3 * noise)
            elif param.dim() >= 2 and "conv1d" not in name:
                param.copy_(noise * param.shape[-1] ** -0.5 * (1.0 if "embed" not in name else param.shape[-1] ** 0.5))
            else:
                param.copy_(0.5 * noise)


# ------------------------------------------------------------------------------------------------------------
# Plain sequential references (fp64), independent of the model code
# ------------------------------------------------------------------------------------------------------------


def ref_rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def ref_causal_conv(x, weight, bias=None):
    """out[t, c] = bias[c] + sum_i w[c, 0, i] * x[t - K + 1 + i, c], zero before the start."""
    weight = weight.double()
    kernel = weight.shape[-1]
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for i in range(kernel):
            source = t - kernel + 1 + i
            if source >= 0:
                out[:, t] += weight[:, 0, i] * x[:, source]
    return out if bias is None else out + bias.double()


def linear(x, layer):
    out = x @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


def ref_deltanet(module: NemotronFlashDeltaNet, x):
    heads, dim = module.num_heads, module.head_dim
    batch, length, _ = x.shape

    def branch(proj, conv):
        return F.silu(ref_causal_conv(linear(x, proj), conv.weight)).view(batch, length, heads, dim)

    q, k, v = branch(module.q_proj, module.q_conv1d), branch(module.k_proj, module.k_conv1d), branch(
        module.v_proj, module.v_conv1d
    )
    q = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(linear(x, module.b_proj))
    state = torch.zeros(batch, heads, dim, dim, dtype=torch.float64)
    outputs = []
    for t in range(length):
        k_t, v_t, beta_t = k[:, t], v[:, t], beta[:, t, :, None]
        predicted = torch.einsum("bhkv,bhk->bhv", state, k_t)
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, beta_t * (v_t - predicted))
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t] * dim**-0.5))
    o = ref_rms_norm(torch.stack(outputs, dim=1), module.o_norm.weight, 1e-5)
    return linear(o.reshape(batch, length, heads * dim), module.o_proj)


def ref_mamba2(module: NemotronFlashMamba2, x):
    batch, length, _ = x.shape
    d_inner, heads, head_dim, d_state = module.d_inner, module.num_heads, module.head_dim, module.state_dim
    projected = linear(x, module.in_proj)
    z = projected[..., :d_inner]
    xBC = projected[..., d_inner : 2 * d_inner + 2 * d_state]
    dt = projected[..., 2 * d_inner + 2 * d_state :]
    assert dt.shape[-1] == heads
    xBC = F.silu(ref_causal_conv(xBC, module.conv1d.weight, module.conv1d.bias))
    xs = xBC[..., :d_inner].reshape(batch, length, heads, head_dim)
    B, C = xBC[..., d_inner : d_inner + d_state], xBC[..., d_inner + d_state :]
    dt = F.softplus(dt + module.dt_bias.double())
    A = -torch.exp(module.A_log.double())
    D = module.D.double()
    state = torch.zeros(batch, heads, head_dim, d_state, dtype=torch.float64)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + dt[:, t, :, None, None] * xs[:, t, :, :, None] * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", state, C[:, t]) + D[:, None] * xs[:, t])
    y = torch.stack(ys, dim=1).reshape(batch, length, d_inner)
    gated = y * F.silu(z)
    y = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5) * module.norm.weight.double()
    return linear(y, module.out_proj)


def ref_attention(module: NemotronFlashAttention, x, positions, window):
    """Explicit RoPE (pairs (i, i + D/2)), GQA by head index, masked softmax; query i sees i - window < j <= i."""
    batch, length, _ = x.shape
    heads, kv_heads, dim = module.num_heads, module.num_kv_heads, module.head_dim
    q = linear(x, module.q_proj).view(batch, length, heads, dim)
    k = linear(x, module.k_proj).view(batch, length, kv_heads, dim)
    v = linear(x, module.v_proj).view(batch, length, kv_heads, dim)
    half = dim // 2
    freq = module.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    angle = positions.double()[:, :, None, None] * freq  # [B, T, 1, D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rope(t):
        first, second = t[..., :half], t[..., half:]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    q, k = rope(q), rope(k)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    out = torch.zeros(batch, length, heads, dim, dtype=torch.float64)
    for h in range(heads):
        kv = h // (heads // kv_heads)
        scores = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, kv]) / math.sqrt(dim)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, h] = torch.softmax(scores, dim=-1) @ v[:, :, kv]
    return linear(out.reshape(batch, length, heads * dim), module.o_proj)


def ref_causal_lm_logits(model: NemotronFlashForCausalLM, input_ids):
    """The whole model composed from the references above (memory tokens, positions, norms, normalized head)."""
    config, inner = model.config, model.model
    memory = inner.memory_tokens.double()
    batch, length = input_ids.shape
    h = torch.cat([memory.expand(batch, -1, -1), inner.embed_tokens.weight.double()[input_ids]], dim=1)
    total = h.shape[1]
    positions = torch.arange(total).expand(batch, -1)
    for index, layer in enumerate(inner.layers):
        layer_type = config.layer_types[index]
        if layer_type == "f":
            ffn = layer.ffn
            normed = ref_rms_norm(h, layer.pre_ffn_layernorm.weight, config.rms_norm_eps)
            h = h + linear(F.silu(linear(normed, ffn.gate_proj)) * linear(normed, ffn.up_proj), ffn.down_proj)
            continue
        normed = ref_rms_norm(h, layer.input_layernorm.weight, config.rms_norm_eps)
        if layer_type == "deltanet":
            h = h + ref_deltanet(layer.gla, normed)
        elif layer_type == "m2":
            h = h + ref_mamba2(layer.mamba, normed)
        else:
            window = None if index in config.global_attn_idx else config.sliding_window
            h = h + ref_attention(layer.self_attn, normed, positions, window)
    h = ref_rms_norm(h, inner.final_layernorm.weight, config.rms_norm_eps)[:, config.num_memory_tokens :]
    weight = model.lm_head.weight.double()
    assert h.shape[1] == length and total == length + config.num_memory_tokens
    return h @ (weight / weight.norm(dim=1, keepdim=True)).T


def assert_close(actual, expected, tol):
    expected = expected.to(actual.dtype)
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= tol * max(scale, 1.0), f"max abs error {error:.3g} (reference scale {scale:.3g})"


# ------------------------------------------------------------------------------------------------------------
# Released layout
# ------------------------------------------------------------------------------------------------------------


# Released sizes, for machines without ../shared: config fields that differ from the 1B defaults, and the exact
# parameter count of NVIDIA's model (the official_layout files' "total").
_3B_LAYER_TYPES = ["deltanet", "f", "m2", "f", "a", "f", "m2", "f"] * 2 + [
    "deltanet", "f", "m2", "f", "a", "f", "m2", "f",
    "deltanet", "f", "m2", "f", "deltanet", "f", "m2", "f", "deltanet", "f", "m2", "f",
]
RELEASED_SIZES = {
    "1b_tied": ({}, 965_389_440),
    "1b_untied": ({"tie_word_embeddings": False}, 1_233_824_896),
    "3b_tied": (dict(hidden_size=3072, num_attention_heads=24, num_key_value_heads=6, layer_types=_3B_LAYER_TYPES),
                2_749_998_624),
    "3b_untied": (dict(hidden_size=3072, num_attention_heads=24, num_key_value_heads=6, layer_types=_3B_LAYER_TYPES,
                       tie_word_embeddings=False), 3_152_651_808),
}


@pytest.mark.parametrize("name", sorted(RELEASED_SIZES))
def test_released_parameter_counts(name):
    overrides, total = RELEASED_SIZES[name]
    with torch.device("meta"):
        model = NemotronFlashForCausalLM(NemotronFlashConfig(**overrides))
    assert sum(p.numel() for p in model.parameters()) == total
    tied = overrides.get("tie_word_embeddings", True)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("name", sorted(RELEASED_SIZES))
def test_released_parameter_layout(name):
    """Every state-dict name and shape, the count and the tied aliases of the official_layout file."""
    path = OFFICIAL_LAYOUT / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not found (shared/ data is beside the developer checkout)")
    official = json.loads(path.read_text())
    assert official["total"] == RELEASED_SIZES[name][1]
    config = NemotronFlashConfig(**official["config"])
    for field, value in official["config"].items():
        assert getattr(config, field) == value, field
    with torch.device("meta"):
        model = NemotronFlashForCausalLM(config)
    state_shapes = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    assert state_shapes == official["params"]
    assert sum(p.numel() for p in model.parameters()) == official["total"]
    for alias, source in official["tied_aliases"].items():
        assert model.get_parameter(alias) is model.get_parameter(source)
    if not official["tied_aliases"]:
        assert model.lm_head.weight is not model.model.embed_tokens.weight


# ------------------------------------------------------------------------------------------------------------
# Mixers against the sequential references
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [70, 129])
def test_deltanet_matches_sequential_reference(length):
    module = NemotronFlashDeltaNet(tiny_config(), layer_idx=0)
    randomize_(module, seed=length)
    x = torch.randn(2, length, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(module(x), ref_deltanet(module, x.double()), 2e-5)


@pytest.mark.parametrize("length", [70, 129])
def test_mamba2_matches_sequential_reference(length):
    module = NemotronFlashMamba2(tiny_config(), layer_idx=2)
    randomize_(module, seed=length)
    x = torch.randn(2, length, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(module(x), ref_mamba2(module, x.double()), 2e-5)


@pytest.mark.parametrize("length", [70, 129])
@pytest.mark.parametrize("window", [None, 5, 64])
def test_attention_matches_masked_softmax(length, window):
    module = NemotronFlashAttention(tiny_config(sliding_window=window, global_attn_idx=[]), layer_idx=3)
    assert module.sliding_window == window
    randomize_(module, seed=length)
    x = torch.randn(2, length, 64, generator=torch.Generator().manual_seed(3))
    positions = (torch.arange(length) + 11).expand(2, -1)  # an offset, as behind memory tokens
    with torch.no_grad():
        assert_close(module(x, positions), ref_attention(module, x.double(), positions, window), 2e-5)


def test_chunked_scans_carry_state_across_calls():
    """Splitting a sequence over calls (initial_state in, final state out) equals one call, for both scans."""
    g = torch.Generator().manual_seed(4)
    q, k = (F.normalize(torch.randn(2, 100, 3, 16, generator=g), dim=-1) for _ in range(2))
    v, beta = torch.randn(2, 100, 3, 8, generator=g), torch.rand(2, 100, 3, generator=g)
    whole, whole_state = modeling_nemotron_flash.delta_rule_chunked(q, k, v, beta)
    first, state = modeling_nemotron_flash.delta_rule_chunked(q[:, :67], k[:, :67], v[:, :67], beta[:, :67])
    second, state = modeling_nemotron_flash.delta_rule_chunked(q[:, 67:], k[:, 67:], v[:, 67:], beta[:, 67:], state)
    assert_close(torch.cat([first, second], 1), whole, 1e-5)
    assert_close(state, whole_state, 1e-5)

    x, dt = torch.randn(2, 100, 4, 8, generator=g), F.softplus(torch.randn(2, 100, 4, generator=g))
    A, D = -torch.rand(4, generator=g) * 3, torch.randn(4, generator=g)
    B, C = torch.randn(2, 100, 5, generator=g), torch.randn(2, 100, 5, generator=g)
    whole, whole_state = modeling_nemotron_flash.mamba2_scan_chunked(x, dt, A, B, C, D)
    first, state = modeling_nemotron_flash.mamba2_scan_chunked(x[:, :67], dt[:, :67], A, B[:, :67], C[:, :67], D)
    second, state = modeling_nemotron_flash.mamba2_scan_chunked(
        x[:, 67:], dt[:, 67:], A, B[:, 67:], C[:, 67:], D, state
    )
    assert_close(torch.cat([first, second], 1), whole, 1e-5)
    assert_close(state, whole_state, 1e-5)


# ------------------------------------------------------------------------------------------------------------
# The whole model: reference composition, cached decoding, generate, loss
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = NemotronFlashForCausalLM(tiny_config()).eval()
    randomize_(model, seed=5)
    return model


def prompt(length, batch=2, seed=6):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_model_matches_reference_composition(tiny_model):
    ids = prompt(19)
    with torch.no_grad():
        logits = tiny_model(ids, use_cache=False).logits
        assert logits.shape == (2, 19, 97) and logits.dtype == torch.float32
        assert_close(logits, ref_causal_lm_logits(tiny_model, ids), 2e-5)
        # logits_to_keep=n gives the last n positions.
        assert_close(tiny_model(ids, logits_to_keep=3).logits, logits[:, -3:], 1e-6)


def test_cached_decoding_matches_full_forward(tiny_model):
    """Prefill 7 tokens, continue with 5 at once (mask against cached keys, window trimming), then one at a time."""
    ids = prompt(20)
    with torch.no_grad():
        full = tiny_model(ids, use_cache=False).logits
        out = tiny_model(ids[:, :7], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, NemotronFlashCache)
        assert (cache.get_seq_length(), cache.stream_length) == (7, 7 + 6)
        pieces = [out.logits]
        out = tiny_model(ids[:, 7:12], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
        for t in range(12, 20):
            out = tiny_model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    assert_close(torch.cat(pieces, dim=1), full, 2e-5)
    assert cache.get_seq_length() == 20
    # The windowed layer (5) keeps only window - 1 keys; the global layer (3) keeps memory + text.
    assert cache.key_cache[5].shape[2] == 4 and cache.key_cache[3].shape[2] == 26


def test_generate_greedy_matches_full_forward_argmax_loop(tiny_model):
    ids = prompt(9, seed=7)
    with torch.no_grad():
        generated = tiny_model.generate(
            ids, do_sample=False, max_new_tokens=8, return_dict_in_generate=True, pad_token_id=0
        )
        expected = ids
        for _ in range(8):
            next_token = tiny_model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated.sequences, expected)
    # generate() decoded through the cache: it has seen the prompt and all but the last new token.
    assert isinstance(generated.past_key_values, NemotronFlashCache)
    assert generated.past_key_values.get_seq_length() == 9 + 8 - 1


def test_loss_is_shifted_cross_entropy(tiny_model):
    ids = prompt(12)
    labels = ids.clone()
    labels[0, 4] = -100
    with torch.no_grad():
        out = tiny_model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_padding_is_refused(tiny_model):
    ids = prompt(5)
    mask = torch.ones_like(ids)
    tiny_model(ids, attention_mask=mask)  # all ones is fine
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded"):
        tiny_model(ids, attention_mask=mask)


# ------------------------------------------------------------------------------------------------------------
# Shipping: config.json and remote-code loading
# ------------------------------------------------------------------------------------------------------------


def test_config_json_has_released_fields(tmp_path):
    path = OFFICIAL_LAYOUT / "1b_tied.json"
    # Without shared/: the released 1B config fields, as in that file.
    official = json.loads(path.read_text())["config"] if path.exists() else RELEASED_1B_CONFIG
    NemotronFlashConfig(**official, dtype="bfloat16").save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for field, value in official.items():
        assert written[field] == value, field
    assert set(written["layer_types"]) == RELEASED_LAYER_TYPES
    assert written["architectures"] == ["NemotronFlashForCausalLM"]
    assert written["model_type"] == "nemotron_flash"
    assert written["torch_dtype"] == "bfloat16"
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_nemotron_flash.NemotronFlashForCausalLM"
    with pytest.raises(ValueError, match="layer_types"):
        NemotronFlashConfig(layer_types=["deltanet", "full_attention"])


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_as_remote_code(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    # transformers' copy of the remote code goes to the session's HF_MODULES_CACHE (tests/conftest.py)
    model = NemotronFlashForCausalLM(tiny_config(tie_word_embeddings=tied)).eval()
    randomize_(model, seed=8)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    for module in (configuration_nemotron_flash, modeling_nemotron_flash):
        shutil.copy(module.__file__, folder)

    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(loaded).__module__ != NemotronFlashForCausalLM.__module__  # really the copied remote code
    assert type(loaded).__name__ == "NemotronFlashForCausalLM"
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    ids = prompt(11)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bfloat16_model_runs_and_tracks_fp32(tiny_model):
    """bf16 weights: the fp32 parts (scans, norms) and cache dtypes hold together; logits stay near fp32's."""
    model = NemotronFlashForCausalLM(tiny_config()).eval()
    model.load_state_dict(tiny_model.state_dict())
    model = model.to(torch.bfloat16)
    ids = prompt(9)
    with torch.no_grad():
        logits = model(ids).logits
        reference = tiny_model(ids).logits
        assert_close(logits, reference, 0.05)
        assert model.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=0).shape == (2, 13)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    model = NemotronFlashForCausalLM(tiny_config()).train()
    model.load_state_dict(tiny_model.state_dict())
    ids = prompt(10)

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    # transformers 5.23 renamed gradient_checkpointing_enable (now a deprecated alias).
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    enable()
    assert model.model.gradient_checkpointing
    checkpointed = gradients()
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name  # every parameter takes part
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# CUDA (skipped on CPU-only machines): fla's delta-rule kernels against the PyTorch path
# ------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_deltanet_fla_kernels_match_pytorch_path(monkeypatch):
    """bf16 on CUDA goes through fla (chunk kernel for the prefill, fused recurrent for decode steps); the PyTorch
    path on the same bf16 module and inputs computes in fp32, so they agree to bf16 rounding."""
    pytest.importorskip("fla.ops.delta_rule")
    config = tiny_config(hidden_size=256, num_attention_heads=2, num_key_value_heads=1)  # head dim 128, as released
    module = NemotronFlashDeltaNet(config, layer_idx=0)
    randomize_(module, seed=9)
    module = module.to("cuda", torch.bfloat16)
    x = torch.randn(2, 150, 256, generator=torch.Generator().manual_seed(10)).to("cuda", torch.bfloat16)
    with torch.no_grad():
        cache = NemotronFlashCache(config)
        with_fla = [module(x[:, :144], cache)]
        cache.advance(144, 144)
        for t in range(144, 150):
            with_fla.append(module(x[:, t : t + 1], cache))
            cache.advance(1, 1)
        assert modeling_nemotron_flash._FLA_DELTA_RULE, "fla kernels were not used"
        monkeypatch.setattr(modeling_nemotron_flash, "_FLA_DELTA_RULE", False)
        pytorch_path = module(x)
    assert_close(torch.cat(with_fla, dim=1).float(), pytorch_path.float(), 2e-2)


@needs_cuda
def test_model_on_cuda_matches_cpu(tiny_model):
    """fp32 on CUDA (PyTorch path) matches the CPU model; bf16 on CUDA (fla kernels if installed) stays close."""
    model = NemotronFlashForCausalLM(tiny_config()).eval()
    model.load_state_dict(tiny_model.state_dict())
    model = model.cuda()
    ids = prompt(70)
    with torch.no_grad():
        reference = tiny_model(ids).logits
        assert_close(model(ids.cuda()).logits.cpu(), reference, 1e-4)
        generated = model.generate(ids[:, :9].cuda(), do_sample=False, max_new_tokens=8, pad_token_id=0)
        assert torch.equal(
            generated.cpu(), tiny_model.generate(ids[:, :9], do_sample=False, max_new_tokens=8, pad_token_id=0)
        )
        model = model.to(torch.bfloat16)
        assert_close(model(ids.cuda()).logits.cpu(), reference, 0.05)
        assert model.generate(ids[:, :9].cuda(), do_sample=False, max_new_tokens=8, pad_token_id=0).shape == (2, 17)
