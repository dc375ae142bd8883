#!/usr/bin/env python3
"""Build a small real text corpus from the Python standard library installed on this machine (no network).

Three kinds of documents, each a JSONL line ``{"text": ..., "id": ..., "kind": ...}``:

* ``code``: the source of each ``.py`` module under sysconfig's stdlib path (site-packages excluded);
* ``docstrings``: the prose of each module: its module, class and function docstrings, extracted with ``ast``;
* ``docs``: ``.txt``/``.rst`` files found there (license texts, test data, ``pydoc_data`` topics are .py).

Deterministic: files are ordered by a hash of their relative path (a stable, well-mixed order, so a small corpus
still samples the whole library instead of the alphabetically first modules), documents are added until the size
budget is reached, and each source file goes to the validation split when a hash of its path falls under
``--valid-fraction`` (a module's code and its docstrings always land in the same split, so nothing leaks). The same stdlib and arguments always give byte-identical files.

Usage::

    python data_prep/build_sample_corpus.py --output-dir /tmp/corpus --size-mb 5 --valid-fraction 0.05
    # -> /tmp/corpus/train.jsonl, /tmp/corpus/valid.jsonl, /tmp/corpus/manifest.json

With ``--train-shards N`` the training split is written as ``train-00000-of-0000N.jsonl`` ... (round-robin), the
shape of a real sharded corpus for ``tokenize_local.sh``/``tokenize_shards.sbatch``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterator, List, Optional

KINDS = ("code", "docstrings", "docs")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "idlelib/Icons"}
MAX_DOC_BYTES = 1 << 20  # a few stdlib files are huge generated tables; cap so no single file dominates


def default_source_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def list_source_files(root: str) -> List[str]:
    """Relative paths of .py/.txt/.rst files under root, in a stable hash order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_DIRS and not d.startswith("config-")
                             and os.path.normpath(os.path.join(rel_dir, d)) not in SKIP_DIRS)
        for name in filenames:
            if name.endswith((".py", ".txt", ".rst")):
                found.append(os.path.normpath(os.path.join(rel_dir, name)))
    return sorted(found, key=lambda rel: (_stable_hash(rel), rel))


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_DOC_BYTES + 1)
        if len(data) > MAX_DOC_BYTES:
            data = data[:MAX_DOC_BYTES]
            data = data[: data.rfind(b"\n") + 1] or data
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError):  # some test files are deliberately not UTF-8
        return None


def extract_docstrings(source: str, module: str) -> Optional[str]:
    """Module, class and function docstrings of a module as one prose document, or None if it has none."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # lib2to3 test data etc. holds deliberately invalid Python
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                parts.append(f"{kind} {node.name}\n\n{doc}")
    return "\n\n".join(parts) if parts else None


def iter_documents(root: str, kinds=KINDS) -> Iterator[dict]:
    for rel in list_source_files(root):
        text = _read_text(os.path.join(root, rel))
        if text is None or not text.strip():
            continue
        if rel.endswith(".py"):
            if "code" in kinds:
                yield {"id": f"code:{rel}", "kind": "code", "source": rel, "text": text}
            if "docstrings" in kinds:
                prose = extract_docstrings(text, rel[:-3].replace(os.sep, "."))
                if prose:
                    yield {"id": f"docstrings:{rel}", "kind": "docstrings", "source": rel, "text": prose}
        elif "docs" in kinds:
            yield {"id": f"docs:{rel}", "kind": "docs", "source": rel, "text": text}


def is_validation(source: str, valid_fraction: float) -> bool:
    return (_stable_hash("valid:" + source) % 1_000_000) < valid_fraction * 1_000_000


def build_corpus(output_dir: str, size_mb: float, valid_fraction: float = 0.0, source_root: Optional[str] = None,
                 kinds=KINDS, train_shards: int = 1) -> dict:
    """Write the corpus; returns the manifest (also written to manifest.json)."""
    if size_mb <= 0:
        raise ValueError(f"size must be positive, got {size_mb} MB")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    if train_shards < 1:
        raise ValueError(f"train shards must be at least 1, got {train_shards}")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    root = source_root or default_source_root()
    if not os.path.isdir(root):
        raise ValueError(f"source root {root!r} is not a folder")
    os.makedirs(output_dir, exist_ok=True)

    budget = int(size_mb * 1e6)
    if train_shards == 1:
        train_names = ["train.jsonl"]
    else:
        train_names = [f"train-{i:05d}-of-{train_shards:05d}.jsonl" for i in range(train_shards)]
    paths = {name: os.path.join(output_dir, name) for name in train_names + ["valid.jsonl"]}
    handles = {name: open(path + ".partial", "w", encoding="utf-8") for name, path in paths.items()}
    stats = {"train": {"documents": 0, "bytes": 0}, "valid": {"documents": 0, "bytes": 0}}
    written = 0
    try:
        for doc in iter_documents(root, kinds):
            line = json.dumps({"text": doc["text"], "id": doc["id"], "kind": doc["kind"]}, ensure_ascii=False) + "\n"
            size = len(line.encode("utf-8"))
            if written + size > budget and written > 0:
                break
            split = "valid" if valid_fraction and is_validation(doc["source"], valid_fraction) else "train"
            name = "valid.jsonl" if split == "valid" else train_names[stats["train"]["documents"] % train_shards]
            handles[name].write(line)
            stats[split]["documents"] += 1
            stats[split]["bytes"] += size
            written += size
    finally:
        for handle in handles.values():
            handle.close()
    for name, path in paths.items():
        os.replace(path + ".partial", path)
    if not valid_fraction:
        os.remove(paths["valid.jsonl"])
    manifest = {
        "source_root": root, "python": sys.version.split()[0], "size_mb": size_mb, "valid_fraction": valid_fraction,
        "kinds": list(kinds), "train_files": train_names, "valid_file": "valid.jsonl" if valid_fraction else None,
        **stats,
    }
    with open(os.path.join(output_dir, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="folder for train*.jsonl, valid.jsonl, manifest.json")
    parser.add_argument("--size-mb", type=float, default=10.0, help="total corpus size in MB (default 10)")
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="fraction of documents held out in valid.jsonl (default 0: no validation split)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="document kinds to include")
    parser.add_argument("--train-shards", type=int, default=1, help="split train into N files (default 1)")
    parser.add_argument("--source-root", default=None,
                        help="folder to read instead of this Python's stdlib (sysconfig 'stdlib' path)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        manifest = build_corpus(args.output_dir, args.size_mb, args.valid_fraction, args.source_root,
                                tuple(args.kinds), args.train_shards)
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps({k: manifest[k] for k in ("train", "valid", "train_files", "source_root")}))
    if manifest["train"]["bytes"] + manifest["valid"]["bytes"] < args.size_mb * 1e6 * 0.9:
        print(f"note: the source has only {(manifest['train']['bytes'] + manifest['valid']['bytes']) / 1e6:.1f} MB "
              f"of usable text, less than the {args.size_mb} MB asked for", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
