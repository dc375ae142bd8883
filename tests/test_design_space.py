"""The architecture search space: every sample and mutation stays inside it (property-style, many random draws)."""

import random

import pytest

from megatron_flash import patterns
from megatron_flash.design.space import (PAPER_HIDDEN_SIZES, Architecture, Block, SearchSpace, SpaceError, Stage,
                                         WidthRule, parse_hidden_sizes)

PAPER = SearchSpace()
SMALL = SearchSpace(ratios=((0, 1), (1, 1)), ffn_counts=(0, 1), max_blocks=2, max_operators=12,
                    hidden_sizes=(64, 128))


def assert_in_space(space: SearchSpace, arch: Architecture):
    """The rules of the paper's space, checked from the rendered model rather than through the space's code."""
    space.check(arch)
    assert len(arch.stages) == space.num_stages
    stage_ops = space.stage_operators(arch)
    pattern = space.pattern(arch)
    layers = patterns.parse(pattern)
    assert "".join(stage_ops) == layers
    assert 1 <= len(layers) <= space.max_operators
    for i, (stage, ops) in enumerate(zip(arch.stages, stage_ops)):
        block = stage.block
        assert tuple(block.ratio) in space.ratios
        assert block.ffns in space.ffn_counts
        assert 1 <= len(set(block.mixers)) == len(block.mixers) <= 2  # at most two mixer types, distinct
        assert all(m in space.mixers for m in block.mixers)
        unit = block.operators()
        # each mixer is followed by exactly `ffns` FFNs
        mixer_positions = [j for j, c in enumerate(unit) if c != "F"]
        assert len(unit) == len(mixer_positions) * (1 + block.ffns)
        assert all(unit[j + 1:j + 1 + block.ffns] == "F" * block.ffns for j in mixer_positions)
        counts = sorted(unit.count(m) for m in block.mixers)
        assert tuple(counts) == (tuple(block.ratio[1:]) if block.ratio[0] == 0 else tuple(sorted(block.ratio)))
        if i < len(arch.stages) - 1:
            # whole blocks, repeated
            assert ops == unit * stage.repeats
            assert space.min_blocks <= stage.repeats <= space.max_blocks
        else:
            # the last stage: a prefix of its repeated block, trimmed to the budget, no unused whole block
            assert ops and (unit * stage.repeats).startswith(ops)
            assert len(ops) > len(unit) * (stage.repeats - 1)
            assert ops[0] != "F"


@pytest.mark.parametrize("space", [PAPER, SMALL], ids=["paper", "small"])
def test_random_samples_and_mutation_chains_stay_in_the_space(space):
    rng = random.Random(7)
    kinds_seen = set()
    for _ in range(300):
        arch = space.sample(rng)
        assert_in_space(space, arch)
        for _ in range(5):
            child, how = space.mutate(arch, rng)
            kinds_seen.add(how.split(" ")[0])
            assert_in_space(space, child)
            assert space.pattern(child) != space.pattern(arch)
            arch = child
    assert kinds_seen == {"operator", "ratio", "ffns", "blocks"}


def test_each_mutation_kind_changes_only_what_it_names():
    rng = random.Random(3)
    for _ in range(200):
        arch = PAPER.sample(rng)
        for kind in ("operator", "ratio", "ffns", "blocks"):
            try:
                child, _ = PAPER.mutate(arch, rng, kind)
            except SpaceError:
                continue
            blocks_changed = [i for i, (a, b) in enumerate(zip(arch.stages, child.stages)) if a.block != b.block]
            if kind == "blocks":
                # only repeats change (the mutated stage's, and others' by clipping / trimming)
                assert not blocks_changed
                assert [s.repeats for s in arch.stages] != [s.repeats for s in child.stages]
                continue
            assert len(blocks_changed) == 1, kind
            a, b = arch.stages[blocks_changed[0]].block, child.stages[blocks_changed[0]].block
            if kind == "operator":
                assert a.ratio == b.ratio and a.ffns == b.ffns and a.mixers != b.mixers
            elif kind == "ratio":
                assert a.ratio != b.ratio and a.ffns == b.ffns and a.mixers[-1] == b.mixers[-1]
            else:
                assert a.ffns != b.ffns and a.mixers == b.mixers and a.ratio == b.ratio


