"""Train/valid/test GPT datasets from a Megatron blend, built by megatron-core's dataset builder.

:func:`build_pretraining_datasets` is what the trainer calls. Everything is megatron-core's: the blend list is parsed
with ``megatron.core.datasets.utils.get_blend_from_list``, datasets are ``GPTDataset`` (``MockGPTDataset`` for mock
data) inside ``BlendedDataset`` built by ``BlendedMegatronDatasetBuilder``. What this module adds is checking before
anything is built, with errors that name the offending prefix or argument:

* every prefix has its ``.bin`` and ``.idx``;
* weights are positive numbers, and a list that mixes weights and prefixes is rejected (megatron's parser silently
  treats ``["0.3", "a", "b"]`` as three prefixes, the first called ``0.3``);
* arguments that megatron would only assert on deep inside the build (split with per-split blends, sizes, ...);
* no requested split of a prefix is empty: megatron-core 0.16.1's ``GPTDataset._get_num_epochs`` loops forever
  when asked for samples from a split range with no tokens (e.g. ``split="98,2,0"`` on a prefix of 20 documents
  gives the valid split round(0.4) = 0 documents).

Distributed use. megatron builds on the ranks where ``is_built_on_rank()`` is true and synchronises with barriers,
so every rank must call this function. Here that is: every rank without torch.distributed or without megatron's
model-parallel groups; with them, tensor-parallel rank 0 of the first and last pipeline stages (the ranks that feed
tokens and labels), as in Megatron-LM's ``pretrain_gpt.py``; the other ranks get ``None`` datasets, unless
``build_on_every_rank=True`` (a trainer that reads samples on every rank instead of broadcasting them).

Cache. megatron caches each dataset's sample indices (``.npy``) in ``path_to_cache``; when it is None, GPTDataset
writes them to ``<prefix>/cache/GPTDataset_indices/`` next to the data (a folder named after the prefix), which
must then be writable. megatron-core 0.16.1's BlendedDataset calls ``torch.distributed.get_rank()`` whenever
``path_to_cache`` is set and its cache misses, so a blend of several prefixes with a cache path needs an
initialized process group; this is checked up front.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path
from megatron.core.datasets.utils import get_blend_from_list

Blend = Tuple[List[str], Optional[List[float]]]
SPLIT_NAMES = ("train", "valid", "test")


class DataConfigError(ValueError):
    """Bad data arguments, found before any dataset is built."""


def is_dataset_built_on_rank() -> bool:
    """Whether this rank builds datasets (see the module docstring)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return True
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True
    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        or parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    ) and parallel_state.get_tensor_model_parallel_rank() == 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_blend(blend_list: Union[str, Sequence[str], None], where: str) -> Optional[Blend]:
    """megatron's ``get_blend_from_list`` plus the checks it leaves out; ``where`` names the argument in errors."""
    if blend_list is None:
        return None
    if isinstance(blend_list, str):
        blend_list = blend_list.split()
    blend_list = [str(item) for item in blend_list]
    if not blend_list:
        raise DataConfigError(f"{where} is empty")
    prefixes, weights = get_blend_from_list(blend_list)
    if weights is None and len(blend_list) % 2 == 0:
        numeric = [blend_list[i] for i in range(0, len(blend_list), 2) if _is_number(blend_list[i])]
        if numeric:
            raise DataConfigError(
                f"{where} mixes weights and prefixes: {blend_list}. Give either only prefixes or "
                f"'weight prefix' pairs for every prefix"
            )
    if weights is not None:
        for weight, prefix in zip(weights, prefixes):
            if not weight > 0:
                raise DataConfigError(f"{where}: weight {weight} of {prefix!r} must be positive (drop the source "
                                      f"instead of giving it weight 0)")
    return list(prefixes), (list(weights) if weights is not None else None)


