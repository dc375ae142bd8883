"""torch.compile for the ops: elementwise chains fused on GPUs, one Triton kernel in place of a dozen eager passes.

A norm in fp32 over bf16 activations is ~10 eager kernels forward and backward, each a full pass over memory; the
compiled function reads and writes each tensor once. The eager function stays the definition: it is what runs on
the CPU, where megatron_flash.runtime disables dynamo (compiling there costs seconds per function and gains nothing).
"""

from __future__ import annotations

import functools

import torch


def dynamo_enabled() -> bool:
    """False where dynamo is off (megatron_flash.runtime's CPU support); torch.compile(fullgraph=True) then refuses
    to run, so callers use the eager function."""
    return not torch._dynamo.config.disable


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """``torch.compile(fn, fullgraph=True)``, built once per function. dynamic=None: the first shape compiles
    static, a second one recompiles once with dynamic sizes."""
    return torch.compile(fn, fullgraph=True)


def compiled_on_cuda(fn):
    """``fn`` compiled when its first tensor argument is on a CUDA device and dynamo is enabled; ``fn`` itself
    otherwise."""

    @functools.wraps(fn)
    def dispatch(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        return (compiled(fn) if first.is_cuda and dynamo_enabled() else fn)(*args, **kwargs)

    return dispatch
