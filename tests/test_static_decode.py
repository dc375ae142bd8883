"""The static cache of the Hugging Face modeling code and the graph-decode driver, on the CPU (fp32): generations
through the static cache equal those through the dynamic cache (``generate``) token for token with matching logits,
for a model with every layer type (DeltaNet, Mamba2, full and sliding-window attention, FFN) and prompts longer than
the window; a decode step never reads a value on the host and runs the same operations on the same shapes at every
step (what a CUDA graph replay needs)."""

import shutil

import pytest
import torch

from megatron_flash.hf import configuration_nemotron_flash, modeling_nemotron_flash
from megatron_flash.hf.modeling_nemotron_flash import NemotronFlashForCausalLM, NemotronFlashStaticCache
from megatron_flash.inference import graph_decode
from megatron_flash.testing import OpTrace
from tests.test_hf_modeling import assert_close, prompt, randomize_, ref_deltanet, ref_mamba2, tiny_config

WINDOW = 5
# D F M F A(global) F S(window 5) F
LAYER_TYPES = ["deltanet", "f", "m2", "f", "a", "f", "a", "f"]


def every_layer_config(**overrides):
    fields = dict(layer_types=LAYER_TYPES, sliding_window=WINDOW, global_attn_idx=[4])
    fields.update(overrides)
    return tiny_config(**fields)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = NemotronFlashForCausalLM(every_layer_config()).eval()
    randomize_(model, seed=21)
    return model


def dynamic_generate(model, ids, new_tokens):
    """transformers' generate() through the dynamic NemotronFlashCache: tokens [B, new] and logits [B, new, V]."""
    out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    assert isinstance(out.past_key_values, modeling_nemotron_flash.NemotronFlashCache)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("mixer,layer_idx,reference", [
    (modeling_nemotron_flash.NemotronFlashDeltaNet, 0, ref_deltanet),
    (modeling_nemotron_flash.NemotronFlashMamba2, 2, ref_mamba2),
])
def test_one_token_steps_match_the_sequential_reference(mixer, layer_idx, reference):
    """The static cache's one-token path (conv step, delta-rule / SSM step), token by token over 70 tokens, equals
    the plain sequential recurrence of the test references over the whole sequence."""
    config = tiny_config()
    module = mixer(config, layer_idx=layer_idx)
    randomize_(module, seed=41)
    x = torch.randn(2, 70, config.hidden_size, generator=torch.Generator().manual_seed(42))
    cache = NemotronFlashStaticCache(config, batch_size=2, max_length=70)
    with torch.no_grad():
        steps = torch.cat([module(x[:, t:t + 1], cache=cache) for t in range(70)], dim=1)
        assert_close(steps, reference(module, x.double()), 2e-5)


def test_layer_kinds_are_all_there(model):
    windows = [layer.self_attn.sliding_window for layer in model.model.layers if hasattr(layer, "self_attn")]
    assert windows == [None, WINDOW]
    cache = model.make_static_cache(2, 30)
    assert cache.ring_sizes[6] == WINDOW and cache.key_cache[6].shape[2] == WINDOW
    assert cache.ring_sizes[4] is None and cache.key_cache[4].shape[2] == 64  # 6 memory + 30 text, rounded up
    assert cache.conv_states[0].shape == (2, 3, 64, 3) and cache.recurrent_states[2].dtype == torch.float32


@pytest.mark.parametrize("prompt_length", [12, 3])
def test_static_generation_equals_dynamic_generate(model, prompt_length):
    """Prompt longer than the window (12) and shorter (3); 14 new tokens wrap the 5-slot ring several times."""
    ids = prompt(prompt_length)
    with torch.no_grad():
        expected_tokens, expected_logits = dynamic_generate(model, ids, 14)
    result = graph_decode.greedy_generate(model, ids, 14, keep_logits=True)
    assert not result.steps.cuda_graph and result.steps.num_steps == 13
    assert torch.equal(result.tokens, expected_tokens)
    assert_close(result.logits, expected_logits, 1e-5)


