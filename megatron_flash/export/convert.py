"""Megatron checkpoints <-> folders in NVIDIA's released Hugging Face layout (the logic of tools/convert_*.py).

* :func:`export_to_hf`: a checkpoint saved by the trainer under any TP/PP layout -> a folder that
  ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads. The model is built at TP=1/PP=1
  in this one process from the ``args`` recorded in the checkpoint, dist_checkpointing reshards on load, and the
  full tensors go through the table of :mod:`megatron_flash.export.hf_mapping`.
* :func:`import_from_hf`: such a folder (an export, or NVIDIA's release) -> a model-only checkpoint at iteration 0
  that the trainer can ``--load`` under any TP/PP layout, and that :func:`export_to_hf` reads back bit-exactly.

Both run in a single process: they start a one-rank gloo (or NCCL) group unless one is already running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_flash import patterns, presets, runtime
from megatron_flash.export.hf_mapping import (CONFIG_FIELDS, INFORMATIVE_CONFIG_FIELDS, ConversionError, Dims,
                                              hf_to_megatron, megatron_to_hf)
from megatron_flash.training.arguments import model_preset

HF_CODE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf")
MODELING_FILES = ("configuration_nemotron_flash.py", "modeling_nemotron_flash.py")
# Files of a Hugging Face tokenizer folder that an export carries along (those present are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Megatron's rotary base: NemotronFlashModel's default, not configurable through the builder.
ROTARY_BASE = 10000.0
# Released config fields an export takes from the source config.json when the checkpoint was imported from one.
CARRIED_HF_FIELDS = ("max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor")


# --------------------------------------------------------------------------------------------------------------
# A one-process Megatron runtime
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def megatron_process():
    """Megatron's groups at TP=1/PP=1 in this process: started (and stopped) here unless already initialized."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        if dist.get_world_size() != 1 or (parallel_state.model_parallel_is_initialized() and (
                parallel_state.get_tensor_model_parallel_world_size() != 1
                or parallel_state.get_pipeline_model_parallel_world_size() != 1)):
            raise ConversionError("the converters run in one process (TP=1, PP=1); this one is part of a "
                                  f"{dist.get_world_size()}-rank job")
        if not parallel_state.model_parallel_is_initialized():
            runtime.initialize(1, 1)
        yield
        return
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(runtime.free_port())}
    runtime.initialize(1, 1, environ=env)
    try:
        yield
    finally:
        runtime.shutdown()


def build_megatron_model(preset: str | dict, pattern: Optional[str], overrides: dict, vocab_size: int, tied: bool,
                         seq_length: int):
    """The model at TP=1/PP=1 in fp32, uninitialized (every weight is loaded or filled afterwards). '|' stage marks
    of the pattern are dropped: checkpoints name layers by global index, so one stage loads any pipeline split."""
    from megatron_flash.models import builder

    pattern = patterns.parse(pattern) if pattern is not None else None
    spec = builder.resolve(preset, pattern, **overrides, vocab_size=vocab_size, tie_embeddings=tied,
                           params_dtype=torch.float32, use_cpu_initialization=True, perform_initialization=False)
    return spec, builder.build_model(spec, seq_length)


# --------------------------------------------------------------------------------------------------------------
# Reading a Megatron checkpoint
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    root: str
    iteration: int
    path: str
    common: dict
    shapes: dict  # tensor name -> global shape (model tensors only)

    @property
    def args(self) -> dict:
        return self.common["args"]


