"""Checkpoint conversion: the real trainer at TP=1, TP=2 and PP=2 -> tools/convert_to_hf.py -> transformers, the
released 1B layout, HF -> Megatron -> HF bit-exactness, and the trainer starting from an imported checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_flash.export import convert
from megatron_flash.export.hf_mapping import ConversionError
from megatron_flash.testing import relative_error, run_distributed

OFFICIAL_LAYOUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "official_layout"
BASE = ["--mock-data", "--seq-length", "24", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "100", "--eval-interval", "1000",
        "--eval-iters", "0", "--save-interval", "1000", "--seed", "5"]
# Every layout trains 2 steps from the tiny preset (NullTokenizer vocabularies are --vocab-size + 1 with EOD).
LAYOUTS = {
    # 1024 tokens: no vocabulary padding; exported with a Hugging Face tokenizer and in several shards
    "tp1": (1, 1, ["--vocab-size", "1023"]),
    # 513 tokens padded to 640 (split over the TP ranks); sliding-window and full attention layers
    "tp2": (2, 1, ["--tensor-model-parallel-size", "2", "--pattern", "DFMFSFAF", "--sliding-window", "6"]),
    # 501 tokens padded to 512; separate output layer on the last stage; an explicit, uneven pipeline split
    "pp2": (1, 2, ["--pipeline-model-parallel-size", "2", "--vocab-size", "500", "--untie-embeddings",
                   "--pattern", "DFMF|AF"]),
    # a shape no preset has, from a search candidate's candidate.json (PRESET_FILE, written by the fixture)
    "preset_file": (1, 1, ["--preset-file", "{workdir}/candidate.json"]),
}
# The tiny preset's proportions at another width: hidden 48, 3 heads of 16, one KV group, FFN 144
PRESET_FILE = {"id": "c0007", "preset_fields": dict(
    hidden_size=48, ffn_hidden_size=144, num_attention_heads=3, num_query_groups=1, layer_pattern="DFAFMF",
    vocab_size=512, num_meta_tokens=4, tie_embeddings=True, mamba_state_dim=16, mamba_head_dim=16,
    mamba_chunk_size=16), "trainer_args": [], "info": {}}
TOKENS = torch.randint(0, 500, (2, 21), generator=torch.Generator().manual_seed(11))


# --------------------------------------------------------------------------------------------------------------
# Distributed bodies (module level: spawned processes import them)
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _layout_logits(model, tokens):
    """Logits [b, s, vocab] of a model split over TP/PP ranks (pipeline stages hand over hidden states by hand);
    None on ranks that are not on the last stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model.eval()
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(model.num_meta_tokens + tokens.shape[1], tokens.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens)
    model.set_input_tensor(None)
    model.train()
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :model.vocab_size]


def _train(argv, tokens):
    """Train with the real trainer; after the last step, this layout's logits on ``tokens`` and the full weights."""
    from megatron.core import parallel_state as ps

    from megatron_flash import pretrain
    from megatron_flash.models import layout
    from megatron_flash.training import arguments

    args = arguments.parse_args(argv, world_size=torch.distributed.get_world_size())
    seen = {}

    def after_step(iteration, model, optimizer):
        if iteration == args.train_iters:
            seen["logits"] = _layout_logits(model, tokens)
            seen["weights"] = layout.full_named_tensors(model)
            seen["tp_rank"] = ps.get_tensor_model_parallel_rank()

    result = pretrain.train(args, step_callback=after_step)
    return {"iteration": result["iteration"], "losses": result["losses"], **seen}


def _convert_all(jobs):
    """Every conversion in one process (megatron_flash.export.convert reuses this one-rank group)."""
    done = {}
    for kind, kwargs in jobs:
        fn = {"export": convert.export_to_hf, "import": convert.import_from_hf}[kind]
        done[kwargs.get("output") or kwargs.get("save")] = fn(progress=False, **kwargs)
    return done


def _released_1b_layouts():
    return {tied: _released_1b_layout(tied) for tied in (True, False)}


