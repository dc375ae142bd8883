#!/usr/bin/env python3
"""Turn a data mixture (YAML) into the trainer's blend arguments, after checking the tokenized data exists.

A mixture lists sources, each with a tokenized prefix (relative to a data root), a sampling weight and, where
known, an approximate token count with its provenance (see data_prep/mixtures/*.yaml and docs/data.md). This tool

* resolves every prefix under the data root and checks its ``.bin``/``.idx`` exist (all missing ones are listed);
* reads each source's real token count from its ``.idx`` (``--estimate`` uses the mixture's approx_tokens instead,
  for planning before anything is tokenized);
* reports, for a token budget (e.g. ``4.5T``), how many tokens each source contributes and how many epochs of it
  that is (over 1 means the source repeats);
* emits Megatron's ``--data-path w1 prefix1 w2 prefix2 ...`` (``--format args``), the same as a file for
  ``--data-args-path`` (``--format data-args``), or a per-split JSON for ``--per-split-data-args-path`` /
  :func:`megatron_flash.data.build_pretraining_datasets` (``--format per-split-json``; uses the mixture's optional
  ``valid``/``test`` source lists).

Usage::

    python data_prep/build_blend.py data_prep/mixtures/phase1_zyda2.yaml --data-root /data/tokenized \\
        --token-budget 4.5T                       # prints --data-path ... and the table on stderr
    python data_prep/build_blend.py MIX.yaml --data-root R --format per-split-json --output blend.json

Importable: :func:`load_mixture`, :func:`plan_blend`, :func:`data_path_list`, :func:`per_split_args`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

DATA_ROOT_ENV = "MF_DATA_ROOT"
SPLITS = ("train", "valid", "test")
_SUFFIXES = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


class MixtureError(ValueError):
    """A mixture file that cannot be used; the message names the file and the source."""


@dataclass
class Source:
    name: str
    prefix: str
    weight: float
    approx_tokens: Optional[float] = None
    tokens_source: Optional[str] = None


@dataclass
class Mixture:
    path: str
    name: str
    description: str
    sources: Dict[str, List[Source]]  # split -> sources; "train" always present
    data_root: Optional[str] = None
    token_budget: Optional[float] = None
    extra: dict = field(default_factory=dict)


def parse_token_count(value) -> float:
    """``4.5T``, ``300B``, ``12M``, ``1e9`` or a number -> tokens."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGBT]?)\s*", str(value), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read token count {value!r}: use a number or e.g. 4.5T, 300B, 12M")
    return float(match.group(1)) * _SUFFIXES[match.group(2).upper()]


def _source(entry, where: str) -> Source:
    if not isinstance(entry, dict):
        raise MixtureError(f"{where}: each source must be a mapping with name, prefix, weight")
    unknown = set(entry) - {"name", "prefix", "weight", "approx_tokens", "tokens_source"}
    if unknown:
        raise MixtureError(f"{where}: unknown field(s) {sorted(unknown)}")
    for key in ("name", "prefix", "weight"):
        if entry.get(key) in (None, ""):
            raise MixtureError(f"{where}: missing '{key}'")
    weight = entry["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or math.isnan(weight):
        raise MixtureError(f"{where} ({entry['name']}): weight must be a number >= 0, got {weight!r}")
    approx = entry.get("approx_tokens")
    if approx is not None:
        try:
            approx = parse_token_count(approx)
        except ValueError as err:
            raise MixtureError(f"{where} ({entry['name']}): approx_tokens: {err}") from None
    return Source(str(entry["name"]), str(entry["prefix"]), float(weight), approx, entry.get("tokens_source"))


def load_mixture(path: str) -> Mixture:
    """Read and validate a mixture YAML file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except FileNotFoundError:
        raise MixtureError(f"mixture file {path!r} does not exist") from None
    except yaml.YAMLError as err:
        raise MixtureError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list) or not doc["sources"]:
        raise MixtureError(f"{path}: needs a non-empty 'sources' list")
    sources = {}
    for split, key in (("train", "sources"), ("valid", "valid"), ("test", "test")):
        entries = doc.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list) or not entries:
            raise MixtureError(f"{path}: '{key}' must be a non-empty list of sources")
        parsed = [_source(entry, f"{path}: {key}[{i}]") for i, entry in enumerate(entries)]
        names = [s.name for s in parsed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MixtureError(f"{path}: '{key}' has duplicate source names {duplicates}")
        if not any(s.weight > 0 for s in parsed):
            raise MixtureError(f"{path}: '{key}' has no source with a positive weight")
        sources[split] = parsed
    budget = doc.get("token_budget")
    known = {"name", "description", "sources", "valid", "test", "data_root", "token_budget"}
    return Mixture(
        path=path, name=str(doc.get("name") or os.path.splitext(os.path.basename(path))[0]),
        description=str(doc.get("description") or "").strip(), sources=sources, data_root=doc.get("data_root"),
        token_budget=parse_token_count(budget) if budget is not None else None,
        extra={k: v for k, v in doc.items() if k not in known},
    )


def resolve_prefix(template: str, data_root: Optional[str]) -> str:
    """``{data_root}`` and ``$VARS`` expanded; a relative result is taken relative to the data root."""
    if "{data_root}" in template and not data_root:
        raise MixtureError(f"prefix {template!r} uses {{data_root}} but no data root is set "
                           f"(--data-root, ${DATA_ROOT_ENV} or the mixture's data_root)")
    prefix = os.path.expanduser(os.path.expandvars(template.replace("{data_root}", data_root or "")))
    if not os.path.isabs(prefix) and data_root:
        prefix = os.path.join(data_root, prefix)
    return os.path.normpath(prefix)


@dataclass
class PlannedSource:
    split: str
    source: Source
    prefix: str
    share: float  # normalized weight within its split
    tokens: Optional[int]  # on disk (from .idx), or the mixture's approx count with --estimate
    tokens_are_estimate: bool
    documents: Optional[int] = None

    def budget_tokens(self, budget: Optional[float]) -> Optional[float]:
        return None if budget is None else self.share * budget

    def epochs(self, budget: Optional[float]) -> Optional[float]:
        if budget is None or not self.tokens:
            return None
        return self.share * budget / self.tokens


def _prefix_files_missing(prefix: str) -> List[str]:
    return [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]


def plan_blend(mixture: Mixture, data_root: Optional[str] = None, estimate: bool = False) -> List[PlannedSource]:
    """Resolve, check and count every source with a positive weight. Raises MixtureError listing missing data."""
    root = data_root or os.environ.get(DATA_ROOT_ENV) or mixture.data_root
    planned, missing = [], []
    for split, sources in mixture.sources.items():
        active = [s for s in sources if s.weight > 0]
        total = sum(s.weight for s in active)
        for source in active:
            prefix = resolve_prefix(source.prefix, root)
            absent = _prefix_files_missing(prefix)
            if absent and not estimate:
                missing.append(f"  {split}/{source.name}: {' and '.join(absent)}")
                continue
            tokens = documents = None
            if not absent:
                from megatron_flash.data.indexed_output import count_tokens

                documents, tokens = count_tokens(prefix)
            is_estimate = tokens is None
            if is_estimate and source.approx_tokens is not None:
                tokens = int(source.approx_tokens)
            planned.append(PlannedSource(split, source, prefix, source.weight / total, tokens, is_estimate,
                                         documents))
    if missing:
        raise MixtureError(f"{mixture.path}: tokenized data missing for {len(missing)} source(s) "
                           f"(data root: {root!r}):\n" + "\n".join(missing)
                           + "\ntokenize them (data_prep/tokenize_local.sh or tokenize_shards.sbatch), fix the "
                             "prefixes/data root, or plan with --estimate")
    return planned


def data_path_list(planned: Sequence[PlannedSource], split: str = "train") -> List[str]:
    """Megatron's blend list ``[w1, prefix1, w2, prefix2, ...]`` for one split (weights as given in the mixture)."""
    out = []
    for item in planned:
        if item.split == split:
            out += [f"{item.source.weight:g}", item.prefix]
    return out


def per_split_args(planned: Sequence[PlannedSource]) -> Dict[str, Optional[List[str]]]:
    """Megatron's per-split JSON: {"train": [...], "valid": [...] or None, "test": [...] or None}."""
    return {split: (data_path_list(planned, split) or None) for split in SPLITS}


def _human(tokens: Optional[float]) -> str:
    if tokens is None:
        return "unknown"
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.2f}{suffix}"
    return f"{tokens:.0f}"