def read_checkpoint(root: str, iteration: Optional[int] = None) -> CheckpointInfo:
    """The checkpoint's common state and tensor shapes, without loading weights; errors name the folder."""
    from megatron.core import dist_checkpointing

    from megatron_flash.training import checkpointing

    if not os.path.isdir(root):
        raise ConversionError(f"--load {root}: no such folder")
    if iteration is None:
        iteration = checkpointing.latest_iteration(root)
        if iteration is None:
            raise ConversionError(f"--load {root}: no {checkpointing.TRACKER} (not a checkpoint root; give the "
                                  f"folder that holds iter_NNNNNNN/ and the tracker file)")
    path = checkpointing.checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        found = sorted(d for d in os.listdir(root) if d.startswith("iter_") and not d.endswith(".tmp"))
        raise ConversionError(f"{path}: no such checkpoint (found: {', '.join(found) or 'none'})")
    try:
        common = dist_checkpointing.load_common_state_dict(path)["common"]
        metadata = dist_checkpointing.load_tensors_metadata(path)
    except Exception as exc:  # noqa: BLE001 - name the unreadable folder
        raise ConversionError(f"{path}: cannot read the checkpoint: {exc}") from exc
    if not isinstance(common.get("args"), dict):
        raise ConversionError(f"{path}: the common state has no 'args' (not written by megatron_flash's trainer "
                              "or tools/convert_from_hf.py)")
    if "preset" not in common["args"]:
        raise ConversionError(f"{path}: the recorded args have no 'preset'")
    shapes = {k: tuple(v.global_shape) for k, v in metadata.items() if not k.startswith("optimizer.")}
    return CheckpointInfo(root, iteration, path, common, shapes)


def model_overrides(args: dict) -> dict:
    """The fields of the trainer's args that define the model beyond preset and pattern
    (as megatron_flash.pretrain.build_model_and_optimizer passes them)."""
    out = {k: args[k] for k in ("num_meta_tokens", "sliding_window") if args.get(k) is not None}
    for k in ("ssd_backend", "delta_rule_backend", "short_conv_backend"):
        if args.get(k):
            out[k] = args[k]
    return out


def trained_vocab_size(info: CheckpointInfo) -> int:
    """The vocabulary the checkpoint was trained with: recorded by convert_from_hf, else derived as the trainer does
    (megatron_flash.pretrain.build_data: the tokenizer's vocab_size; NullTokenizer for --mock-data)."""
    from megatron_flash.data.tokenizer import build_tokenizer

    if info.common.get("vocab_size"):
        return int(info.common["vocab_size"])
    args = info.args
    try:
        if args.get("mock_data"):
            vocab = args.get("vocab_size") or presets.preset_fields(model_preset(args))["vocab_size"]
            return build_tokenizer("NullTokenizer", vocab_size=vocab).vocab_size
        return build_tokenizer(args.get("tokenizer_type"), args.get("tokenizer_model")).vocab_size
    except Exception as exc:  # noqa: BLE001 - explain where the vocabulary comes from
        raise ConversionError(
            f"{info.path}: the vocabulary size is that of the training tokenizer ({args.get('tokenizer_type')} "
            f"{args.get('tokenizer_model')!r}), which cannot be loaded here: {exc}. Pass --vocab-size.") from exc


def _check_vocab(info: CheckpointInfo, vocab_size: int) -> None:
    from megatron_flash.models.model import padded_vocab_size

    rows = info.shapes.get("embedding.word_embeddings.weight", (None,))[0]
    if rows is None:
        raise ConversionError(f"{info.path}: no embedding.word_embeddings.weight in the checkpoint")
    if rows != padded_vocab_size(vocab_size):
        raise ConversionError(f"{info.path}: the embedding has {rows} rows but vocabulary {vocab_size} pads to "
                              f"{padded_vocab_size(vocab_size)}: wrong tokenizer or --vocab-size")


