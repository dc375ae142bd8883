"""Mixers that run the meta prefix once (``config.share_meta_prefix_in_mixers``, layers/shared_prefix.py): with
the same prefix rows in every column, the output, the input gradient and every parameter gradient equal the full
computation's; at TP 1 and 2."""

import pytest
import torch

from megatron_flash.testing import init_layout_invariant, run_distributed

from tests.test_deltanet_layer import HIDDEN, KERNEL, _config, _forward_backward_inputs, _mixer

SEQ, BATCH, PREFIX = 37, 3, 6


def _inputs():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    x[:PREFIX] = x[:PREFIX, :1]  # the meta rows: the same in every column
    return x, torch.randn(SEQ, BATCH, HIDDEN, generator=g)


def _run(share: bool):
    from megatron_flash.layers.base import MixerInputs

    mixer = _mixer(_config(share_meta_prefix_in_mixers=share))
    init_layout_invariant(mixer)
    x, out_weights = _inputs()
    return _forward_backward_inputs(mixer, x, out_weights, MixerInputs(shared_prefix=PREFIX))


def _both():
    return _run(False), _run(True)


@pytest.mark.parametrize("tp", [1, 2])
def test_deltanet_runs_the_prefix_once_with_the_same_results(tp):
    full, shared = run_distributed(_both, world_size=tp, tensor_model_parallel_size=tp)[0]
    torch.testing.assert_close(shared["out"], full["out"], rtol=1e-5, atol=1e-6)
    # the prefix rows' gradient: what reaches the meta tokens is its sum over the columns; only the last
    # KERNEL - 1 rows (the text's conv window) get any in the other columns
    torch.testing.assert_close(shared["x_grad"][PREFIX:], full["x_grad"][PREFIX:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared["x_grad"][:PREFIX].sum(1), full["x_grad"][:PREFIX].sum(1), rtol=1e-5,
                               atol=1e-6)
    assert not shared["x_grad"][:PREFIX - KERNEL + 1, 1:].any()
    for name, grad in full["grads"].items():
        torch.testing.assert_close(shared["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)