def format_report(mixture: Mixture, planned: Sequence[PlannedSource], budget: Optional[float]) -> str:
    lines = [f"mixture {mixture.name} ({mixture.path})" + (f", budget {_human(budget)} tokens" if budget else "")]
    header = f"{'split':5} {'source':28} {'share':>7} {'tokens':>10} {'budget':>9} {'epochs':>7}  prefix"
    lines.append(header)
    for item in planned:
        tokens = _human(item.tokens) + ("~" if item.tokens_are_estimate and item.tokens else "")
        epochs = item.epochs(budget) if item.split == "train" else None
        lines.append(
            f"{item.split:5} {item.source.name[:28]:28} {item.share:7.2%} {tokens:>10} "
            f"{_human(item.budget_tokens(budget)) if budget and item.split == 'train' else '-':>9} "
            f"{f'{epochs:.2f}' if epochs is not None else '-':>7}  {item.prefix}"
        )
    if any(i.tokens_are_estimate for i in planned):
        lines.append("~ = the mixture's approx_tokens (not read from data); 'unknown' = no count available")
    repeats = [i.source.name for i in planned if i.split == "train" and (i.epochs(budget) or 0) > 1]
    if repeats:
        lines.append(f"sources repeated more than once within the budget: {', '.join(repeats)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mixture", help="mixture YAML (see data_prep/mixtures/)")
    parser.add_argument("--data-root", default=None,
                        help=f"folder the prefixes are relative to (default: ${DATA_ROOT_ENV}, then the mixture's "
                             "data_root)")
    parser.add_argument("--token-budget", default=None, help="training tokens, e.g. 4.5T (default: the mixture's)")
    parser.add_argument("--format", choices=("args", "data-args", "per-split-json"), default="args",
                        help="args: print '--data-path ...'; data-args: the blend as a file for --data-args-path; "
                             "per-split-json: {'train': [...], 'valid': [...], 'test': [...]}")
    parser.add_argument("--output", default=None, help="write the result to this file instead of stdout")
    parser.add_argument("--estimate", action="store_true",
                        help="do not require the tokenized data: use approx_tokens for missing sources")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        mixture = load_mixture(args.mixture)
        budget = parse_token_count(args.token_budget) if args.token_budget is not None else mixture.token_budget
        planned = plan_blend(mixture, args.data_root, estimate=args.estimate)
    except (MixtureError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_report(mixture, planned, budget), file=sys.stderr)
    if args.format == "per-split-json":
        text = json.dumps(per_split_args(planned), indent=1) + "\n"
    else:
        blend = data_path_list(planned, "train")
        if any(i.split != "train" for i in planned):
            print("note: valid/test sources are only used by --format per-split-json", file=sys.stderr)
        text = ("--data-path " if args.format == "args" else "") + " ".join(blend) + "\n"
    if args.output:
        tmp = args.output + ".partial"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