def check_prefixes_exist(blend: Blend, where: str) -> None:
    """Raise FileNotFoundError naming the first prefix whose .bin or .idx is missing."""
    for prefix in blend[0]:
        missing = [path for path in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(
                f"{where}: dataset prefix {prefix!r} is missing {' and '.join(missing)} "
                f"(tokenize it with tools/preprocess_data.py, or fix the path)"
            )


def check_splits_not_empty(blend: Blend, split: Optional[str], sizes: Sequence[Optional[int]], where: str,
                           only_split: Optional[int] = None) -> None:
    """Raise DataConfigError if a requested split of a prefix would hold no tokens (megatron would hang).

    Ranges are computed exactly as megatron does: document range [round(lo * n), round(hi * n)) of each prefix.
    """
    if split is None:
        matrix = [(0.0, 1.0) if i == only_split else None for i in range(3)]
    else:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in blend[0]:
        # Copy: the lengths are a view into the index's mmap, which IndexedDataset.__del__ closes.
        dataset = IndexedDataset(prefix, mmap=False)
        lengths = numpy.array(dataset.sequence_lengths)
        del dataset
        count = lengths.shape[0]
        for i, bounds in enumerate(matrix):
            if bounds is None or sizes[i] is None:
                continue
            begin, end = int(round(bounds[0] * float(count))), int(round(bounds[1] * float(count)))
            if int(lengths[begin:end].sum()) == 0:
                raise DataConfigError(
                    f"{where}: the {SPLIT_NAMES[i]} split of {prefix!r} gets documents [{begin}, {end}) of {count}"
                    + (f" with split {split!r}" if split else "")
                    + ", which hold no tokens, yet samples are requested from it (megatron-core would loop "
                    "forever). Give that split a larger share, request no samples from it, or use per-split data"
                )


def load_per_split_data_args(per_split_data_args: Union[str, Dict[str, Sequence[str]]]) -> Dict[str, list]:
    """Megatron-LM's ``--per-split-data-args-path`` JSON: ``{"train": [...], "valid": [...], "test": [...]}``."""
    if isinstance(per_split_data_args, (str, os.PathLike)):
        path = os.fspath(per_split_data_args)
        try:
            with open(path, encoding="utf-8") as fh:
                per_split_data_args = json.load(fh)
        except FileNotFoundError:
            raise DataConfigError(f"per-split data args file {path!r} does not exist") from None
        except json.JSONDecodeError as err:
            raise DataConfigError(f"per-split data args file {path!r} is not valid JSON: {err}") from None
    if not isinstance(per_split_data_args, dict):
        raise DataConfigError("per-split data args must map 'train'/'valid'/'test' to blend lists")
    unknown = set(per_split_data_args) - set(SPLIT_NAMES)
    if unknown:
        raise DataConfigError(f"per-split data args has unknown split(s) {sorted(unknown)}; use {SPLIT_NAMES}")
    return dict(per_split_data_args)


def build_pretraining_datasets(
    data_path: Union[str, Sequence[str], None],
    split: Optional[str],
    seq_length: int,
    tokenizer,
    seed: int,
    train_val_test_num_samples: Sequence[Optional[int]],
    mock: bool = False,
    path_to_cache: Optional[str] = None,
    per_split_data_args: Union[str, Dict[str, Sequence[str]], None] = None,
    build_on_every_rank: bool = False,
    **gpt_config_kwargs,
):
    """(train, valid, test) datasets; a split that is not requested (or not built on this rank) is None.

    Args:
        data_path: Megatron blend list (``["0.3", "prefixA", "0.7", "prefixB"]``, or prefixes only, or one prefix);
            a string is split on whitespace, like the file of Megatron-LM's ``--data-args-path``.
        split: Megatron split string for ``data_path``, e.g. ``"99,1,0"``; not used with per-split data args.
        seq_length: tokens per sample; each sample carries ``seq_length + 1`` tokens (inputs and shifted labels).
        tokenizer: a :class:`megatron_flash.data.tokenizer.Tokenizer` (or any megatron tokenizer).
        seed: shuffling seed.
        train_val_test_num_samples: samples wanted per split (None: one epoch of that split).
        mock: random tokens from megatron's MockGPTDataset instead of files (data_path must be None).
        path_to_cache: folder for the sample-index cache (see module docstring).
        per_split_data_args: Megatron's per-split blends, a JSON path or dict ``{"train": [...], ...}``.
        build_on_every_rank: build on every rank (a trainer that reads samples on all ranks instead of
            broadcasting them from TP rank 0).
        gpt_config_kwargs: other GPTDatasetConfig fields, e.g. ``create_attention_mask=False``,
            ``eod_mask_loss=True``, ``num_dataset_builder_threads=4``.
    """
    sizes = list(train_val_test_num_samples)
    if len(sizes) != 3:
        raise DataConfigError(f"train_val_test_num_samples needs 3 entries (train, valid, test), got {sizes}")
    if any(size is not None and int(size) < 0 for size in sizes):
        raise DataConfigError(f"train_val_test_num_samples must not be negative, got {sizes}")
    if seq_length < 1:
        raise DataConfigError(f"seq_length must be positive, got {seq_length}")
    sources = sum(x is not None for x in (data_path, per_split_data_args)) + bool(mock)
    if sources != 1:
        raise DataConfigError("give exactly one of data_path, per_split_data_args or mock=True")

    blend = blend_per_split = None
    if data_path is not None:
        blend = parse_blend(data_path, "data_path")
        check_prefixes_exist(blend, "data_path")
        if not split:
            raise DataConfigError("data_path needs a split string such as '99,1,0'")
        check_splits_not_empty(blend, split, sizes, "data_path")
    elif per_split_data_args is not None:
        per_split = load_per_split_data_args(per_split_data_args)
        blend_per_split = [parse_blend(per_split.get(name), f"per-split data '{name}'") for name in SPLIT_NAMES]
        for name, split_blend in zip(SPLIT_NAMES, blend_per_split):
            if split_blend is not None:
                check_prefixes_exist(split_blend, f"per-split data '{name}'")
                check_splits_not_empty(split_blend, None, sizes, f"per-split data '{name}'",
                                       only_split=SPLIT_NAMES.index(name))
        split = None  # megatron asserts split is None with per-split blends

    per_split_blends = [blend] * 3 if blend is not None else list(blend_per_split or [None] * 3)
    for name, split_blend, size in zip(SPLIT_NAMES, per_split_blends, sizes):
        if split_blend is not None and split_blend[1] is not None and size is None:
            raise DataConfigError(f"a weighted blend needs a number of {name} samples, got None "
                                  f"(megatron samples weighted sources in proportion to a requested size)")
    blends = [b for b in per_split_blends if b is not None]
    needs_dist = path_to_cache is not None and any(len(b[0]) > 1 or b[1] is not None for b in blends)
    if needs_dist and not torch.distributed.is_initialized():
        raise DataConfigError(
            "megatron-core 0.16.1 builds the cache of a blend of several prefixes only inside an initialized "
            "torch.distributed job (BlendedDataset calls get_rank()); pass path_to_cache=None in a single "
            "process, or initialize torch.distributed first"
        )

    gpt_config_kwargs.setdefault("reset_position_ids", False)
    gpt_config_kwargs.setdefault("reset_attention_mask", False)
    gpt_config_kwargs.setdefault("eod_mask_loss", False)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        **gpt_config_kwargs,
    )
    dataset_cls = MockGPTDataset if mock else GPTDataset
    on_rank = (lambda: True) if build_on_every_rank else is_dataset_built_on_rank
    train, valid, test = BlendedMegatronDatasetBuilder(dataset_cls, sizes, on_rank, config).build()
    return train, valid, test
