"""Train a tokenizer on a JSONL/Parquet corpus (engine and CLI of ``tools/train_tokenizer.py``).

Two outputs, both loadable by :func:`megatron_flash.data.tokenizer.build_tokenizer`:

* ``--tokenizer-type SentencePieceTokenizer``: ``{output}.model`` / ``.vocab`` trained with the sentencepiece library.
  Settings suit code and prose pretraining: identity normalization and no whitespace collapsing (indentation and
  newlines survive a round trip), byte fallback (no ``<unk>`` for unseen characters), digits split.
* ``--tokenizer-type HuggingFaceTokenizer``: a folder with ``tokenizer.json`` + ``tokenizer_config.json`` trained with
  the ``tokenizers`` library as a byte-level BPE (the scheme of GPT-2 / Llama-3 / Mistral-NeMo's tekken tokenizer),
  loadable offline with ``transformers.AutoTokenizer.from_pretrained(folder)`` and copyable into a Hugging Face
  checkpoint. ``tokenizer_class`` is ``PreTrainedTokenizerFast`` so that transformers 4.x and 5.x both load it.

Special tokens default to ``<unk> <s> </s> <pad>`` at ids 0-3 (the Mistral/Llama layout: ``</s>`` is the EOD token).
No BOS/EOS is added by the tokenizer itself: the preprocessing tool appends EOD explicitly with ``--append-eod``.

Bad records are skipped (same rules as preprocessing) and counted; the corpus is read in sorted file order, so
training is deterministic for a given input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from typing import Iterator, Optional, Sequence

from megatron_flash.data import inputs, records
from megatron_flash.data.records import BLANK

logger = logging.getLogger("train_tokenizer")

DEFAULT_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# GPT-4 / Llama-3 style pre-tokenization: letters, 1-3 digit groups, punctuation runs, newlines, other whitespace.
BYTE_LEVEL_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SENTENCEPIECE_MAX_PIECE_BYTES = 4096  # sentencepiece drops longer "sentences"; documents are cut at line ends


class CorpusStats:
    def __init__(self):
        self.documents = 0
        self.bytes = 0
        self.skipped = {}

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def iter_texts(specs: Sequence[str], keys: Sequence[str], stats: CorpusStats, max_documents: Optional[int] = None,
               max_bytes: Optional[int] = None) -> Iterator[str]:
    """Valid texts of the corpus in input order, stopping at the document or byte budget."""
    for path in inputs.find_input_files(specs):
        for _, raw in inputs.iter_records(path, keys):
            parsed = records.parse_record(raw, keys)
            if isinstance(parsed, tuple):
                if parsed[0] != BLANK:
                    stats.skip(parsed[0])
                continue
            for text in parsed:
                if max_documents is not None and stats.documents >= max_documents:
                    return
                if max_bytes is not None and stats.bytes >= max_bytes:
                    return
                stats.documents += 1
                stats.bytes += len(text.encode("utf-8"))
                yield text


def _line_chunks(text: str, limit: int) -> Iterator[str]:
    """Pieces of ``text`` of at most ``limit`` bytes cut at line ends (a longer single line is cut anywhere)."""
    chunk, size = [], 0
    for line in text.splitlines(keepends=True):
        encoded = len(line.encode("utf-8"))
        if size + encoded > limit and chunk:
            yield "".join(chunk)
            chunk, size = [], 0
        while encoded > limit:
            head = line.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
            yield head
            line = line[len(head):]
            encoded = len(line.encode("utf-8"))
        chunk.append(line)
        size += encoded
    if chunk:
        yield "".join(chunk)


def train_sentencepiece(texts: Iterator[str], output_prefix: str, vocab_size: int, model_type: str = "bpe",
                        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, character_coverage: float = 0.9999,
                        threads: int = 1, max_sentences: int = 10_000_000) -> str:
    import sentencepiece as spm

    unk, bos, eos, pad, *extra = list(special_tokens) + [None] * max(0, 4 - len(special_tokens))
    if not (unk and bos and eos):
        raise ValueError("SentencePiece needs at least three special tokens: unk, bos, eos (e.g. <unk> <s> </s>)")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    sentences = (piece for text in texts for piece in _line_chunks(text, SENTENCEPIECE_MAX_PIECE_BYTES))
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=character_coverage,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3 if pad else -1,
        unk_piece=unk, bos_piece=bos, eos_piece=eos, pad_piece=pad or "<pad>",
        user_defined_symbols=[t for t in extra if t],
        max_sentence_length=SENTENCEPIECE_MAX_PIECE_BYTES * 2,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=threads,
        minloglevel=2,
    )
    return output_prefix + ".model"


def train_byte_level_bpe(texts: Iterator[str], output_dir: str, vocab_size: int,
                         special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, min_frequency: int = 2) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if len(special_tokens) < 3:
        raise ValueError("HuggingFace tokenizers need at least unk, bos, eos special tokens (e.g. <unk> <s> </s>)")
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BYTE_LEVEL_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    unk, bos, eos, *rest = special_tokens
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=unk, bos_token=bos, eos_token=eos,
                                   pad_token=rest[0] if rest else None,
                                   additional_special_tokens=list(rest[1:]) or None)
    os.makedirs(output_dir, exist_ok=True)
    fast.save_pretrained(output_dir)
    _portable_tokenizer_config(output_dir)
    return output_dir


def _portable_tokenizer_config(output_dir: str) -> None:
    """A tokenizer_config.json that transformers 4.x and 5.x both load.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` (a 5.x-only class) and ``extra_special_tokens`` as a
    list, which 4.x reads as a dict and fails on; both versions read ``PreTrainedTokenizerFast`` and the older
    ``additional_special_tokens`` list.
    """
    path = os.path.join(output_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, dict):
        config["extra_special_tokens"] = extra
    elif extra:
        config["additional_special_tokens"] = list(extra)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, ensure_ascii=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_tokenizer.py", description="Train a SentencePiece model or a "
                                     "HuggingFace byte-level BPE tokenizer on .jsonl/.parquet documents.")
    parser.add_argument("--input", required=True, nargs="+", help="input file(s), folder(s) or glob(s)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="fields to train on (default: text)")
    parser.add_argument("--tokenizer-type", required=True, choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"))
    parser.add_argument("--output", required=True,
                        help="SentencePiece: model prefix (writes PREFIX.model); HuggingFace: output folder")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"), help="SentencePiece model type")
    parser.add_argument("--special-tokens", nargs="+", default=list(DEFAULT_SPECIAL_TOKENS),
                        help="unk bos eos [pad [more...]] (default: <unk> <s> </s> <pad>)")
    parser.add_argument("--max-documents", type=int, default=None, help="train on at most N documents")
    parser.add_argument("--max-mb", type=float, default=None, help="train on at most this many MB of text")
    parser.add_argument("--character-coverage", type=float, default=0.9999, help="SentencePiece character coverage")
    parser.add_argument("--min-frequency", type=int, default=2, help="HuggingFace BPE: min pair frequency to merge")
    parser.add_argument("--workers", type=int, default=1, help="trainer threads")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    minimum = len(args.special_tokens) + (256 if args.tokenizer_type == "HuggingFaceTokenizer" else 1)
    if args.vocab_size < minimum:
        parser.error(f"--vocab-size {args.vocab_size} is too small: it must exceed the special tokens"
                     + (" and the 256 byte symbols" if args.tokenizer_type == "HuggingFaceTokenizer" else "")
                     + f" (at least {minimum})")
    if len(args.special_tokens) < 3 or len(set(args.special_tokens)) != len(args.special_tokens):
        parser.error("--special-tokens needs at least three distinct tokens: unk bos eos")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        inputs.find_input_files(args.input)
    except inputs.InputError as err:
        parser.error(f"--input: {err}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # The tokenizers library sizes its thread pool from this variable.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.workers))

    stats = CorpusStats()
    texts = iter_texts(args.input, args.json_keys, stats, args.max_documents,
                       int(args.max_mb * 1e6) if args.max_mb else None)
    first = next(texts, None)
    if first is None:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())) or "none"
        print(f"error: no usable documents in {args.input} (skipped records: {skipped})", file=sys.stderr)
        return 1
    texts = itertools.chain([first], texts)
    try:
        if args.tokenizer_type == "SentencePieceTokenizer":
            out = train_sentencepiece(texts, args.output, args.vocab_size, args.model_type, args.special_tokens,
                                      args.character_coverage, args.workers)
        else:
            out = train_byte_level_bpe(texts, args.output, args.vocab_size, args.special_tokens, args.min_frequency)
    except RuntimeError as err:  # sentencepiece reports impossible settings (vocab too large for the data) this way
        print(f"error: training failed: {err}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())) or "none"
    print(f"trained {args.tokenizer_type} (vocab {args.vocab_size}) on {stats.documents} documents "
          f"({stats.bytes / 1e6:.2f} MB), skipped records: {skipped} -> {out}")
    return 0
