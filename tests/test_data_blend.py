"""data_prep: mixture files, build_blend (blend args, token counts, epochs), sample corpus, tokenize scripts."""

import glob
import json
import os
import shutil
import subprocess

import pytest

from data_prep import build_blend
from data_prep.build_sample_corpus import build_corpus
from megatron_flash.data.datasets import build_pretraining_datasets
from megatron_flash.data.indexed_output import count_tokens
from tests.test_data_fixtures import REPO, read_documents, sample_corpus, sp_model, tokenized_sample, tokenizer

# Every test here may start tokenizer worker processes: never let one hang the suite.
pytestmark = pytest.mark.timeout(180)

MIXTURES = sorted(glob.glob(os.path.join(REPO, "data_prep", "mixtures", "*.yaml")))


def test_shipped_mixtures_are_valid():
    names = {os.path.basename(p) for p in MIXTURES}
    assert {"phase1_zyda2.yaml", "phase2_mix.yaml", "phase3_long_context.yaml"} <= names
    for path in MIXTURES:
        mixture = build_blend.load_mixture(path)
        for source in mixture.sources["train"]:
            assert source.tokens_source, f"{path}: {source.name} must say where its token count comes from"
        planned = build_blend.plan_blend(mixture, "/data", estimate=True)  # planning without data
        assert all(p.prefix.startswith("/data/") for p in planned)
    assert build_blend.load_mixture(os.path.join(REPO, "data_prep/mixtures/phase1_zyda2.yaml")).sources[
        "train"][0].approx_tokens == 5e12


def _mixture(tmp_path, text):
    path = tmp_path / "mix.yaml"
    path.write_text(text)
    return str(path)


def _sample_root(tmp_path):
    """A data root laid out like the sample_corpus mixture expects."""
    prefixes = tokenized_sample("sp")
    root = tmp_path / "root"
    (root / "sample").mkdir(parents=True)
    for name, target in (("train0", "train_text_document"), ("valid", "valid_text_document")):
        for ext in (".bin", ".idx"):
            os.symlink(prefixes[name] + ext, root / "sample" / f"{target}{ext}")
    return root


