"""The residual stream's add and the next norm at the 1B training shape, forward + backward: fused
(ops/rms_norm.add_rms_norm, what HybridStack runs) against the add and the compiled norm apart (what ran before it,
with autograd summing the sum's two gradients in its own pass). Values and gradients are compared with the fp32
eager definition on the same inputs.

    python benchmarks/gpu_add_rms_norm.py [--out DIR] [--smoke]

Shape: micro-batch 16 x (4096 + 256 meta tokens) x hidden 2048, bf16, one call per layer of the 1B model (24 per
step). ``--smoke``: tiny sizes on the CPU (eager), to check the script. Results: DIR/add_rms_norm.json (DIR defaults
to $OUT, else the current folder).
"""

from __future__ import annotations

import torch

from megatron_flash.ops.rms_norm import add_rms_norm, rms_norm
from megatron_flash.testing import kernel_benchmark_arguments, time_and_compare, write_json

FULL = dict(tokens=16 * 4352, hidden=2048, warmup=3, iters=20, device="cuda")
SMOKE = dict(tokens=40, hidden=24, warmup=1, iters=2, device="cpu")
EPS = 1e-5


def separate(x, delta, weight):
    total = x + delta
    return total, rms_norm(total, weight, EPS)


def fused(x, delta, weight):
    return add_rms_norm(x, delta, weight, EPS)


def definition(x, delta, weight):
    """fp32 eager, the sum rounded to the inputs' dtype first as both variants do."""
    total = (x + delta).to(x.dtype).float()
    return total, total * torch.rsqrt(total.square().mean(-1, keepdim=True) + EPS) * weight.float()


def inputs(cfg, seed=0):
    """x, delta [tokens, hidden] and weight [hidden] in bf16; a cotangent for each result."""
    gen = torch.Generator().manual_seed(seed)
    n, h = cfg["tokens"], cfg["hidden"]
    to = dict(device=cfg["device"], dtype=torch.bfloat16)
    x, delta = (torch.randn(n, h, generator=gen).to(**to) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(h, generator=gen)).to(**to)
    return [x, delta, weight], [torch.randn(n, h, generator=gen).to(**to) for _ in range(2)]


def run(fn, tensors, cotangents):
    """Both results, then the gradients of x, delta and the weight."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    results = fn(*leaves)
    torch.autograd.backward(results, [c.to(r.dtype) for c, r in zip(cotangents, results)])
    return [r.detach() for r in results] + [t.grad for t in leaves]


def main(argv=None) -> dict:
    args = kernel_benchmark_arguments(__doc__.split("\n\n")[0], argv)
    cfg = SMOKE if args.smoke else FULL
    tensors, cotangents = inputs(cfg)
    want = run(definition, tensors, cotangents)
    results = {"device": torch.cuda.get_device_name() if cfg["device"] == "cuda" else "cpu", "torch": torch.__version__,
               "shape": [cfg["tokens"], cfg["hidden"]], "dtype": "bfloat16",
               "variants": time_and_compare({"separate": separate, "fused": fused},
                                            lambda fn: run(fn, tensors, cotangents), want,
                                            ("sum", "normed", "dx", "ddelta", "dweight"), cfg["warmup"], cfg["iters"])}
    return write_json(args.out, "add_rms_norm.json", results)


if __name__ == "__main__":
    main()
