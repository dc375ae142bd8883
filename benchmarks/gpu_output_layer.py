"""The fused output layer + cross-entropy (ops/linear_cross_entropy.py) at the 1B training shape: forward +
backward time and peak memory, kept softmax - onehot against ``recompute_logits``, and, against another version of
the op, the same on the same inputs with the differences.

    python benchmarks/gpu_output_layer.py [--baseline FILE.py] [--out DIR] [--smoke]

``--baseline``: a file holding another version of the op, e.g. the previous commit's
(``git show HEAD~1:megatron_flash/ops/linear_cross_entropy.py > /tmp/lce_previous.py``). Shapes: 16384 tokens (the
1B's micro-batch 4 x 4096), hidden 2048, bf16, the 131072-token vocabulary as is (131072 rows) and as mock-data runs
see it (NullTokenizer adds an end-of-document token: 131073 real rows, padded to 131200). ``--smoke``: tiny sizes
on the CPU, to check the script. Results: DIR/output_layer.json (DIR defaults to $OUT, else the current folder).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import time

import torch

from megatron_flash.ops import linear_cross_entropy as this_version
from megatron_flash.testing import median_ms, relative_error

FULL = dict(tokens=16384, hidden=2048, cases=((131072, 131072), (131073, 131200)), warmup=3, iters=5)
SMOKE = dict(tokens=96, hidden=32, cases=((200, 200), (201, 256)), warmup=1, iters=2)


def load_op(path: str):
    spec = importlib.util.spec_from_file_location("baseline_linear_cross_entropy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.linear_cross_entropy


def time_op(fn, hidden, weight, labels, vocab_size, warmup, iters):
    """Median forward + backward ms, the first call's seconds (compilation included), the peak GiB allocated above
    the inputs (NaN on CPU), and the last run's loss and gradients."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    last = {}

    def step():
        h.grad = w.grad = None
        loss = fn(h, w, labels, vocab_size)
        loss.mean().backward()
        last["loss"] = loss.detach()

    on_gpu = hidden.is_cuda
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    if on_gpu:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if on_gpu else float("nan")
    ms = median_ms(step, warmup - 1, iters)
    return ms, first_s, peak, last["loss"], h.grad, w.grad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="file with another version of ops/linear_cross_entropy.py to compare against")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    args = p.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16
    baseline = load_op(args.baseline) if args.baseline else None
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "tokens": cfg["tokens"], "hidden": cfg["hidden"],
               "baseline": args.baseline}
    gen = torch.Generator().manual_seed(0)
    for vocab_size, rows in cfg["cases"]:
        hidden = (0.5 * torch.randn(cfg["tokens"], cfg["hidden"], generator=gen)).to(device, dtype)
        weight = (0.02 * torch.randn(rows, cfg["hidden"], generator=gen)).to(device, dtype)
        labels = torch.randint(0, vocab_size, (cfg["tokens"],), generator=gen).to(device)
        ms, first_s, peak, loss, dh, dw = time_op(this_version.linear_cross_entropy, hidden, weight, labels,
                                                  vocab_size, cfg["warmup"], cfg["iters"])
        row = {"fwd_bwd_ms": ms, "first_call_s": first_s, "peak_gib": peak,
               "padding_rows_grad_zero": bool((dw[vocab_size:] == 0).all())}
        recompute = functools.partial(this_version.linear_cross_entropy, recompute_logits=True)
        re_ms, _, re_peak, re_loss, re_dh, re_dw = time_op(recompute, hidden, weight, labels, vocab_size,
                                                           cfg["warmup"], cfg["iters"])
        row.update(recompute_fwd_bwd_ms=re_ms, recompute_peak_gib=re_peak,
                   recompute_rel_diff_loss=relative_error(re_loss, loss),
                   recompute_rel_diff_dhidden=relative_error(re_dh, dh),
                   recompute_rel_diff_dweight=relative_error(re_dw, dw))
        if baseline is not None:
            base_ms, base_first_s, _, base_loss, base_dh, base_dw = time_op(baseline, hidden, weight, labels,
                                                                            vocab_size, cfg["warmup"], cfg["iters"])
            row.update(baseline_fwd_bwd_ms=base_ms, baseline_first_call_s=base_first_s,
                       rel_diff_loss=relative_error(loss, base_loss), rel_diff_dhidden=relative_error(dh, base_dh),
                       rel_diff_dweight=relative_error(dw, base_dw))
        results[f"vocab_{vocab_size}_rows_{rows}"] = row
        print(json.dumps({f"vocab_{vocab_size}_rows_{rows}": row}), flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "output_layer.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
