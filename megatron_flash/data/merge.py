"""Merge several megatron ``.bin/.idx`` prefixes into one (engine and CLI of ``tools/merge_datasets.py``).

Uses megatron's ``IndexedDatasetBuilder.add_index`` (copies each ``.bin``, concatenates the indices), written under
temporary names and renamed when complete like the preprocessing outputs. Everything is checked before any byte is
written: every prefix must be complete, and all must share one token dtype (``add_index`` would otherwise stop with
a bare assert half-way through).

``--input`` takes Megatron-LM's form (a folder: every complete prefix in it, sorted by name) as well as explicit
prefixes or globs of ``.idx`` files; the order given is the document order of the result.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from typing import List, Optional, Sequence

from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from megatron_flash.data.indexed_output import AtomicIndexedWriter, count_tokens, is_complete

logger = logging.getLogger("merge_datasets")


class MergeError(ValueError):
    pass


def _prefix_of(path: str) -> str:
    return path[: -len(".idx")] if path.endswith(".idx") else path[: -len(".bin")] if path.endswith(".bin") else path


def find_prefixes(specs: Sequence[str]) -> List[str]:
    """Expand folders (sorted), globs (sorted) and explicit prefixes, keeping the given order between specs."""
    prefixes: List[str] = []
    for spec in specs:
        if os.path.isfile(get_idx_path(_prefix_of(spec))):
            # A prefix first: megatron's GPTDataset may have made a *folder* of that name for its index cache.
            found = [_prefix_of(spec)]
        elif os.path.isdir(spec):
            found = sorted(_prefix_of(p) for p in glob.glob(os.path.join(spec, "*.idx")))
            if not found:
                raise MergeError(f"folder {spec!r} has no .idx files")
        elif any(ch in spec for ch in "*?["):
            found = sorted({_prefix_of(p) for p in glob.glob(spec) if p.endswith((".idx", ".bin"))})
            if not found:
                raise MergeError(f"glob {spec!r} matches no .bin/.idx files")
        else:
            found = [_prefix_of(spec)]
        prefixes.extend(found)
    duplicates = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if duplicates:
        raise MergeError(f"prefixes given more than once: {duplicates}")
    return prefixes


def check_mergeable(prefixes: Sequence[str]):
    """The common token dtype of ``prefixes``; raises MergeError naming the first incomplete or mismatched one."""
    if not prefixes:
        raise MergeError("nothing to merge")
    dtype = None
    for prefix in prefixes:
        if not (os.path.isfile(get_bin_path(prefix)) and os.path.isfile(get_idx_path(prefix))):
            missing = [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(p)]
            raise MergeError(f"prefix {prefix!r} is missing {', '.join(missing)}")
        if not is_complete(prefix):
            raise MergeError(f"prefix {prefix!r} is incomplete or corrupt: its .idx does not match its .bin size")
        this = IndexedDataset(prefix, mmap=False).index.dtype
        if dtype is None:
            dtype, first = this, prefix
        elif this != dtype:
            raise MergeError(f"prefix {prefix!r} stores {this.__name__} tokens but {first!r} stores "
                             f"{dtype.__name__}: they come from tokenizers of different vocabulary sizes")
    return dtype


def merge(prefixes: Sequence[str], output_prefix: str, overwrite: bool = False) -> dict:
    """Merge ``prefixes`` (in order) into ``output_prefix``; returns documents/tokens counts."""
    if not overwrite and is_complete(output_prefix):
        documents, tokens = count_tokens(output_prefix)
        logger.info("%s is complete, skipping (use --overwrite to redo)", output_prefix)
        return {"output": output_prefix, "documents": documents, "tokens": tokens, "skipped": True}
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise MergeError(f"output prefix {output_prefix!r} is also an input")
    dtype = check_mergeable(prefixes)
    with AtomicIndexedWriter(output_prefix, dtype) as writer:
        for i, prefix in enumerate(prefixes, 1):
            logger.info("[%d/%d] adding %s", i, len(prefixes), prefix)
            writer.add_index(prefix)
        writer.commit()
    documents, tokens = count_tokens(output_prefix)
    return {"output": output_prefix, "documents": documents, "tokens": tokens, "skipped": False}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="merge_datasets.py",
                                     description="Merge megatron .bin/.idx prefixes into one prefix.")
    parser.add_argument("--input", required=True, nargs="+",
                        help="folder(s) of prefixes (Megatron-LM style), prefixes, or globs of .idx files")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    parser.add_argument("--overwrite", action="store_true", help="redo a complete output")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its index reader logs every file it opens
    try:
        prefixes = find_prefixes(args.input)
        result = merge(prefixes, args.output_prefix, overwrite=args.overwrite)  # checks everything before writing
    except MergeError as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        print("interrupted: partial output removed", file=sys.stderr)
        return 130
    verb = "already complete" if result["skipped"] else f"merged {len(prefixes)} prefixes"
    print(f"{verb}: {result['output']}.bin/.idx, {result['documents']} documents, {result['tokens']} tokens")
    return 0
