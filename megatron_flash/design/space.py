"""The architecture search space of Nemotron-Flash's evolutionary search, and the widths of a model in it.

An architecture is ``num_stages`` (3) stages; each stage repeats one *block* ``repeats`` times. A block holds at
most two mixer types from ``mixers`` (D DeltaNet, A attention, M Mamba2) in a ratio from ``ratios``:

* ``0:1``: one mixer type, one layer of it (``Block(("M",), (0, 1), ffns)`` -> ``M``);
* ``1:k`` (``1:1``, ``1:2``, ``1:3``): two distinct types ``(x, y)``: one ``x`` then ``k`` ``y``
  (``Block(("A", "D"), (1, 2), ffns)`` -> ``A D D``);

and every mixer is followed by ``ffns`` (0, 1 or 2) FFN layers (``F``). The model is the three stages one after the
other, at most ``max_operators`` (30) layers: earlier stages are clipped to leave room for a block of every later
stage, and the last stage is trimmed (whole blocks dropped, then the last block cut) to fit.

The hidden size is not part of the genome: the search gives each architecture the largest hidden size of
``hidden_sizes`` whose predicted latency meets the target (megatron_flash.design.latency). The other widths follow
from the hidden size by :class:`WidthRule` (head dim, query heads per KV head, FFN ratio, Mamba2 state), taken from
a preset.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from megatron_flash import patterns, presets

MIXER_NAMES = {"D": "DeltaNet", "A": "attention", "M": "Mamba2", "S": "sliding-window attention"}
PAPER_RATIOS = ((0, 1), (1, 1), (1, 2), (1, 3))
PAPER_HIDDEN_SIZES = tuple(range(1024, 2561, 256))


class SpaceError(ValueError):
    """An architecture or search-space setting outside the space; the message says which rule."""


# --------------------------------------------------------------------------------------------------------------
# Widths
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WidthRule:
    """How every width of a model follows from its hidden size (taken from a preset's proportions).

    heads = hidden / head_dim; KV heads = the largest divisor of heads that is at most heads / q_per_kv;
    FFN = ffn_ratio * hidden; DeltaNet and attention share head_dim (as in the released models).
    Build it with :meth:`from_preset`: the preset is the one source of these proportions.
    """

    base_preset: str
    head_dim: int
    q_per_kv: int
    ffn_ratio: float
    vocab_size: int
    num_meta_tokens: int
    mamba_state_dim: int
    mamba_head_dim: int
    mamba_expand: int
    sliding_window: int | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "WidthRule":
        from megatron_flash.config import NemotronFlashConfig

        fields = presets.get_preset(name)
        defaults = {f: NemotronFlashConfig.__dataclass_fields__[f].default
                    for f in ("mamba_state_dim", "mamba_head_dim", "mamba_expand")}
        rule = dict(
            base_preset=name,
            head_dim=fields["hidden_size"] // fields["num_attention_heads"],
            q_per_kv=fields["num_attention_heads"] // fields["num_query_groups"],
            ffn_ratio=fields["ffn_hidden_size"] / fields["hidden_size"],
            vocab_size=fields["vocab_size"], num_meta_tokens=fields["num_meta_tokens"],
            **{k: fields.get(k, v) for k, v in defaults.items()},
            sliding_window=fields.get("sliding_window"),
        )
        rule.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**rule)

    def check(self, hidden: int) -> None:
        problems = []
        if hidden % self.head_dim:
            problems.append(f"not a multiple of the head dim {self.head_dim}")
        if (self.mamba_expand * hidden) % self.mamba_head_dim:
            problems.append(f"{self.mamba_expand} x hidden is not a multiple of the Mamba2 head dim "
                            f"{self.mamba_head_dim}")
        if problems:
            raise SpaceError(f"hidden size {hidden}: " + "; ".join(problems))

    def heads(self, hidden: int) -> tuple[int, int]:
        self.check(hidden)
        heads = hidden // self.head_dim
        limit = max(1, heads // self.q_per_kv)
        kv = max(d for d in range(1, limit + 1) if heads % d == 0)
        return heads, kv

    def ffn_hidden(self, hidden: int) -> int:
        return int(round(self.ffn_ratio * hidden))

    def megatron_fields(self, pattern: str, hidden: int) -> dict:
        """A preset dict (megatron_flash.presets format) for this pattern at this hidden size."""
        heads, kv = self.heads(hidden)
        fields = presets.get_preset(self.base_preset)
        fields.update(hidden_size=hidden, ffn_hidden_size=self.ffn_hidden(hidden), num_attention_heads=heads,
                      num_query_groups=kv, layer_pattern=patterns.parse(pattern), vocab_size=self.vocab_size,
                      num_meta_tokens=self.num_meta_tokens, mamba_state_dim=self.mamba_state_dim,
                      mamba_head_dim=self.mamba_head_dim, mamba_expand=self.mamba_expand)
        if self.sliding_window:
            fields["sliding_window"] = self.sliding_window
        return fields

    def hf_config(self, pattern: str, hidden: int, **overrides):
        """The Hugging Face NemotronFlashConfig of this pattern at this hidden size (what the latency tools build)."""
        from megatron_flash.hf.configuration_nemotron_flash import NemotronFlashConfig as HFConfig

        heads, kv = self.heads(hidden)
        layer_types, global_idx = patterns.to_layer_types(pattern)
        if "S" in patterns.parse(pattern) and not self.sliding_window:
            raise SpaceError(f"pattern {pattern!r} has sliding-window attention (S) but no sliding window is set")
        kwargs = dict(
            vocab_size=self.vocab_size, hidden_size=hidden, intermediate_size=self.ffn_hidden(hidden),
            layer_types=layer_types, num_attention_heads=heads, num_key_value_heads=kv,
            num_memory_tokens=self.num_meta_tokens, mamba_d_state=self.mamba_state_dim,
            mamba2_headdim=self.mamba_head_dim, mamba_expand=self.mamba_expand,
            sliding_window=self.sliding_window if "S" in patterns.parse(pattern) else None,
            global_attn_idx=global_idx, tie_word_embeddings=True,
        )
        kwargs.update(overrides)
        return HFConfig(**kwargs)

    def parameter_count(self, pattern: str, hidden: int) -> int:
        """Parameters of the model (tied embeddings counted once), from a model built on the meta device."""
        import torch

        from megatron_flash.hf.modeling_nemotron_flash import NemotronFlashForCausalLM

        with torch.device("meta"):
            model = NemotronFlashForCausalLM(self.hf_config(pattern, hidden))
        return sum(p.numel() for p in model.parameters())

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Genome
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """``mixers`` = (y,) with ratio (0, 1), or (x, y), x != y, with ratio (1, k): one x, then k y; each mixer is
    followed by ``ffns`` FFN layers."""

    mixers: tuple
    ratio: tuple
    ffns: int

    def operators(self) -> str:
        if self.ratio[0] == 0:
            order = [self.mixers[-1]] * self.ratio[1]
        else:
            order = [self.mixers[0]] * self.ratio[0] + [self.mixers[1]] * self.ratio[1]
        return "".join(m + "F" * self.ffns for m in order)

    def describe(self) -> str:
        kinds = ":".join(self.mixers) + ("" if self.ratio[0] == 0 else f" {self.ratio[0]}:{self.ratio[1]}")
        return f"{kinds} F{self.ffns}"


@dataclass(frozen=True)
class Stage:
    block: Block
    repeats: int


@dataclass(frozen=True)
class Architecture:
    """A point of the space (already normalized by :meth:`SearchSpace.normalize`)."""

    stages: tuple

    def to_dict(self) -> dict:
        return {"stages": [{"mixers": list(s.block.mixers), "ratio": list(s.block.ratio), "ffns": s.block.ffns,
                            "repeats": s.repeats} for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict) -> "Architecture":
        return cls(tuple(Stage(Block(tuple(s["mixers"]), tuple(s["ratio"]), int(s["ffns"])), int(s["repeats"]))
                         for s in data["stages"]))

    def describe(self) -> str:
        return " | ".join(f"[{s.block.describe()}]x{s.repeats}" for s in self.stages)


@dataclass(frozen=True)
class SearchSpace:
    """The choices of the search (defaults: the paper's)."""

    mixers: tuple = ("D", "A", "M")
    ratios: tuple = PAPER_RATIOS
    ffn_counts: tuple = (0, 1, 2)
    num_stages: int = 3
    min_blocks: int = 1
    max_blocks: int = 8
    max_operators: int = 30
    hidden_sizes: tuple = PAPER_HIDDEN_SIZES
    mutations: tuple = field(default=("operator", "ratio", "ffns", "blocks"))

    def __post_init__(self):
        object.__setattr__(self, "mixers", tuple(self.mixers))
        object.__setattr__(self, "ratios", tuple(tuple(r) for r in self.ratios))
        object.__setattr__(self, "ffn_counts", tuple(self.ffn_counts))
        object.__setattr__(self, "hidden_sizes", tuple(sorted(set(int(h) for h in self.hidden_sizes))))
        object.__setattr__(self, "mutations", tuple(self.mutations))
        bad = [m for m in self.mixers if m not in patterns.MIXER_CHARS]
        if bad or not self.mixers or len(set(self.mixers)) != len(self.mixers):
            raise SpaceError(f"mixers {self.mixers}: give distinct mixer characters from D, A, M, S")
        for r in self.ratios:
            if len(r) != 2 or not ((r[0] == 0 and r[1] == 1) or (r[0] == 1 and r[1] >= 1)):
                raise SpaceError(f"ratio {r}: ratios are 0:1 (one mixer type) or 1:k (k >= 1)")
        if len(self.mixers) < 2 and any(r[0] for r in self.ratios):
            raise SpaceError("ratios 1:k need at least two mixer types")
        if not self.ffn_counts or any(f < 0 for f in self.ffn_counts):
            raise SpaceError(f"ffn_counts {self.ffn_counts}: give counts >= 0")
        if not 1 <= self.min_blocks <= self.max_blocks:
            raise SpaceError(f"blocks per stage {self.min_blocks}..{self.max_blocks}: need 1 <= min <= max")
        if self.num_stages < 1:
            raise SpaceError("num_stages must be >= 1")
        if not self.hidden_sizes:
            raise SpaceError("hidden_sizes is empty")
        worst = (self.num_stages - 1) * self.min_blocks * self.max_block_length + 1
        if worst > self.max_operators:
            raise SpaceError(f"max_operators {self.max_operators} cannot hold {self.min_blocks} block(s) of each of "
                             f"the first {self.num_stages - 1} stages (up to {self.max_block_length} operators "
                             f"each) and one operator of the last")
        unknown = set(self.mutations) - {"operator", "ratio", "ffns", "blocks"}
        if unknown or not self.mutations:
            raise SpaceError(f"mutations {self.mutations}: choose from operator, ratio, ffns, blocks")

    @property
    def max_block_length(self) -> int:
        return (max(sum(r) for r in self.ratios)) * (1 + max(self.ffn_counts))

    def to_dict(self) -> dict:
        return {k: (list(map(list, v)) if k == "ratios" else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "SearchSpace":
        return cls(**data)

    # -- sampling ------------------------------------------------------------------------------------------

    def random_block(self, rng: random.Random) -> Block:
        ratio = rng.choice(self.ratios)
        if ratio[0] == 0:
            mixers = (rng.choice(self.mixers),)
        else:
            mixers = tuple(rng.sample(self.mixers, 2))
        return Block(mixers, ratio, rng.choice(self.ffn_counts))

    def sample(self, rng: random.Random) -> Architecture:
        stages = tuple(Stage(self.random_block(rng), rng.randint(self.min_blocks, self.max_blocks))
                       for _ in range(self.num_stages))
        return self.normalize(Architecture(stages))

    def normalize(self, arch: Architecture) -> Architecture:
        """Clip block repeats so the model fits in ``max_operators``: every stage but the last leaves room for
        ``min_blocks`` blocks of each later stage but the last, and one operator of the last; the last keeps only
        the blocks that (partly) fit, possibly fewer than ``min_blocks``."""
        self.check_blocks(arch)
        stages, used = [], 0
        for i, stage in enumerate(arch.stages):
            length = len(stage.block.operators())
            if i < len(arch.stages) - 1:
                reserve = sum(self.min_blocks * len(s.block.operators()) for s in arch.stages[i + 1:-1]) + 1
                fit = (self.max_operators - used - reserve) // length
                repeats = max(self.min_blocks, min(stage.repeats, fit))
            else:
                repeats = max(1, min(stage.repeats, math.ceil((self.max_operators - used) / length)))
            stages.append(Stage(stage.block, repeats))
            used += repeats * length
        return Architecture(tuple(stages))

    def check_blocks(self, arch: Architecture) -> None:
        if len(arch.stages) != self.num_stages:
            raise SpaceError(f"{len(arch.stages)} stages; the space has {self.num_stages}")
        for i, stage in enumerate(arch.stages):
            b = stage.block
            where = f"stage {i + 1} block {b}"
            if tuple(b.ratio) not in self.ratios:
                raise SpaceError(f"{where}: ratio {b.ratio[0]}:{b.ratio[1]} not in the space")
            if len(b.mixers) != (1 if b.ratio[0] == 0 else 2) or len(set(b.mixers)) != len(b.mixers):
                raise SpaceError(f"{where}: ratio 0:1 takes one mixer type, 1:k two distinct types")
            if any(m not in self.mixers for m in b.mixers):
                raise SpaceError(f"{where}: mixer not in {self.mixers}")
            if b.ffns not in self.ffn_counts:
                raise SpaceError(f"{where}: {b.ffns} FFNs per mixer not in {self.ffn_counts}")
            low = 1 if i == len(arch.stages) - 1 else self.min_blocks  # the last stage may be trimmed below min
            if not low <= stage.repeats <= self.max_blocks:
                raise SpaceError(f"stage {i + 1}: {stage.repeats} blocks outside {self.min_blocks}..{self.max_blocks}")

    def check(self, arch: Architecture) -> None:
        """Raise SpaceError unless ``arch`` is a normalized point of this space."""
        self.check_blocks(arch)
        if self.normalize(arch) != arch:
            raise SpaceError(f"{arch.describe()} is not normalized (it does not fit in {self.max_operators} "
                             f"operators as given)")

    # -- rendering -----------------------------------------------------------------------------------------

    def stage_operators(self, arch: Architecture) -> list[str]:
        """Each stage's operators, the last one trimmed to the operator budget."""
        out, used = [], 0
        for stage in arch.stages:
            ops = stage.block.operators() * stage.repeats
            ops = ops[:self.max_operators - used]
            out.append(ops)
            used += len(ops)
        return out

    def pattern(self, arch: Architecture) -> str:
        """The layer pattern (megatron_flash.patterns), stages separated by spaces (which patterns ignore)."""
        return " ".join(self.stage_operators(arch))

    # -- mutation ------------------------------------------------------------------------------------------

    def mutate(self, arch: Architecture, rng: random.Random, kind: str | None = None) -> tuple[Architecture, str]:
        """One random change (operator, ratio, FFN count or blocks of one stage) giving a different pattern.

        Returns (child, description). Raises SpaceError when no mutation of this kind changes the model.
        """
        kinds = [kind] if kind else list(self.mutations)
        parent_pattern = self.pattern(arch)
        for _ in range(200):
            k = rng.choice(kinds)
            i = rng.randrange(len(arch.stages))
            stage = arch.stages[i]
            new = self._mutate_stage(stage, k, rng)
            if new is None:
                continue
            stages = list(arch.stages)
            stages[i] = new
            child = self.normalize(Architecture(tuple(stages)))
            if self.pattern(child) != parent_pattern:
                return child, f"{k} of stage {i + 1}: [{stage.block.describe()}]x{stage.repeats} -> " \
                              f"[{new.block.describe()}]x{child.stages[i].repeats}"
        raise SpaceError(f"no {kind or 'mutation'} changes {arch.describe()}")

    def _mutate_stage(self, stage: Stage, kind: str, rng: random.Random) -> Stage | None:
        b = stage.block
        if kind == "operator":
            slot = rng.randrange(len(b.mixers))
            other = set(b.mixers) - {b.mixers[slot]}
            choices = [m for m in self.mixers if m != b.mixers[slot] and m not in other]
            if not choices:
                return None
            mixers = list(b.mixers)
            mixers[slot] = rng.choice(choices)
            return Stage(Block(tuple(mixers), b.ratio, b.ffns), stage.repeats)
        if kind == "ratio":
            choices = [r for r in self.ratios if r != tuple(b.ratio)]
            if not choices:
                return None
            ratio = rng.choice(choices)
            majority = b.mixers[-1]
            if ratio[0] == 0:
                mixers = (majority,)
            elif len(b.mixers) == 2:
                mixers = b.mixers
            else:
                mixers = (rng.choice([m for m in self.mixers if m != majority]), majority)
            return Stage(Block(mixers, ratio, b.ffns), stage.repeats)
        if kind == "ffns":
            choices = [f for f in self.ffn_counts if f != b.ffns]
            return Stage(Block(b.mixers, b.ratio, rng.choice(choices)), stage.repeats) if choices else None
        if kind == "blocks":
            choices = [r for r in range(self.min_blocks, self.max_blocks + 1) if r != stage.repeats]
            return Stage(b, rng.choice(choices)) if choices else None
        raise SpaceError(f"unknown mutation {kind!r}")


def parse_hidden_sizes(text: str) -> tuple:
    """``"1024:2560:256"`` (start:stop:step, inclusive) or ``"64,96,128"``."""
    text = str(text).strip()
    try:
        if ":" in text:
            start, stop, step = (int(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            return tuple(range(start, stop + 1, step))
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise SpaceError(f"hidden sizes {text!r}: give start:stop:step (e.g. 1024:2560:256) or a list "
                         f"(e.g. 64,96,128)") from None