def _released_1b_layout(tied):
    """Names/shapes and config of the 1B preset as exported: the Megatron model is built without initialization
    and the mapping runs on meta tensors of its shapes."""
    from megatron_flash.export.hf_mapping import Dims, megatron_to_hf
    from megatron_flash.models import builder, layout

    spec = builder.resolve("nemotron_flash_1b", tie_embeddings=tied, use_cpu_initialization=False,
                           perform_initialization=False, params_dtype=torch.bfloat16)
    model = builder.build_model(spec, 4096)
    names = layout.global_names(model)
    meta = {names[n]: torch.empty(p.shape, device="meta") for n, p in model.named_parameters()}
    dims = Dims.from_megatron(spec.config, spec.vocab_size, tied)
    state = megatron_to_hf(meta, dims)
    config = convert.hf_config_from_megatron(spec.config, dims, torch.bfloat16,
                                             {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    convert.check_against_hf_model(state, config)
    return {k: list(v.shape) for k, v in state.items()}, config.to_dict()


# --------------------------------------------------------------------------------------------------------------
# Fixtures: train every layout once, convert everything in one process
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def trained(workdir):
    (workdir / "candidate.json").write_text(json.dumps(PRESET_FILE))
    out = {}
    for name, (tp, pp, extra) in LAYOUTS.items():
        root = str(workdir / f"ckpt_{name}")
        argv = BASE + ["--train-iters", "2", "--save", root] + [a.format(workdir=workdir) for a in extra]
        results = run_distributed(_train, world_size=tp * pp, tensor_model_parallel_size=tp,
                                  pipeline_model_parallel_size=pp, args=(argv, TOKENS))
        logits = next(r["logits"] for r in results if r.get("logits") is not None)
        out[name] = {"root": root, "logits": logits}
    return out


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tests.test_data_fixtures import hf_tokenizer_dir

    return hf_tokenizer_dir()


@pytest.fixture(scope="module")
def converted(trained, workdir, hf_tokenizer):
    """HF folders of every layout (fp32), and HF -> Megatron -> HF round trips of two of them."""
    folders = {name: str(workdir / f"hf_{name}") for name in LAYOUTS}
    jobs = [("export", dict(load=trained[name]["root"], output=folders[name], dtype="fp32")) for name in LAYOUTS]
    jobs[0][1].update(tokenizer=hf_tokenizer, max_shard_size="300KB")  # tp1: tokenizer, sharded safetensors
    for name in ("tp1", "tp2"):
        folders[f"rt_ckpt_{name}"] = str(workdir / f"rt_ckpt_{name}")
        folders[f"rt_{name}"] = str(workdir / f"rt_{name}")
        jobs.append(("import", dict(hf=folders[name], save=folders[f"rt_ckpt_{name}"])))
        jobs.append(("export", dict(load=folders[f"rt_ckpt_{name}"], output=folders[f"rt_{name}"], dtype="fp32")))
    run_distributed(_convert_all, world_size=1, args=(jobs,))
    return folders


@pytest.fixture(scope="module")
def load_hf():
    """from_pretrained(trust_remote_code=True); transformers' copy of the remote code goes to the session's
    HF_MODULES_CACHE (tests/conftest.py)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def load(folder):
        if folder not in cache:
            cache[folder] = AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=True, dtype=torch.float32).eval()
        return cache[folder]

    return load


def _safetensors(folder):
    return convert.read_safetensors(folder)


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_exported_model_gives_the_megatron_logits(trained, converted, load_hf, name):
    model = load_hf(converted[name])
    assert type(model).__name__ == "NemotronFlashForCausalLM"
    assert type(model).__module__.startswith("transformers_modules")  # the copied remote code
    with torch.no_grad():
        logits = model(TOKENS).logits
    reference = trained[name]["logits"]
    assert logits.shape == reference.shape
    assert relative_error(logits, reference) < 1e-4


def test_a_preset_file_model_exports_its_own_shape(converted):
    """The checkpoint records the file's fields with the trainer's args: the export needs no preset or file."""
    config = json.loads((Path(converted["preset_file"]) / "config.json").read_text())
    fields = PRESET_FILE["preset_fields"]
    assert (config["hidden_size"], config["ffn_expand_ratio"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (48, 3, 3, 1)  # the released layout states FFN width as a ratio
    assert config["num_hidden_layers"] == len(fields["layer_pattern"])


def test_exported_folder_has_the_released_files(trained, converted, load_hf):
    tp1, tp2, pp2 = (Path(converted[n]) for n in ("tp1", "tp2", "pp2"))
    for folder in (tp1, tp2, pp2):
        for name in ("config.json", "generation_config.json") + convert.MODELING_FILES:
            assert (folder / name).is_file(), (folder, name)
        assert not any(p.name.endswith(".tmp") or ".tmp-" in p.name for p in folder.parent.iterdir())
    for name in convert.MODELING_FILES:
        assert (tp1 / name).read_bytes() == (Path(convert.HF_CODE_DIR) / name).read_bytes()
    config = json.loads((tp2 / "config.json").read_text())
    assert config["layer_types"] == ["deltanet", "f", "m2", "f", "a", "f", "a", "f"]
    assert config["sliding_window"] == 6 and config["global_attn_idx"] == [6]
    assert config["vocab_size"] == 513 and config["tie_word_embeddings"] is True
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nemotron_flash.NemotronFlashForCausalLM"
    assert config["torch_dtype"] == "float32" and config["num_memory_tokens"] == 8
    # vocabulary padding stripped (640 rows in the checkpoint), no tied lm_head written
    state = _safetensors(tp2)
    assert state["model.embed_tokens.weight"].shape == (513, 64) and "lm_head.weight" not in state
    pp2_state = _safetensors(pp2)
    assert pp2_state["lm_head.weight"].shape == (501, 64)
    assert json.loads((pp2 / "config.json").read_text())["tie_word_embeddings"] is False
    # tp1: sharded, with the tokenizer and its special-token ids
    index = json.loads((tp1 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tp1 / "model.safetensors").exists()
    assert (tp1 / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    load_hf(str(tp1))  # (the fixture keeps transformers' copy of the remote code in a tmp folder)
    tokenizer = AutoTokenizer.from_pretrained(tp1, trust_remote_code=True)
    assert tokenizer.eos_token_id is not None
    assert json.loads((tp1 / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    assert json.loads((tp1 / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    assert len(tokenizer) <= json.loads((tp1 / "config.json").read_text())["vocab_size"]


def test_cached_decoding_and_generation_on_exported_weights(converted, load_hf):
    model = load_hf(converted["tp2"])  # sliding-window layer: window 6 < 8 meta tokens + prompt
    ids = TOKENS[:, :12]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
        assert relative_error(torch.cat(pieces, dim=1), full) < 1e-5
        generated = model.generate(ids[:, :7], do_sample=False, max_new_tokens=6, pad_token_id=0)
        expected = ids[:, :7]
        for _ in range(6):
            expected = torch.cat([expected, model(expected, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_hf_to_megatron_to_hf_is_bit_exact(converted, name):
    first, second = Path(converted[name]), Path(converted[f"rt_{name}"])
    a, b = _safetensors(first), _safetensors(second)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert torch.equal(a[key], b[key]), key
    config_a, config_b = (json.loads((f / "config.json").read_text()) for f in (first, second))
    assert config_a == config_b
    # the same files besides the weights' (tp1 was written in shards, its round trip in one file)
    files_a, files_b = ({p.name for p in f.iterdir() if not p.name.startswith("model")} for f in (first, second))
    assert files_a == files_b
    for file in first.iterdir():
        if file.name.startswith("tokenizer"):
            assert file.read_bytes() == (second / file.name).read_bytes()


def test_trainer_starts_from_an_imported_checkpoint_under_another_layout(converted):
    """The model-only checkpoint of tp2's export, loaded by the trainer at TP=2 in bf16 with the distributed
    optimizer: after a step at lr 0 (no weight norm) its weights are the HF weights rounded to bf16, so the
    optimizer's fp32 main params were refreshed from the loaded weights."""
    from megatron_flash.export.hf_mapping import Dims, megatron_to_hf
    from megatron_flash.hf.configuration_nemotron_flash import NemotronFlashConfig

    argv = BASE + ["--train-iters", "1", "--lr-warmup-iters", "0", "--load", converted["rt_ckpt_tp2"], "--lr", "0",
                   "--no-weight-norm", "--bf16", "--use-distributed-optimizer"] + LAYOUTS["tp2"][2]
    results = run_distributed(_train, world_size=2, tensor_model_parallel_size=2, args=(argv, TOKENS))
    assert results[0]["iteration"] == 1 and len(results[0]["losses"]) == 1  # started at iteration 0
    weights = next(r["weights"] for r in results if r["tp_rank"] == 0)
    config, _ = convert.read_hf_config(converted["tp2"])
    exported = megatron_to_hf(weights, Dims.from_hf(config))
    for key, tensor in _safetensors(converted["tp2"]).items():
        assert torch.equal(exported[key], tensor.to(torch.bfloat16).float()), key
    assert isinstance(config, NemotronFlashConfig)


@pytest.fixture(scope="module")
def exported_1b():
    return run_distributed(_released_1b_layouts, world_size=1)[0]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_1b_preset_exports_the_released_layout(tied, request):
    path = OFFICIAL_LAYOUT / f"1b_{'tied' if tied else 'untied'}.json"
    if not path.exists():
        pytest.skip(f"{path} not found (shared/ data is beside the developer checkout)")
    official = json.loads(path.read_text())
    shapes, config = request.getfixturevalue("exported_1b")[tied]
    expected = dict(official["params"])
    for alias in official["tied_aliases"]:
        expected.pop(alias)
    assert shapes == expected
    for field, value in official["config"].items():
        assert config[field] == value, field


# --- errors (no Megatron process needed) -------------------------------------------------------------------------


def test_export_refuses_a_non_empty_output_without_force(trained, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert convert.to_hf_main(["--load", trained["tp1"]["root"], "--output", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_export_errors_name_the_checkpoint_folder(trained, tmp_path):
    with pytest.raises(ConversionError, match="no such folder"):
        convert.export_to_hf(str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(ConversionError, match="latest_checkpointed_iteration.txt"):
        convert.export_to_hf(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ConversionError, match="iter_0000007.*found: iter_0000002"):
        convert.export_to_hf(trained["tp1"]["root"], str(tmp_path / "out"), iteration=7)
    with pytest.raises(ConversionError, match="embedding has 1024 rows but vocabulary 3000 pads to 3072"):
        convert.export_to_hf(trained["tp1"]["root"], str(tmp_path / "out"), vocab_size=3000)
    assert not (tmp_path / "out").exists()


def test_import_refuses_configs_megatron_does_not_compute(converted, tmp_path):
    config = json.loads((Path(converted["tp2"]) / "config.json").read_text())
    for change, message in (({"rope_theta": 5e5}, "rope_theta"), ({"hidden_size": 96}, "no preset"),
                            ({"mamba_conv_bias": False}, "mamba_conv_bias")):
        folder = tmp_path / next(iter(change))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConversionError, match=message):
            convert.import_from_hf(str(folder), str(tmp_path / "ckpt"))
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert.import_from_hf(converted["tp2"], converted["rt_ckpt_tp2"])
    assert convert.from_hf_main(["--hf", str(tmp_path / "none"), "--save", str(tmp_path / "c")]) == 1


@pytest.mark.parametrize("tool", ["convert_to_hf.py", "convert_from_hf.py"])
def test_command_lines_run_from_a_checkout(tool):
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "tools" / tool), "--help"], capture_output=True, text=True,
                         cwd="/", timeout=120)
    assert out.returncode == 0 and "--force" in out.stdout, out.stderr
