"""Elementwise chains fused by ``torch.compile`` on GPUs: one Triton kernel in place of a dozen eager passes.

A norm in fp32 over bf16 activations is ~10 eager kernels forward and backward, each a full pass over memory; the
compiled function reads and writes each tensor once. The eager function stays the definition: it is what runs on
the CPU, where megatron_flash.runtime disables dynamo (compiling there costs seconds per function and gains nothing),
and it is what the GPU tests compare the compiled kernels with.
"""

from __future__ import annotations

import functools

import torch


def compiled_on_cuda(fn):
    """``fn`` under ``torch.compile(fullgraph=True)`` when its first tensor argument is on a CUDA device and dynamo
    is enabled; ``fn`` itself otherwise. Compiled on first use."""

    @functools.lru_cache(maxsize=None)
    def compiled():
        return torch.compile(fn, fullgraph=True)

    @functools.wraps(fn)
    def dispatch(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        if first.is_cuda and not torch._dynamo.config.disable:
            return compiled()(*args, **kwargs)
        return fn(*args, **kwargs)

    dispatch.eager = fn
    return dispatch
