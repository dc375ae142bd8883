"""Layer patterns: the compact CLI string, the released config's ``layer_types`` list, and pipeline splits.

One character per layer:

====  ==================  ======================
char  layer               released ``layer_types``
====  ==================  ======================
D     DeltaNet            ``deltanet``
M     Mamba2              ``m2``
A     attention (full)    ``a``
S     attention (sliding  ``a`` (index not in ``global_attn_idx`` while ``sliding_window`` is set)
      window)
F     SwiGLU FFN          ``f``
====  ==================  ======================

Spaces, ``-`` and ``|`` are ignored, so ``"DF MF AF"`` and ``"DFMFAF"`` are the same pattern. ``|`` may also mark
pipeline-stage boundaries (``"DFMF|AFMF"``) where an explicit split is wanted.
"""

from __future__ import annotations

LAYER_TYPES = {"D": "deltanet", "M": "m2", "A": "a", "S": "a", "F": "f"}
MIXER_CHARS = frozenset("DMAS")


class PatternError(ValueError):
    """An invalid layer pattern; the message names the offending position."""


def parse(pattern: str) -> str:
    """Validate a pattern and return it as a bare string of layer characters (upper case)."""
    if not isinstance(pattern, str):
        raise PatternError(f"layer pattern must be a string, got {type(pattern).__name__}")
    out = []
    for pos, ch in enumerate(pattern):
        if ch in " -|\t":
            continue
        if ch.upper() not in LAYER_TYPES:
            raise PatternError(
                f"invalid layer {ch!r} at position {pos} of pattern {pattern!r}: "
                f"use D (DeltaNet), M (Mamba2), A (attention), S (sliding-window attention) or F (FFN)")
        out.append(ch.upper())
    if not out:
        raise PatternError(f"layer pattern {pattern!r} has no layers")
    return "".join(out)


def explicit_stage_sizes(pattern: str) -> list[int] | None:
    """Layer counts of the '|'-separated stages of a pattern, or None when it has no '|'."""
    return [len(parse(part)) for part in pattern.split("|")] if "|" in pattern else None


def stage_boundaries(num_layers: int, pipeline_stages: int, stage_sizes=None) -> list[tuple[int, int]]:
    """Half-open [start, end) layer ranges of each pipeline stage.

    ``stage_sizes`` (from '|' in the pattern) fixes them; otherwise layers are split as evenly as possible,
    earlier stages taking the remainder.
    """
    if stage_sizes:
        if len(stage_sizes) != pipeline_stages:
            raise PatternError(
                f"the pattern has {len(stage_sizes)} '|'-separated stages but pipeline size is {pipeline_stages}")
        if sum(stage_sizes) != num_layers:
            raise PatternError(f"stage sizes {stage_sizes} do not add up to {num_layers} layers")
        sizes = list(stage_sizes)
    else:
        if num_layers < pipeline_stages:
            raise PatternError(f"{num_layers} layers cannot fill {pipeline_stages} pipeline stages")
        base, extra = divmod(num_layers, pipeline_stages)
        sizes = [base + (1 if i < extra else 0) for i in range(pipeline_stages)]
    bounds, start = [], 0
    for size in sizes:
        if size == 0:
            raise PatternError(f"stage sizes {sizes}: every pipeline stage needs at least one layer")
        bounds.append((start, start + size))
        start += size
    return bounds


def to_layer_types(pattern: str) -> tuple[list[str], list[int]]:
    """Pattern -> (released ``layer_types``, ``global_attn_idx``: indices of full attention layers when some are
    sliding-window)."""
    layers = parse(pattern)
    types = [LAYER_TYPES[c] for c in layers]
    global_idx = [i for i, c in enumerate(layers) if c == "A"] if "S" in layers else []
    return types, global_idx


def from_layer_types(layer_types, sliding_window=None, global_attn_idx=()) -> str:
    """Released ``layer_types`` (and sliding-window settings) -> pattern."""
    inverse = {"deltanet": "D", "m2": "M", "f": "F"}
    out = []
    for i, t in enumerate(layer_types):
        if t == "a":
            out.append("S" if sliding_window and i not in set(global_attn_idx) else "A")
        elif t in inverse:
            out.append(inverse[t])
        else:
            raise PatternError(f"layer_types[{i}] = {t!r} is not one of 'deltanet', 'm2', 'a', 'f'")
    return "".join(out)
