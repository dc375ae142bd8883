"""Mamba2's gated RMSNorm (ops/rms_norm.gated_rms_norm) at the 1B training shape, forward + backward: our Triton
kernels against the reference compiled by torch.compile (what ran on GPUs before them), inputs laid out as the layer
hands them over: y the [s, b] view of the scan's [b, s, H, P] output, z a slice of the [s, b, 2 * inner + H]
projection. Values and gradients are compared with the fp32 eager reference on the same inputs.

    python benchmarks/gpu_gated_rms_norm.py [--out DIR] [--smoke]

Shape: micro-batch 4 x (4096 + 256 meta tokens), 64 heads of 64 (one group of 4096), bf16. ``--smoke``: tiny sizes
on the CPU (the eager reference only), to check the script. Results: DIR/gated_rms_norm.json (DIR defaults to $OUT,
else the current folder).
"""

from __future__ import annotations

import torch

from megatron_flash.ops.rms_norm import gated_rms_norm, gated_rms_norm_reference
from megatron_flash.testing import kernel_benchmark_arguments, time_and_compare, write_json

FULL = dict(batch=4, seq=4352, heads=64, head_dim=64, warmup=3, iters=10, device="cuda")
SMOKE = dict(batch=2, seq=40, heads=3, head_dim=8, warmup=1, iters=2, device="cpu")


def layer_inputs(cfg, seed=0):
    """y [s, b, H, P] (a transposed view), z [s, b, H, P] (a slice), weight [H * P], cotangent [s, b, H * P]."""
    gen = torch.Generator().manual_seed(seed)
    b, s, h, p = cfg["batch"], cfg["seq"], cfg["heads"], cfg["head_dim"]
    to = dict(device=cfg["device"], dtype=torch.bfloat16)
    scan_out = torch.randn(b, s, h, p, generator=gen).to(**to)
    projection = torch.randn(s, b, 2 * h * p + h, generator=gen).to(**to)
    weight = (1 + 0.1 * torch.randn(h * p, generator=gen)).to(**to)
    cotangent = torch.randn(s, b, h * p, generator=gen).to(**to)
    return scan_out, projection, weight, cotangent


def run(norm, scan_out, projection, weight, cotangent):
    """out and the gradients of the scan output, the projection and the weight."""
    leaves = [t.detach().requires_grad_() for t in (scan_out, projection, weight)]
    s_out, proj, w = leaves
    h, p = s_out.shape[2:]
    out = norm(s_out.transpose(0, 1), proj[..., :h * p].unflatten(-1, (h, p)), w, h * p, 1e-5)
    out.backward(cotangent)
    return [out.detach()] + [t.grad for t in leaves]


def main(argv=None) -> dict:
    args = kernel_benchmark_arguments(__doc__.split("\n\n")[0], argv)
    cfg = SMOKE if args.smoke else FULL
    inputs = layer_inputs(cfg)
    wide = [t.float() for t in inputs]
    want = run(gated_rms_norm_reference, *wide)
    variants = {"reference": gated_rms_norm_reference}
    if not args.smoke:
        variants = {"triton": gated_rms_norm, "compiled": torch.compile(gated_rms_norm_reference, fullgraph=True)}
    results = {"device": torch.cuda.get_device_name() if cfg["device"] == "cuda" else "cpu", "torch": torch.__version__,
               "shape": [cfg["seq"], cfg["batch"], cfg["heads"], cfg["head_dim"]], "dtype": "bfloat16",
               "variants": time_and_compare(variants, lambda norm: run(norm, *inputs), want,
                                            ("out", "dy", "dprojection", "dweight"), cfg["warmup"], cfg["iters"])}
    return write_json(args.out, "gated_rms_norm.json", results)


if __name__ == "__main__":
    main()