def test_blend_from_mixture_builds_megatron_datasets(tmp_path, capsys):
    root = _sample_root(tmp_path)
    mix = _mixture(tmp_path, """
name: two_sources
token_budget: 1M
sources:
  - {name: code, prefix: sample/train_text_document, weight: 3, approx_tokens: 10B, tokens_source: test}
  - {name: held, prefix: "{data_root}/sample/valid_text_document", weight: 1}
  - {name: disabled, prefix: does/not/exist, weight: 0}
valid:
  - {name: held, prefix: sample/valid_text_document, weight: 1}
""")
    mixture = build_blend.load_mixture(mix)
    planned = build_blend.plan_blend(mixture, str(root))
    assert [p.source.name for p in planned] == ["code", "held", "held"]  # weight 0 left out
    train_tokens = count_tokens(str(root / "sample/train_text_document"))[1]
    assert planned[0].tokens == train_tokens and not planned[0].tokens_are_estimate
    assert planned[0].share == pytest.approx(0.75)
    assert planned[0].epochs(1e6) == pytest.approx(0.75e6 / train_tokens)

    blend = build_blend.data_path_list(planned)
    assert blend == ["3", str(root / "sample/train_text_document"), "1", str(root / "sample/valid_text_document")]
    train, _, _ = build_pretraining_datasets(blend, "80,20,0", 32, tokenizer("sp"), 3, [20, 2, 0])
    assert len(train) >= 20 and train[0]["tokens"].shape == (32,)

    # CLI: --data-path on stdout, the table on stderr; per-split JSON file usable by the trainer
    capsys.readouterr()
    assert build_blend.main([mix, "--data-root", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "--data-path " + " ".join(blend)
    assert "code" in err and "epochs" in err
    out_json = tmp_path / "blend.json"
    assert build_blend.main([mix, "--data-root", str(root), "--format", "per-split-json", "--output",
                             str(out_json)]) == 0
    per_split = json.loads(out_json.read_text())
    assert per_split == {"train": blend, "valid": ["1", str(root / "sample/valid_text_document")], "test": None}
    train, valid, test = build_pretraining_datasets(None, None, 32, tokenizer("sp"), 3, [10, 2, None],
                                                    per_split_data_args=str(out_json))
    assert len(valid) >= 2 and test is None


def test_missing_prefixes_are_all_listed(tmp_path, capsys):
    mix = _mixture(tmp_path, """
sources:
  - {name: a, prefix: x/a_text_document, weight: 1}
  - {name: b, prefix: x/b_text_document, weight: 1}
""")
    assert build_blend.main([mix, "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "missing for 2 source(s)" in err and "a_text_document.bin" in err and "b_text_document.idx" in err
    bad = _mixture(tmp_path, "sources:\n  - {name: a, prefix: p, weight: -1}\n")
    with pytest.raises(build_blend.MixtureError, match="weight must be a number >= 0"):
        build_blend.load_mixture(bad)
    assert build_blend.parse_token_count("4.5T") == 4.5e12 and build_blend.parse_token_count("300B") == 3e11


def test_sample_corpus_is_deterministic_and_holds_out_whole_files(tmp_path):
    a = build_corpus(str(tmp_path / "a"), size_mb=0.3, valid_fraction=0.2)
    b = build_corpus(str(tmp_path / "b"), size_mb=0.3, valid_fraction=0.2)
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # the budget is never exceeded (it stops before the first document that would not fit)
    assert 0.1e6 < a["train"]["bytes"] + a["valid"]["bytes"] <= 0.3e6 and a["valid"]["documents"] > 0
    sources = {}
    for split in ("train", "valid"):
        with open(tmp_path / "a" / f"{split}.jsonl") as fh:
            for line in fh:
                doc = json.loads(line)
                assert doc["text"].strip() and doc["kind"] in ("code", "docstrings", "docs")
                sources.setdefault(doc["id"].split(":", 1)[1], set()).add(split)
    assert all(len(splits) == 1 for splits in sources.values())  # code and docstrings of a file stay together
    assert b == a


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
    scripts = [os.path.join(REPO, "data_prep", name) for name in ("tokenize_shards.sbatch", "tokenize_local.sh")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.timeout(180)
def test_tokenize_local_script_end_to_end(tmp_path):
    """Two shards tokenized in parallel by the real tools, then merged (about 10 s: three Python start-ups)."""
    shards = tmp_path / "shards"
    (shards / "part-b").mkdir(parents=True)
    shutil.copy(os.path.join(sample_corpus(), "valid.jsonl"), shards / "part-b" / "x.jsonl")
    shutil.copy(os.path.join(sample_corpus(), "valid.jsonl"), shards / "a.jsonl")
    (shards / "notes.json").write_text("{}")  # not a shard: folders take .jsonl/.jsonl.gz/.jsonl.zst/.parquet
    out = tmp_path / "tok" / "corpus"
    cmd = ["bash", os.path.join(REPO, "data_prep", "tokenize_local.sh"), "-i", str(shards), "-o", str(out),
           "-t", "SentencePieceTokenizer", "-m", sp_model(), "-j", "2", "-w", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = sorted(glob.glob(f"{out}_shards/shard_*_text_document.idx"))
    assert [os.path.basename(p) for p in outputs] == ["shard_00000_text_document.idx",
                                                      "shard_00001_text_document.idx"]
    valid = read_documents(tokenized_sample("sp")["valid"])
    assert read_documents(f"{out}_text_document") == valid + valid  # a.jsonl then part-b/x.jsonl, EOD appended
    count = subprocess.run(["bash", os.path.join(REPO, "data_prep", "tokenize_shards.sbatch"), "count",
                            str(shards)], capture_output=True, text=True)
    assert count.stdout.strip() == "2"