def test_generate_accepts_a_static_cache(model):
    """transformers' generate() decoding through a static cache passed in (eagerly) gives its usual tokens."""
    ids = prompt(12, seed=31)
    with torch.no_grad():
        expected, _ = dynamic_generate(model, ids, 8)
        cache = model.make_static_cache(2, 30)
        out = model.generate(ids, past_key_values=cache, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                             pad_token_id=0)
    assert torch.equal(out[:, 12:], expected)
    assert cache.get_seq_length() == 12 + 8 - 1


def test_chunked_prompt_into_the_static_cache(model):
    """A prompt given in three pieces (attention over cached + new keys, ring writes of several tokens)."""
    ids = prompt(17, seed=23)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.make_static_cache(2, 20)
        pieces = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 7), (7, 15), (15, 16))]
        pieces.append(model(ids[:, 16:], past_key_values=cache).logits)  # one token: the decode-step path
    assert_close(torch.cat(pieces, dim=1), full, 2e-5)
    assert cache.get_seq_length() == 17 and cache.stream_length == 17 + 6


def test_one_prompt_broadcast_to_a_batch(model):
    """copy_from: one prefilled row decoded as a batch of 3 gives each row the single-sequence tokens."""
    ids = prompt(9, batch=1, seed=24)
    single = graph_decode.greedy_generate(model, ids, 6)
    one_row = model.make_static_cache(1, 20)
    first = graph_decode.prefill(model, ids, one_row).argmax(-1, keepdim=True)
    batch = model.make_static_cache(3, 20)
    batch.copy_from(one_row)
    result = graph_decode.decode(model, batch, first.expand(3, 1), 6)
    assert torch.equal(result.tokens, single.tokens.expand(3, -1))


def test_cache_reuse_after_reset(model):
    ids = prompt(8, seed=25)
    cache = model.make_static_cache(2, 16)
    first = graph_decode.greedy_generate(model, ids, 5, cache=cache)
    graph_decode.greedy_generate(model, prompt(8, seed=26), 5, cache=cache)
    again = graph_decode.greedy_generate(model, ids, 5, cache=cache)
    assert torch.equal(first.tokens, again.tokens)


def test_decode_step_is_graph_replayable(model):
    """What a replay of one captured step needs: no host reads, and every step runs the same ops on the same
    shapes with the same non-tensor arguments (no Python value that changes with the position)."""
    ids = prompt(11, seed=27)
    cache = model.make_static_cache(2, 30)
    logits = graph_decode.prefill(model, ids, cache)
    tokens = logits.argmax(-1, keepdim=True)
    traces = []
    with torch.no_grad():
        for _ in range(3):
            with OpTrace() as trace:
                tokens = model(input_ids=tokens, past_key_values=cache, use_cache=True).logits[:, -1].argmax(
                    -1, keepdim=True)
            traces.append(trace)
    for trace in traces:
        assert trace.host_reads() == []
    assert len(traces[0].ops) > 50
    assert traces[1].ops == traces[0].ops and traces[2].ops == traces[0].ops


