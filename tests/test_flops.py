"""megatron_flash.flops, the FLOP count behind the trainer's MFU, against torch's FlopCounterMode on the real model
for the terms that are exact matmul counts (projections, FFN, output layer): plain training, recomputed layers and
recomputed logits. The chunked DeltaNet/Mamba2 and causal-attention terms are formulas of the algorithm, not of
one implementation, and are not compared here."""

import pytest
import torch

from megatron_flash.testing import run_distributed

SEQ, BATCH = 12, 2


def _counted_and_formula(recompute_layers, recompute_logits, share_meta_rows=True):
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_flash import flops
    from megatron_flash.models import builder

    spec = builder.resolve("tiny", layer_pattern="FF", use_cpu_initialization=True, vocab_size=256,
                           recompute_logits=recompute_logits, share_meta_rows=share_meta_rows,
                           **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
                              if recompute_layers else {}))
    model = builder.build_model(spec, SEQ)
    tokens = torch.randint(0, 256, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean().backward()
    per_token = flops.train_flops_per_token(spec.config, model.padded_vocab_size, SEQ, recompute_layers,
                                            recompute_logits, micro_batch=BATCH)
    assert spec.config.num_meta_tokens > 0  # the layers' share of the meta positions is part of the count
    return counter.get_total_flops(), per_token * BATCH * SEQ


@pytest.mark.parametrize("recompute_layers,recompute_logits", [(False, False), (True, False), (False, True),
                                                               (True, True)])
def test_train_flops_equal_the_counted_matmuls(recompute_layers, recompute_logits):
    counted, formula = run_distributed(_counted_and_formula, world_size=1, args=(recompute_layers,
                                                                                  recompute_logits))[0]
    assert counted == pytest.approx(formula, rel=1e-9)


def test_train_flops_count_the_meta_rows_once_per_micro_batch_where_the_ffn_shares_them():
    """Sharing (the default) leaves the FFN fewer FLOPs; the formula follows it either way."""
    shared, shared_formula = run_distributed(_counted_and_formula, world_size=1, args=(False, False, True))[0]
    every, every_formula = run_distributed(_counted_and_formula, world_size=1, args=(False, False, False))[0]
    assert shared < every
    assert (shared, every) == (pytest.approx(shared_formula, rel=1e-9), pytest.approx(every_formula, rel=1e-9))


def _counted_matmuls_and_formula(pattern, share_meta_prefix):
    """A DeltaNet or Mamba2 model's 2-D matmuls as FlopCounterMode counts them (the projections and the output
    layer; the scans' chunked products are batched, and its count of a depthwise conv's backward is not the conv's
    work), and the formula without its convs' and scans' terms."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_flash import flops
    from megatron_flash.models import builder

    spec = builder.resolve("tiny", layer_pattern=pattern, use_cpu_initialization=True, vocab_size=256,
                           share_meta_prefix_in_mixers=share_meta_prefix)
    config = spec.config
    model = builder.build_model(spec, SEQ)
    tokens = torch.randint(0, 256, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean().backward()
    matmuls = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    per_token = flops.train_flops_per_token(config, model.padded_vocab_size, SEQ, micro_batch=BATCH)
    sequence = sum(3 * flops.mixer_flops_per_row(config, char).sequence
                   * flops.mixer_rows(config, char, SEQ, micro_batch=BATCH)[1] for char in pattern) * BATCH
    rows = flops.mixer_rows(config, pattern[0], SEQ, micro_batch=BATCH)
    return matmuls, per_token * BATCH * SEQ - sequence, rows, config.num_meta_tokens


@pytest.mark.parametrize("pattern", ["D", "M"])
def test_mixer_flops_count_the_meta_prefix_once_where_the_mixers_share_it(pattern):
    """DeltaNet and Mamba2 with the meta prefix once per micro-batch (the default) project the prefix once and each
    text's conv window (kernel - 1 = 3 rows) again, and output the prefix once: the formula's matmuls equal the
    counted ones either way, and sharing counts fewer."""
    shared, shared_formula, shared_rows, meta = run_distributed(_counted_matmuls_and_formula, world_size=1,
                                                                args=(pattern, True))[0]
    every, every_formula, every_rows, _ = run_distributed(_counted_matmuls_and_formula, world_size=1,
                                                          args=(pattern, False))[0]
    assert shared_rows == (SEQ + meta / BATCH + 3, SEQ + meta / BATCH) and every_rows == (SEQ + meta, SEQ + meta)
    assert shared < every
    assert (shared, every) == (pytest.approx(shared_formula, rel=1e-9), pytest.approx(every_formula, rel=1e-9))