def load_megatron_tensors(info: CheckpointInfo, vocab_size: int):
    """(config, full fp32 tensors under global names) of the checkpoint, loaded at TP=1/PP=1 in this process."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_flash.models import layout
    from megatron_flash.training import checkpointing

    args = info.args
    with megatron_process():
        try:
            spec, model = build_megatron_model(model_preset(args), args.get("pattern"), model_overrides(args),
                                               vocab_size, not args.get("untie_embeddings", False),
                                               args.get("seq_length") or 4096)
        except (ValueError, KeyError) as exc:
            raise ConversionError(f"{info.path}: cannot build the model from the checkpoint's args: {exc}") from exc
        expected = {k: tuple(v.global_shape) for k, v in model.sharded_state_dict().items()
                    if isinstance(v, ShardedTensor)}
        _check_shapes(info, expected)
        checkpointing.load_checkpoint(info.root, model, optimizer=None, scheduler=None, load_rng=False,
                                      iteration=info.iteration)
        tensors = layout.full_named_tensors(model)
    return spec.config, tensors


def _check_shapes(info: CheckpointInfo, expected: dict) -> None:
    missing = sorted(set(expected) - set(info.shapes))
    wrong = [f"{k}: checkpoint {list(info.shapes[k])}, model {list(s)}" for k, s in expected.items()
             if k in info.shapes and tuple(info.shapes[k]) != s]
    if missing or wrong:
        raise ConversionError(f"{info.path}: the checkpoint does not match the model its args describe "
                              f"(preset {info.args.get('preset_file') or info.args['preset']}, pattern "
                              f"{info.args.get('pattern')}): "
                              f"missing {missing[:6]}, shapes differ: {wrong[:6]}")


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def hf_config_from_megatron(config, dims: Dims, dtype: torch.dtype, extra: dict):
    """The released-layout config of a Megatron model; ``extra``: token ids and fields carried over."""
    from megatron_flash.hf import modeling_nemotron_flash as hf_modeling
    from megatron_flash.hf.configuration_nemotron_flash import NemotronFlashConfig

    problems = []
    if "D" in config.layer_pattern and config.deltanet_norm_eps != hf_modeling.DELTANET_OUTPUT_NORM_EPS:
        problems.append(f"deltanet_norm_eps {config.deltanet_norm_eps} (released: "
                        f"{hf_modeling.DELTANET_OUTPUT_NORM_EPS})")
    if "M" in config.layer_pattern and config.mamba_norm_eps != hf_modeling.MAMBA2_GATED_NORM_EPS:
        problems.append(f"mamba_norm_eps {config.mamba_norm_eps} (released: {hf_modeling.MAMBA2_GATED_NORM_EPS})")
    if problems:
        raise ConversionError("this Megatron model has no released-layout equivalent: " + "; ".join(problems))
    layer_types, global_attn_idx = patterns.to_layer_types(config.layer_pattern)
    fields = {hf: getattr(config, meg) for meg, hf in CONFIG_FIELDS + INFORMATIVE_CONFIG_FIELDS}
    if dims.ffn % dims.hidden == 0:
        fields.update(ffn_expand_ratio=dims.ffn // dims.hidden, intermediate_size=0)
    else:
        fields.update(intermediate_size=dims.ffn)
    fields.update(
        vocab_size=dims.vocab_size, layer_types=layer_types, global_attn_idx=global_attn_idx,
        sliding_window=config.sliding_window if "S" in config.layer_pattern else None,
        tie_word_embeddings=dims.tied, rope=True, rope_theta=ROTARY_BASE, dtype=str(dtype).replace("torch.", ""),
        mamba_conv_bias=True, mamba_proj_bias=False)
    fields.update(extra)
    return NemotronFlashConfig(**fields)


def megatron_fields_from_hf(config) -> dict:
    """The Megatron description of a released-layout config; refuses options Megatron does not compute."""
    problems = []
    checks = {"rope": True, "rope_theta": ROTARY_BASE, "mamba_conv_bias": True, "mamba_proj_bias": False,
              "hidden_act": "silu", "mlp_hidden_act": "silu", "kq_norm": "none", "rope_type": None,
              "attn_hidden_size": -1, "kq_head_dim": -1, "v_head_dim": -1}
    for field, value in checks.items():
        if getattr(config, field, value) != value:
            problems.append(f"{field}={getattr(config, field)!r} (Megatron computes {value!r})")
    if config.hidden_size % config.num_attention_heads:
        problems.append("hidden_size not divisible by num_attention_heads")
    if problems:
        raise ConversionError("config.json has options the Megatron model does not implement: " + "; ".join(problems))
    dims = Dims.from_hf(config)
    fields = {meg: getattr(config, hf) for meg, hf in CONFIG_FIELDS}
    fields.update(ffn_hidden_size=dims.ffn, layer_pattern=dims.layer_pattern, vocab_size=config.vocab_size,
                  tie_embeddings=dims.tied)
    if "S" in dims.layer_pattern:
        fields["sliding_window"] = config.sliding_window
    return fields


def match_preset(fields: dict) -> str:
    """The preset whose architecture, with the pattern, meta tokens and sliding window of ``fields``, is exactly
    ``fields`` (the trainer can only rebuild a model from a preset plus those flags)."""
    from megatron_flash.models import builder

    mismatches = {}
    for name in presets.PRESETS:
        config = builder.resolve(name, fields["layer_pattern"], num_meta_tokens=fields["num_meta_tokens"],
                                 **({"sliding_window": fields["sliding_window"]} if "sliding_window" in fields
                                    else {})).config
        differ = [f"{k}: preset {getattr(config, k)}, config.json {v}" for k, v in fields.items()
                  if hasattr(config, k) and k != "layer_pattern" and getattr(config, k) != v]
        if not differ:
            return name
        mismatches[name] = differ
    closest = min(mismatches, key=lambda n: len(mismatches[n]))
    raise ConversionError(f"no preset of megatron_flash/presets.py matches config.json (closest: {closest}, which "
                          f"differs in {'; '.join(mismatches[closest])}): add a preset with these sizes")


def trainer_args(preset: str, fields: dict, tokenizer_folder: Optional[str]) -> dict:
    """The trainer's argparse dict (defaults + the model flags) recorded in an imported checkpoint."""
    from megatron_flash.training import arguments

    args = vars(arguments.build_parser().parse_args([]))
    args.update(preset=preset, pattern=fields["layer_pattern"], num_meta_tokens=fields["num_meta_tokens"],
                sliding_window=fields.get("sliding_window"), untie_embeddings=not fields["tie_embeddings"],
                vocab_size=fields["vocab_size"], tokenizer_model=tokenizer_folder, config=None)
    return args


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def _tokenizer_folder(explicit: Optional[str], args: dict) -> Optional[str]:
    if explicit is not None:
        if not os.path.isdir(explicit):
            raise ConversionError(f"--tokenizer {explicit}: no such folder")
        return explicit
    recorded = args.get("tokenizer_model")
    if args.get("mock_data") or not recorded:
        return None
    if os.path.isdir(recorded):
        return recorded
    why = "is not a Hugging Face tokenizer folder" if os.path.isfile(recorded) else "does not exist here"
    warnings.warn(f"the checkpoint's tokenizer {recorded!r} {why}: the export ships no tokenizer (give --tokenizer)")
    return None


