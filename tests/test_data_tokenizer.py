"""Tokenizers: trained at test time with tools/train_tokenizer.py, loaded through megatron-core's classes."""

import json
import os
import shutil

import pytest

from megatron_flash.data.tokenizer import NO_PAD_ID, TokenizerError, build_tokenizer
from megatron_flash.data.train_tokenizer import main as train_main
from tests.test_data_fixtures import VOCAB_SIZE, hf_tokenizer_dir, jsonl_texts, sample_corpus, sp_model, tokenizer

# Every test here may start tokenizer worker processes: never let one hang the suite.
pytestmark = pytest.mark.timeout(120)

SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "\tTabs,  double  spaces\n\n\nand blank lines ",
    "Unicode: héllo wörld — ✓ 漢字 🙂",
    "1234567890 3.14159",
]


def test_hf_tokenizer_from_tool_loads_with_autotokenizer_and_megatron():
    from transformers import AutoTokenizer

    folder = hf_tokenizer_dir()
    assert sorted(os.listdir(folder)) == ["tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(folder, "tokenizer_config.json")) as fh:
        assert json.load(fh)["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x too
    auto = AutoTokenizer.from_pretrained(folder)
    tok = tokenizer("hf")
    assert tok.vocab_size == len(auto) == VOCAB_SIZE
    assert (tok.eod, tok.bos, tok.pad) == (auto.eos_token_id, auto.bos_token_id, auto.pad_token_id) == (2, 1, 3)
    assert tok.unique_identifiers["tokenizer_type"] == "HuggingFaceTokenizer"
    texts = SAMPLES + jsonl_texts(os.path.join(sample_corpus(), "valid.jsonl"))[:5]
    for text in texts:
        ids = tok.tokenize(text)
        assert ids == auto(text, add_special_tokens=False).input_ids
        assert ids == tok._tokenizer.text_to_ids(text)  # megatron's own per-text path
        assert tok.detokenize(ids) == text  # byte-level BPE is lossless
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]


def test_sentencepiece_from_tool_keeps_whitespace_and_matches_sentencepiece():
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model())
    tok = tokenizer("sp")
    assert tok.vocab_size == sp.get_piece_size() == VOCAB_SIZE
    assert (tok.eod, tok.bos, tok.pad) == (sp.eos_id(), sp.bos_id(), sp.pad_id()) == (2, 1, 3)
    texts = SAMPLES + jsonl_texts(os.path.join(sample_corpus(), "valid.jsonl"))[:5]
    for text in texts:
        ids = tok.tokenize(text)
        assert ids == sp.encode(text) == tok._tokenizer.text_to_ids(text)
        assert tok.detokenize(ids) == text  # identity normalization + byte fallback: indentation survives
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    assert tok.tokenize_batch([]) == []


def test_null_tokenizer_for_mock_data():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos) == (101, 100, NO_PAD_ID, None)
    assert tok.tokenize("5 6 7") == [5, 6, 7]
    assert tok.detokenize([5, 6, 7]) == "5 6 7"


def test_tokenizer_json_path_and_errors_name_the_path(tmp_path):
    folder = hf_tokenizer_dir()
    by_file = build_tokenizer("HuggingFaceTokenizer", os.path.join(folder, "tokenizer.json"))
    assert by_file.tokenize(SAMPLES[0]) == tokenizer("hf").tokenize(SAMPLES[0])

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(folder, "tokenizer.json"), bare)
    with pytest.raises(TokenizerError, match="defines no end-of-document token"):
        build_tokenizer("HuggingFaceTokenizer", str(bare))
    assert build_tokenizer("HuggingFaceTokenizer", str(bare), eos_token="</s>").eod == 2

    with pytest.raises(TokenizerError, match="does not exist"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "nope"))
    with pytest.raises(TokenizerError, match="neither tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    with pytest.raises(TokenizerError, match="nope.model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "nope.model"))
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        build_tokenizer("GPT2BPETokenizer", folder)
    with pytest.raises(TokenizerError, match="vocab_size"):
        build_tokenizer("NullTokenizer")


def test_train_tokenizer_rejects_bad_arguments_before_training(tmp_path, capsys):
    corpus = sample_corpus()
    with pytest.raises(SystemExit) as exc:
        train_main(["--input", corpus, "--tokenizer-type", "HuggingFaceTokenizer", "--vocab-size", "100",
                    "--output", str(tmp_path / "x")])
    assert exc.value.code == 2 and "256 byte symbols" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--input", str(tmp_path / "missing"), "--tokenizer-type", "SentencePieceTokenizer",
                    "--vocab-size", "500", "--output", str(tmp_path / "x")])
    assert "missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"other": "x"}\n')
    assert train_main(["--input", str(empty), "--tokenizer-type", "SentencePieceTokenizer", "--vocab-size", "500",
                       "--output", str(tmp_path / "x")]) == 1
    assert "no usable documents" in capsys.readouterr().err