def test_errors_name_the_problem(model):
    cache = model.make_static_cache(2, 10)
    with pytest.raises(ValueError, match="capacity 16"):
        model(prompt(11), past_key_values=cache)
    with pytest.raises(ValueError, match="batch of 3"):
        model(prompt(4, batch=3), past_key_values=cache)
    with pytest.raises(ValueError, match="prefill"):
        graph_decode.decode(model, cache, torch.zeros(2, 1, dtype=torch.long), 4)
    graph_decode.prefill(model, prompt(8), cache)
    with pytest.raises(ValueError, match="needs 11"):
        graph_decode.decode(model, cache, torch.zeros(2, 1, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="static cache"):
        graph_decode.prefill(model, prompt(4), modeling_nemotron_flash.NemotronFlashCache(model.config))
    with pytest.raises(ValueError, match="positive"):
        NemotronFlashStaticCache(model.config, 0, 4)


def test_remote_code_model_decodes_through_the_driver(model, tmp_path):
    """The classes transformers loads from an exported folder (a copy of the modeling file) work with the driver."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    for module in (configuration_nemotron_flash, modeling_nemotron_flash):
        shutil.copy(module.__file__, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(loaded).__module__ != NemotronFlashForCausalLM.__module__
    ids = prompt(7, seed=28)
    expected = graph_decode.greedy_generate(model, ids, 5)
    result = graph_decode.greedy_generate(loaded, ids, 5)
    assert torch.equal(result.tokens, expected.tokens)


def test_bfloat16_static_decode_tracks_dynamic(model):
    """bf16 weights: the static cache keeps fp32 states and bf16 keys/values; fed the same tokens, its logits stay
    near the dynamic cache's (the two round differently, so only closeness is asserted)."""
    bf16 = NemotronFlashForCausalLM(every_layer_config()).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    ids, fed = prompt(9, seed=29), prompt(6, seed=30)
    static = bf16.make_static_cache(2, 15)
    assert static.key_cache[4].dtype == torch.bfloat16 and static.recurrent_states[0].dtype == torch.float32
    with torch.no_grad():
        dynamic = bf16(ids, use_cache=True).past_key_values
        assert torch.equal(bf16(ids, past_key_values=static).logits, bf16(ids).logits)  # the prompt: one path
        for t in range(fed.shape[1]):
            expected = bf16(fed[:, t:t + 1], past_key_values=dynamic).logits
            actual = bf16(fed[:, t:t + 1], past_key_values=static).logits
            assert_close(actual, expected, 0.03)


def test_benchmark_qwen3_baseline_decodes_like_generate(tmp_path):
    """benchmarks/gpu_decode.py's Qwen3 baseline (one step over transformers' StaticCache, what it captures on a GPU)
    at toy size: its tokens equal transformers' generate(), and generate() with a static cache runs."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_decode.py")
    spec = importlib.util.spec_from_file_location("gpu_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--smoke", "--out", str(tmp_path)])
    result = bench.qwen3_section("qwen3_0.6b", args, bench.Recorder(str(tmp_path)))
    assert "error" not in result["graph"], result["graph"]
    assert result["graph"]["check"] == {"graph_equals_eager": True, "leading_tokens_equal_to_generate": 6}
    assert result["generate"]["new_tokens"] == args.qwen_generate_tokens
    assert result["graph"]["ms_per_token"] > 0 and result["generate"]["ms_per_token"] > 0


def test_benchmark_profile_section_tables_the_compiled_step(tmp_path, monkeypatch):
    """benchmarks/gpu_decode.py's profile_1b at toy size on the CPU: the exported model's compiled one-token step,
    profiled after its warm-up without compiling again (a recompile fails the section); a table of what it runs,
    most time first, with no compilation in it."""
    import json

    from tests.tool_loading import load_script

    for name, value in (("NEMOTRON_FLASH_DISABLE_FLA", "1"), ("HF_MODULES_CACHE", str(tmp_path / "modules"))):
        monkeypatch.setenv(name, value)  # what main() would set for the whole process
    bench = load_script("benchmarks", "gpu_decode")
    out = tmp_path / "out"
    assert bench.main(["--smoke", "--export-route", "direct", "--sections", "export_1b,profile_1b",
                       "--out", str(out)]) == 0
    result = json.loads((out / "gpu_decode.json").read_text())["profile_1b"]
    assert result["ok"], result.get("traceback")
    assert result["profiled_steps"] == 3
    assert result["kernels_per_step"] > 0 and result["kernel_ms_per_step"] > 0
    times = [row["ms_per_iter"] for row in result["kernels"]]
    assert times == sorted(times, reverse=True) and 0 < sum(times) <= result["kernel_ms_per_step"] + 1e-9
    assert not any("dynamo_timed" in row["name"] for row in result["kernels"]), result["kernels"]  # compile-time work


def packable_modules(model):
    return [m for m in model.modules() if isinstance(m, modeling_nemotron_flash.PackableInputProjections)]


def test_packed_projections_keep_values_state_dict_and_memory(model, tmp_path):
    """pack_projections: each module's input projections become row blocks of one tensor (views, no copy kept),
    computed by one matmul, with the same logits and the same state dict; save/reload gives the same weights."""
    # Fresh copies: the driver (graph_decode.decode) packs the model it decodes, as the tests above did.
    packed, unpacked = (NemotronFlashForCausalLM(every_layer_config()).eval() for _ in range(2))
    packed.load_state_dict(model.state_dict())
    unpacked.load_state_dict(model.state_dict())
    packed.pack_projections()
    modules = packable_modules(packed)
    assert {type(m).__name__ for m in modules} == {"NemotronFlashDeltaNet", "NemotronFlashAttention",
                                                   "NemotronFlashMLP"}
    for module in modules:
        storages = {getattr(module, name).weight.untyped_storage().data_ptr() for name in module.input_projections}
        assert storages == {module._packed_input_weight.data_ptr()}
        assert module._packed_input_weight.numel() == sum(
            getattr(module, name).weight.numel() for name in module.input_projections)
    ids = prompt(7, seed=32)
    with torch.no_grad(), OpTrace() as trace:
        logits = packed(ids).logits
    with torch.no_grad(), OpTrace() as unpacked_trace:
        expected = unpacked(ids).logits
    assert_close(logits, expected, 1e-6)
    matmuls = ("mm.default", "addmm.default", "bmm.default")
    removed = sum(len(m.input_projections) - 1 for m in modules)
    assert (sum(op[0] in matmuls for op in unpacked_trace.ops) - sum(op[0] in matmuls for op in trace.ops)
            == removed)
    state = packed.state_dict()
    assert list(state) == list(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    packed.save_pretrained(tmp_path)
    reloaded = NemotronFlashForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_packed_projections_follow_moves_and_train():
    """After .to() the weights are no longer the packed blocks: the unpacked path runs on the moved weights (no
    stale copy is used or kept). With autograd recording, gradients reach every projection weight."""
    torch.manual_seed(3)
    model = NemotronFlashForCausalLM(every_layer_config()).eval()
    randomize_(model, seed=33)
    reference = NemotronFlashForCausalLM(every_layer_config()).eval()
    reference.load_state_dict(model.state_dict())
    model.pack_projections()
    model.to(torch.float64)
    ids = prompt(6, seed=34)
    with torch.no_grad():
        assert_close(model(ids).logits, reference.to(torch.float64)(ids).logits, 1e-12)
    assert all(m._packed_input_weight is None for m in packable_modules(model))
    model.pack_projections()  # packs again, in float64
    assert all(m._packed_input_weight.dtype == torch.float64 for m in packable_modules(model))
    model.train()
    model(ids, labels=ids).loss.backward()
    for module in packable_modules(model):
        for name in module.input_projections:
            grad = getattr(module, name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name


def test_driver_decodes_models_exported_before_packing(model):
    """Modeling code exported before pack_projections existed (no such method): the driver decodes it unpacked,
    to the same tokens."""
    class EarlierExport(NemotronFlashForCausalLM):
        pack_projections = None

    earlier = EarlierExport(every_layer_config()).eval()
    earlier.load_state_dict(model.state_dict())
    ids = prompt(7, seed=35)
    result = graph_decode.greedy_generate(earlier, ids, 5)
    assert all(m.__dict__.get("_packed_input_weight") is None for m in packable_modules(earlier))
    assert torch.equal(result.tokens, graph_decode.greedy_generate(model, ids, 5).tokens)
