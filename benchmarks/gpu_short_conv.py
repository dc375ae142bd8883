"""The short conv (ops/short_conv.py) at the 1B training shapes, forward + backward per backend, inputs laid out
as the layers hand them over: DeltaNet's q/k/v and Mamba2's x are slices of channels of the [s, b, ...]
projection, transposed to [B, T, C] (the ``triton`` backend reads them in place; ``fla`` copies them), Mamba2's B/C
the transpose of a [s, b, 2N] projection. Times are the conv's forward and backward alone (see ``run_case``).
Every backend's output and gradients are compared with the ``torch`` backend's on the same inputs.

    python benchmarks/gpu_short_conv.py [--backends triton,fla,torch] [--tiles 64x128:64x64x8,...] [--batch B]
        [--out DIR] [--smoke]

``--tiles``: the triton backend again with other tiles per program, forward:backward, each tokens x channels
[x warps] (warps default to the kernels' own, ``short_conv_triton.FWD_TILE`` / ``BWD_TILE``).

Shapes: micro-batch 4 (``--batch``) x (4096 + 256 meta tokens), bf16; ``--smoke``: tiny sizes on the CPU (the
``torch`` backend only), to check the script. A backend or tile that fails (a kernel that does not compile) gets
its error in its row, and the other rows still run. Results: DIR/short_conv.json (DIR defaults to $OUT, else the
current folder).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from megatron_flash.ops import short_conv_triton
from megatron_flash.ops.short_conv import causal_conv1d
from megatron_flash.testing import median_ms, relative_error

K = 4
FULL = dict(batch=4, seq=4352, warmup=3, iters=10, cases={
    # name: (first channel read, channels read, row width of the projection): the 1B's layers
    "deltanet_qkv": (0, 3 * 2048, 3 * 2048 + 16),
    "mamba2_x": (4096, 4096, 2 * 4096 + 64),
    "mamba2_bc": (0, 256, 256),
})
SMOKE = dict(batch=2, seq=40, warmup=1, iters=2, cases={"deltanet_qkv": (0, 24, 26), "mamba2_x": (8, 8, 18)})


def case_inputs(batch, seq, first, channels, row, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(seq, batch, row, generator=gen).to(device, torch.bfloat16)
    weight = (torch.randn(channels, K, generator=gen) / K).to(device, torch.bfloat16)
    bias = torch.randn(channels, generator=gen).to(device, torch.bfloat16)
    dy = torch.randn(batch, seq, channels, generator=gen).to(device, torch.bfloat16)
    return projection, weight, bias, dy


def run_case(backend, projection, weight, bias, dy, first):
    """y and the gradients of the conv's input (the layers' strided view of the projection), weight and bias.

    The gradients are taken at that view (``torch.autograd.grad``), so the time is the conv's forward and backward
    alone: a slice's backward would also zero-fill and copy the whole projection's gradient, which the layers (a
    ``split``, whose backward is one ``cat`` they pay anyway) do not, and which diluted kernel differences."""
    p, w, b = (t.detach().requires_grad_() for t in (projection, weight, bias))
    x = p[..., first:first + w.shape[0]].transpose(0, 1)
    y, _ = causal_conv1d(x, w, b, activation="silu", backend=backend)
    return [y.detach(), *torch.autograd.grad(y, (x, w, b), dy)]


def parse_tiles(spec: str) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """``"64x128:64x64x8,..."`` -> [((64, 128, fwd warps), (64, 64, 8)), ...]: (tokens, channels, warps) forward
    and backward; a tile without warps keeps the kernels' default for that direction."""
    defaults = short_conv_triton.FWD_TILE, short_conv_triton.BWD_TILE
    runs = []
    for run in filter(None, spec.split(",")):
        parts = run.split(":")
        if len(parts) != 2:
            raise ValueError(f"--tiles {run!r}: expected forward:backward, e.g. 64x128:64x64x8")
        pair = []
        for part, default in zip(parts, defaults):
            numbers = [int(n) for n in part.split("x")]
            if len(numbers) not in (2, 3):
                raise ValueError(f"--tiles {run!r}: {part!r} is not tokens x channels [x warps]")
            pair.append(tuple(numbers) if len(numbers) == 3 else (*numbers, default[2]))
        runs.append(tuple(pair))
    return runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=None, help="comma-separated (default: triton,fla,torch on a GPU)")
    parser.add_argument("--tiles", default="", help="e.g. 32x128:32x64,64x64x8:64x128x8 (forward:backward, tokens x "
                                                    "channels [x warps])")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--batch", type=int, default=None, help=f"micro-batch (default {FULL['batch']})")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.batch is not None:
        cfg["batch"] = args.batch
    device = "cpu" if args.smoke else "cuda"
    backends = (args.backends or ("torch" if args.smoke else "triton,fla,torch")).split(",")
    tiles = parse_tiles(args.tiles)
    runs = [(backend, None) for backend in backends] + [("triton", tile) for tile in tiles]
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "batch": cfg["batch"], "seq": cfg["seq"], "dtype": "bfloat16", "cases": {}}
    default_tiles = short_conv_triton.FWD_TILE, short_conv_triton.BWD_TILE
    for name, (first, channels, row) in cfg["cases"].items():
        inputs = case_inputs(cfg["batch"], cfg["seq"], first, channels, row, device)
        want = run_case("torch", *inputs, first)
        rows = {}
        for backend, tile in runs:
            label = backend if tile is None else f"triton_{'_'.join('x'.join(map(str, t)) for t in tile)}"
            if tile is not None:
                short_conv_triton.FWD_TILE, short_conv_triton.BWD_TILE = tile
            try:
                got = run_case(backend, *inputs, first)
                rows[label] = {
                    "fwd_bwd_ms": round(median_ms(lambda: run_case(backend, *inputs, first), cfg["warmup"],
                                                  cfg["iters"]), 3),
                    **{f"rel_diff_{key}": relative_error(g, r)
                       for key, g, r in zip(("y", "dx", "dweight", "dbias"), got, want, strict=True)}}
            except Exception as exc:  # noqa: BLE001 - a tile that fails to compile must not lose the other rows
                rows[label] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(f"{name:14s} {label:7s} {rows[label]}", flush=True)
        short_conv_triton.FWD_TILE, short_conv_triton.BWD_TILE = default_tiles
        results["cases"][name] = rows
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "short_conv.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