def test_blocks_render_as_documented():
    assert Block(("M",), (0, 1), 1).operators() == "MF"
    assert Block(("A", "D"), (1, 2), 0).operators() == "ADD"
    assert Block(("A", "M"), (1, 3), 2).operators() == "AFFMFFMFFMFF"
    arch = Architecture((Stage(Block(("D", "M"), (1, 1), 1), 2), Stage(Block(("A",), (0, 1), 1), 1),
                         Stage(Block(("M",), (0, 1), 1), 2)))
    assert PAPER.pattern(arch) == "DFMFDFMF AF MFMF"
    assert arch.describe() == "[D:M 1:1 F1]x2 | [A F1]x1 | [M F1]x2"


def test_the_last_stage_is_trimmed_to_thirty_operators():
    big = Block(("A", "M"), (1, 3), 2)  # 12 operators
    arch = PAPER.normalize(Architecture((Stage(big, 1), Stage(big, 1), Stage(big, 5))))
    assert [s.repeats for s in arch.stages] == [1, 1, 1]
    assert PAPER.stage_operators(arch)[2] == big.operators()[:6]
    assert len(patterns.parse(PAPER.pattern(arch))) == 30
    # earlier stages are clipped to leave room for later ones
    arch = PAPER.normalize(Architecture((Stage(big, 8), Stage(big, 8), Stage(Block(("D",), (0, 1), 0), 3))))
    assert [s.repeats for s in arch.stages] == [1, 1, 3]


def test_architecture_json_round_trip():
    rng = random.Random(1)
    for _ in range(50):
        arch = PAPER.sample(rng)
        assert Architecture.from_dict(arch.to_dict()) == arch
    assert SearchSpace.from_dict(SMALL.to_dict()) == SMALL


@pytest.mark.parametrize("kwargs,message", [
    (dict(mixers=("D", "X")), "distinct mixer characters"),
    (dict(ratios=((2, 3),)), "ratios are 0:1"),
    (dict(max_operators=20), "cannot hold"),
    (dict(min_blocks=3, max_blocks=2), "need 1 <= min <= max"),
    (dict(mutations=("swap",)), "choose from"),
])
def test_bad_spaces_are_clear_errors(kwargs, message):
    with pytest.raises(SpaceError, match=message):
        SearchSpace(**kwargs)


def test_check_rejects_points_outside_the_space():
    arch = Architecture((Stage(Block(("D", "D"), (1, 1), 1), 1),) * 3)
    with pytest.raises(SpaceError, match="distinct"):
        PAPER.check(arch)
    arch = Architecture((Stage(Block(("D",), (0, 1), 3), 1),) * 3)
    with pytest.raises(SpaceError, match="FFNs per mixer"):
        PAPER.check(arch)


def test_hidden_sizes_and_width_rule():
    assert parse_hidden_sizes("1024:2560:256") == PAPER_HIDDEN_SIZES == (1024, 1280, 1536, 1792, 2048, 2304, 2560)
    assert parse_hidden_sizes("64, 96,128") == (64, 96, 128)
    with pytest.raises(SpaceError, match="start:stop:step"):
        parse_hidden_sizes("64:32:8")
    rule = WidthRule.from_preset("nemotron_flash_1b")
    assert (rule.head_dim, rule.q_per_kv, rule.ffn_hidden(2048)) == (128, 4, 6144)
    for hidden in PAPER_HIDDEN_SIZES:
        heads, kv = rule.heads(hidden)
        assert heads * 128 == hidden and heads % kv == 0 and kv <= max(1, heads // 4)
    assert rule.heads(2048) == (16, 4)
    fields = rule.megatron_fields("DFMF", 1536)
    assert (fields["hidden_size"], fields["ffn_hidden_size"], fields["num_attention_heads"],
            fields["num_query_groups"], fields["layer_pattern"]) == (1536, 4608, 12, 3, "DFMF")
    with pytest.raises(SpaceError, match="multiple of the head dim"):
        rule.heads(1000)


def test_parameter_count_of_the_released_1b_model():
    from megatron_flash.presets import NEMOTRON_FLASH_1B_PATTERN, RELEASED_PARAMETER_COUNTS

    rule = WidthRule.from_preset("nemotron_flash_1b")
    assert rule.parameter_count(NEMOTRON_FLASH_1B_PATTERN, 2048) == RELEASED_PARAMETER_COUNTS["nemotron_flash_1b"]
