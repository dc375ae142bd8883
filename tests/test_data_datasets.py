"""build_pretraining_datasets: megatron-core GPTDatasets from tokenized prefixes, blends and per-split args."""

import json

import numpy
import pytest

from megatron_flash.data.datasets import DataConfigError, build_pretraining_datasets, parse_blend
from megatron_flash.data.tokenizer import build_tokenizer
from tests.test_data_fixtures import read_documents, tokenized_sample, tokenizer

# Every test here may start tokenizer worker processes: never let one hang the suite.
pytestmark = pytest.mark.timeout(120)

SEQ = 64


def _check_sample(dataset, index, all_tokens):
    """A sample is seq_length+1 consecutive tokens of the corpus: inputs and labels shifted by one."""
    sample = dataset[index]
    tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
    assert tokens.shape == labels.shape == (SEQ,)
    assert numpy.array_equal(tokens[1:], labels[:-1])
    window = numpy.concatenate([tokens, labels[-1:]])
    assert window.shape == (SEQ + 1,)
    # the window occurs in the concatenated documents (documents are shuffled, so search for it)
    starts = numpy.flatnonzero(all_tokens[: len(all_tokens) - SEQ] == window[0])
    assert any(numpy.array_equal(all_tokens[s:s + SEQ + 1], window) for s in starts[:10_000])


def _concat(prefixes):
    return numpy.array([t for p in prefixes for doc in read_documents(p) for t in doc])


def test_single_prefix_without_torch_distributed():
    prefix = tokenized_sample("sp")["train0"]
    train, valid, test = build_pretraining_datasets(
        [prefix], "80,20,0", SEQ, tokenizer("sp"), seed=1234, train_val_test_num_samples=[50, 5, 0])
    assert len(train) >= 50 and len(valid) >= 5 and test is None
    all_tokens = _concat([prefix])
    for i in (0, 7, 49):
        _check_sample(train, i, all_tokens)
    # same seed, same samples
    again, _, _ = build_pretraining_datasets(prefix, "80,20,0", SEQ, tokenizer("sp"), 1234, [50, 5, 0])
    assert numpy.array_equal(again[3]["tokens"].numpy(), train[3]["tokens"].numpy())


def test_weighted_blend_and_per_split_args(tmp_path):
    prefixes = tokenized_sample("sp")
    tok = tokenizer("sp")
    blend = ["0.3", prefixes["train0"], "0.7", prefixes["train1"]]
    train, valid, _ = build_pretraining_datasets(blend, "80,20,0", SEQ, tok, 5, [40, 4, 0])
    assert len(train) >= 40
    all_tokens = _concat([prefixes["train0"], prefixes["train1"]])
    _check_sample(train, 0, all_tokens)
    _check_sample(train, 39, all_tokens)

    per_split = tmp_path / "blend.json"
    per_split.write_text(json.dumps({"train": blend, "valid": [prefixes["valid"]], "test": None}))
    train, valid, test = build_pretraining_datasets(None, None, SEQ, tok, 5, [30, 3, None],
                                                    per_split_data_args=str(per_split))
    assert len(train) >= 30 and len(valid) >= 3 and test is None
    _check_sample(valid, 0, _concat([prefixes["valid"]]))


def test_mock_data_with_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=500)
    train, valid, test = build_pretraining_datasets(None, None, SEQ, tok, 1, [16, 4, 4], mock=True)
    assert len(train) >= 16 and train[0]["tokens"].shape == (SEQ,)
    assert int(train[0]["tokens"].max()) <= 500


def test_errors_name_the_problem_before_building(tmp_path):
    prefixes = tokenized_sample("sp")
    tok = tokenizer("sp")
    missing = str(tmp_path / "nowhere_text_document")
    with pytest.raises(FileNotFoundError, match="nowhere_text_document.*missing.*nowhere_text_document.bin"):
        build_pretraining_datasets(["0.5", prefixes["train0"], "0.5", missing], "80,20,0", SEQ, tok, 1, [8, 1, 1])
    with pytest.raises(DataConfigError, match="mixes weights and prefixes"):
        build_pretraining_datasets(["0.5", prefixes["train0"], prefixes["train1"], prefixes["valid"]], "80,20,0",
                                   SEQ, tok, 1, [8, 1, 1])
    with pytest.raises(DataConfigError, match="must be positive"):
        parse_blend(["0", prefixes["train0"], "1", prefixes["train1"]], "data_path")
    with pytest.raises(DataConfigError, match="needs a number of train samples"):
        build_pretraining_datasets(["1", prefixes["train0"], "1", prefixes["train1"]], "80,20,0", SEQ, tok, 1,
                                   [None, 1, 1])
    with pytest.raises(DataConfigError, match="exactly one"):
        build_pretraining_datasets([prefixes["train0"]], "80,20,0", SEQ, tok, 1, [8, 1, 1], mock=True)
    with pytest.raises(DataConfigError, match="initialized"):
        build_pretraining_datasets(["1", prefixes["train0"], "1", prefixes["train1"]], "80,20,0", SEQ, tok, 1,
                                   [8, 1, 1], path_to_cache=str(tmp_path / "cache"))
    with pytest.raises(DataConfigError, match="valid split of .*train0_text_document.* no tokens"):
        build_pretraining_datasets([prefixes["train0"]], "999,1,0", SEQ, tok, 1, [8, 2, 0])  # 0.1% of a few docs
    with pytest.raises(FileNotFoundError, match="per-split data 'valid'"):
        build_pretraining_datasets(None, None, SEQ, tok, 1, [8, 1, 0],
                                   per_split_data_args={"train": [prefixes["train0"]], "valid": [missing]})


def test_inside_an_initialized_job_with_cache(tmp_path):
    """With a torch.distributed group up (one gloo rank here, in-process: spawning ranks costs ~20 s of imports),
    megatron's distributed path runs: rank-0 builds, barriers, and the blend's index cache is written and reused."""
    import torch.distributed as dist

    from megatron_flash.data.datasets import is_dataset_built_on_rank

    prefixes = tokenized_sample("sp")
    blend = ["0.4", prefixes["train0"], "0.6", prefixes["train1"]]
    cache = tmp_path / "cache"
    if dist.is_initialized():
        pytest.skip("another test left a process group initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert is_dataset_built_on_rank()  # no megatron model-parallel groups: every rank builds
        first, _, _ = build_pretraining_datasets(blend, "80,20,0", SEQ, tokenizer("sp"), 7, [24, 4, 0],
                                                 path_to_cache=str(cache))
        written = sorted(p.name for p in cache.iterdir())
        assert any(n.endswith("BlendedDataset-train-dataset_index.npy") for n in written)
        assert any(n.endswith("GPTDataset-train-shuffle_index.npy") for n in written)
        second, _, _ = build_pretraining_datasets(blend, "80,20,0", SEQ, tokenizer("sp"), 7, [24, 4, 0],
                                                  path_to_cache=str(cache))  # cache hit
        assert sorted(p.name for p in cache.iterdir()) == written
        for i in (0, 5, 23):
            assert numpy.array_equal(first[i]["tokens"].numpy(), second[i]["tokens"].numpy())
        _check_sample(second, 23, _concat([prefixes["train0"], prefixes["train1"]]))
        everywhere, _, _ = build_pretraining_datasets(blend, "80,20,0", SEQ, tokenizer("sp"), 7, [24, 4, 0],
                                                      path_to_cache=str(cache), build_on_every_rank=True)
        assert numpy.array_equal(everywhere[5]["tokens"].numpy(), first[5]["tokens"].numpy())
    finally:
        dist.destroy_process_group()