def _token_ids(folder: Optional[str], info: CheckpointInfo, vocab_size: int) -> dict:
    """bos/eos/pad ids: from the tokenizer folder, else the imported config.json, else the mock NullTokenizer."""
    from megatron_flash.data.tokenizer import NO_PAD_ID, build_tokenizer

    if folder is not None:
        tokenizer = _load_tokenizer(folder)
        if tokenizer.vocab_size > vocab_size:
            raise ConversionError(f"tokenizer {folder} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                                  f"is {vocab_size}")
    elif info.common.get("hf_config"):
        return {k: info.common["hf_config"].get(k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    elif info.args.get("mock_data"):
        tokenizer = build_tokenizer("NullTokenizer", vocab_size=vocab_size - 1)
    else:
        return {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    return {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod,
            "pad_token_id": None if tokenizer.pad == NO_PAD_ID else tokenizer.pad}


def _load_tokenizer(folder: str):
    """The tokenizer of ``folder``, loaded from a copy of its tokenizer files only: transformers' AutoTokenizer also
    reads a config.json beside them, and an exported folder's (Nemotron-Flash layer_types) only loads with
    trust_remote_code."""
    from megatron_flash.data.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="mf_tokenizer_") as tmp:
        if not _copy_tokenizer(folder, tmp):
            raise ConversionError(f"--tokenizer {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
        try:
            return build_tokenizer("HuggingFaceTokenizer", tmp)
        except Exception as exc:  # noqa: BLE001 - name the folder
            raise ConversionError(f"--tokenizer {folder}: not a loadable Hugging Face tokenizer: {exc}") from exc


def _copy_tokenizer(folder: str, out: str) -> list:
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), os.path.join(out, name))
            copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------------------------
# Writing / reading HF folders
# --------------------------------------------------------------------------------------------------------------


def check_against_hf_model(state: dict, config) -> None:
    """Names and shapes equal those of the shipped modeling code for ``config`` (built on the meta device)."""
    from megatron_flash.hf.modeling_nemotron_flash import NemotronFlashForCausalLM

    with torch.device("meta"):
        model = NemotronFlashForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        differ = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ConversionError("exported tensors do not match the released layout: "
                              + ", ".join(f"{k}: {got.get(k)} vs {expected.get(k)}" for k in differ[:8]))


def write_safetensors(state: dict, folder: str, max_shard_size="5GB") -> list:
    """``model.safetensors``, or shards with ``model.safetensors.index.json`` when larger than max_shard_size."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, os.path.join(folder, filename),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return sorted(split.filename_to_tensors)


def read_safetensors(folder: str) -> dict:
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"--hf {folder}: neither model.safetensors nor model.safetensors.index.json")
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: listed in the index but missing")
        state.update(load_file(path))
    return state


def read_hf_config(folder: str):
    from megatron_flash.hf.configuration_nemotron_flash import NemotronFlashConfig

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"--hf {folder}: no config.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("model_type") not in (None, NemotronFlashConfig.model_type):
        raise ConversionError(f"{path}: model_type {raw.get('model_type')!r} is not 'nemotron_flash'")
    try:
        return NemotronFlashConfig.from_dict(raw), raw
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"{path}: {exc}") from exc


def _prepare_output(output: str, force: bool) -> None:
    if os.path.isfile(output):
        raise ConversionError(f"--output {output} is a file")
    if os.path.isdir(output) and os.listdir(output) and not force:
        raise ConversionError(f"--output {output} exists and is not empty (use --force to overwrite)")


def _commit(tmp: str, output: str) -> None:
    """Give the temporary folder the usual permissions (mkdtemp makes it private) and put it in place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if os.path.isdir(output):
        shutil.rmtree(output)
    os.rename(tmp, output)


# --------------------------------------------------------------------------------------------------------------
# The two directions
# --------------------------------------------------------------------------------------------------------------


def export_to_hf(load: str, output: str, iteration: Optional[int] = None, tokenizer: Optional[str] = None,
                 dtype: str = "bf16", force: bool = False, max_shard_size="5GB", vocab_size: Optional[int] = None,
                 progress: bool = True) -> str:
    """Megatron checkpoint ``load`` (any TP/PP) -> released-layout folder ``output``; returns ``output``."""
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    output = os.path.abspath(output)
    _prepare_output(output, force)
    info = read_checkpoint(load, iteration)
    vocab_size = vocab_size or trained_vocab_size(info)
    _check_vocab(info, vocab_size)
    tokenizer_folder = _tokenizer_folder(tokenizer, info.args)
    extra = {k: info.common["hf_config"][k] for k in CARRIED_HF_FIELDS if k in info.common.get("hf_config", {})}
    extra.update(_token_ids(tokenizer_folder, info, vocab_size))

    config, tensors = load_megatron_tensors(info, vocab_size)
    dims = Dims.from_megatron(config, vocab_size, not info.args.get("untie_embeddings", False))
    hf_config = hf_config_from_megatron(config, dims, DTYPES[dtype], extra)
    state = megatron_to_hf(tensors, dims, lambda rules: _progress(rules, "converting", progress))
    state = {k: v.to(device="cpu", dtype=DTYPES[dtype]) for k, v in state.items()}
    check_against_hf_model(state, hf_config)

    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=os.path.dirname(output))
    try:
        hf_config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
                         pad_token_id=hf_config.pad_token_id).save_pretrained(tmp)
        write_safetensors(state, tmp, max_shard_size)
        for name in MODELING_FILES:
            shutil.copy(os.path.join(HF_CODE_DIR, name), os.path.join(tmp, name))
        if tokenizer_folder is not None:
            _copy_tokenizer(tokenizer_folder, tmp)
        _commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def import_from_hf(hf: str, save: str, force: bool = False, progress: bool = True) -> str:
    """Released-layout folder ``hf`` -> model-only Megatron checkpoint (iteration 0) under ``save``; returns the
    checkpoint folder. The trainer loads it under any TP/PP layout (``--load``)."""
    from megatron_flash.models import layout
    from megatron_flash.training import checkpointing

    if not os.path.isdir(hf):
        raise ConversionError(f"--hf {hf}: no such folder")
    if os.path.isfile(save):
        raise ConversionError(f"--save {save} is a file")
    if os.path.isdir(save) and os.listdir(save) and not force:
        raise ConversionError(f"--save {save} exists and is not empty (use --force to write iteration 0 there)")
    config, raw = read_hf_config(hf)
    fields = megatron_fields_from_hf(config)
    preset = match_preset(fields)
    dims = Dims.from_hf(config)
    hf_state = read_safetensors(hf)
    tensors = hf_to_megatron(hf_state, dims, lambda rules: _progress(rules, "converting", progress))
    has_tokenizer = any(os.path.isfile(os.path.join(hf, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
    args = trainer_args(preset, fields, os.path.abspath(hf) if has_tokenizer else None)

    with megatron_process():
        spec, model = build_megatron_model(preset, args["pattern"], model_overrides(args), dims.vocab_size,
                                           dims.tied, args["seq_length"])
        names = layout.global_names(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                source = tensors[names[name]]
                if source.shape != param.shape:
                    raise ConversionError(f"{names[name]}: converted shape {list(source.shape)}, model "
                                          f"{list(param.shape)}")
                param.copy_(source.to(param.dtype))
        used = set(names.values())
        if used != set(tensors):
            raise ConversionError(f"converted tensors the model does not have: {sorted(set(tensors) - used)}")
        common = {"args": args, "consumed_samples": 0, "vocab_size": dims.vocab_size,
                  "hf_config": {k: raw[k] for k in raw if k != "auto_map"}, "source": os.path.abspath(hf)}
        return checkpointing.save_checkpoint(save, 0, model, None, None, common)


# --------------------------------------------------------------------------------------------------------------
# Command lines (tools/convert_to_hf.py, tools/convert_from_hf.py)
# --------------------------------------------------------------------------------------------------------------


def _run(fn, **kwargs) -> int:
    import sys

    from megatron_flash.training.checkpointing import CheckpointError

    try:
        result = fn(**kwargs)
    except (ConversionError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result}")
    return 0


def to_hf_main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tools/convert_to_hf.py", description=(
        "Export a megatron_flash checkpoint (any TP/PP layout) to a Hugging Face folder in NVIDIA's released "
        "Nemotron-Flash layout, loadable with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)."))
    p.add_argument("--load", required=True, help="checkpoint root (holds iter_NNNNNNN/ and the tracker file)")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--iteration", type=int, help="iteration to export (default: the latest)")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer folder to ship (default: the checkpoint's "
                                       "--tokenizer-model when it is a folder)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights' dtype (default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--vocab-size", type=int, help="real vocabulary size when the training tokenizer is unavailable")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return _run(export_to_hf, load=a.load, output=a.output, iteration=a.iteration, tokenizer=a.tokenizer,
                dtype=a.dtype, force=a.force, max_shard_size=a.max_shard_size, vocab_size=a.vocab_size,
                progress=not a.no_progress)


def from_hf_main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tools/convert_from_hf.py", description=(
        "Convert a Hugging Face folder in the released Nemotron-Flash layout to a model-only megatron_flash "
        "checkpoint (iteration 0) that the trainer loads under any TP/PP layout with --load."))
    p.add_argument("--hf", required=True, help="folder with config.json and model.safetensors[.index.json]")
    p.add_argument("--save", required=True, help="checkpoint root to write")
    p.add_argument("--force", action="store_true", help="write into a non-empty --save (iteration 0 becomes latest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return _run(import_from_hf, hf=a.hf, save=a.save, force=a.force, progress=not a.no_progress)
