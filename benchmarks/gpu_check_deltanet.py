"""GPU check of the DeltaNet layer: accuracy of fla's kernels against the PyTorch path and the fp32 definition, the
layer against fla's own DeltaNet layer, and the speed and memory of DeltaNetMixer at the 1B shape.

Run on one GPU (fla installed; megatron-core; no Transformer Engine needed):

    python benchmarks/gpu_check_deltanet.py            # writes $OUT/deltanet_gpu.json when OUT is set
    python benchmarks/gpu_check_deltanet.py --smoke    # tiny sizes; runs on CPU too (fla parts skipped there)

Accuracy (bf16 inputs; relative error ||a - b|| / ||b||, b the fp32 reference on the same bf16-rounded inputs):
the delta-rule op's fla backend and torch backend against delta_rule_reference, forward (o, final state) and
backward (dq, dk, dv, dbeta, dh0), at B=2 T=1000 H=4 d=128 and for packed documents with initial states; then
DeltaNetMixer (fla kernels) against fla.layers.DeltaNet loaded with the same weights: output, input gradient and
weight gradients. Exits with status 1 when an error exceeds its bound (see TOLERANCE).

On a fresh machine Triton compiles and autotunes fla's kernels for every new shape and variant (varlen, initial
state): this took ~2 minutes per accuracy case on an H100, so give the whole script ~15 minutes, or run it as two
back-to-back commands (``--skip-timing``, then ``--skip-accuracy``; Triton's on-disk cache carries over).

Timing: forward + backward with CUDA events, after warm-up, median of repeats; peak memory is the most allocated
during one step beyond what was allocated before it (activations and gradients, not weights or inputs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flash import runtime  # noqa: E402
from megatron_flash.testing import CheckReport, relative_error, step_times_ms  # noqa: E402

# Bounds on relative error of bf16 paths against the fp32 definition; bf16 rounding alone of o is ~4e-3.
TOLERANCE = {"forward": 2e-2, "backward": 3e-2}

FULL = dict(
    accuracy=dict(batch=2, length=1000, heads=4, head_dim=128, documents=[300, 1, 517, 182]),
    layer=dict(hidden=1024, heads=8, head_dim=128, batch=2, length=1000),
    timing=dict(hidden=2048, heads=16, head_dim=128, batch=8, length=4096),
)
SMOKE = dict(
    accuracy=dict(batch=2, length=70, heads=2, head_dim=16, documents=[29, 1, 40]),
    layer=dict(hidden=64, heads=4, head_dim=16, batch=2, length=70),
    timing=dict(hidden=64, heads=4, head_dim=16, batch=2, length=128),
)


REPORT = CheckReport("deltanet_gpu.json")
log = REPORT.log


def fla_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import fla.layers  # noqa: F401
        import fla.ops.delta_rule  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# accuracy of the op
# --------------------------------------------------------------------------------------------------------------


def op_inputs(batch, length, heads, head_dim, device, documents=None, seed=0):
    """bf16 q, k, v, beta (and fp32 initial states for packed documents), plus the output/state gradients."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k, v = (randn(batch, length, heads, head_dim).bfloat16() for _ in range(3))
    beta = torch.sigmoid(randn(batch, length, heads)).bfloat16()
    h0 = randn(len(documents), heads, head_dim, head_dim) * 0.1 if documents else None
    cu_seqlens = (torch.tensor([0] + documents, device=device).cumsum(0).to(torch.int32) if documents else None)
    grad_o = randn(batch, length, heads, head_dim)
    grad_final = randn(len(documents), heads, head_dim, head_dim) if documents else None
    return dict(q=q, k=k, v=v, beta=beta, h0=h0, cu_seqlens=cu_seqlens, grad_o=grad_o, grad_final=grad_final)


def run_op(fn, inputs, dtype):
    """Forward + backward of one implementation on the given inputs cast to dtype; returns outputs and grads."""
    # fresh leaves per run: .to(dtype) of a tensor already in dtype is the same object, and its .grad would
    # accumulate across implementations
    leaves = {n: inputs[n].detach().clone().to(dtype).requires_grad_() for n in ("q", "k", "v", "beta")}
    if inputs["h0"] is not None:
        leaves["h0"] = inputs["h0"].clone().requires_grad_()
    o, final = fn(leaves)
    loss = (o.float() * inputs["grad_o"]).sum()
    if inputs["grad_final"] is not None:
        loss = loss + (final.float() * inputs["grad_final"]).sum()
    loss.backward()
    result = {"o": o.detach()}
    if final is not None:
        result["final_state"] = final.detach()
    result.update({f"d{n}": leaf.grad for n, leaf in leaves.items()})
    return result


def op_accuracy(case: str, params: dict, device, use_fla: bool) -> list[dict]:
    from megatron_flash.ops.delta_rule import delta_rule, delta_rule_reference, l2norm

    documents = params["documents"] if case == "packed" else None
    batch = 1 if documents else params["batch"]
    length = sum(documents) if documents else params["length"]
    inputs = op_inputs(batch, length, params["heads"], params["head_dim"], device, documents)
    with_state = documents is not None

    def backend(name):
        def fn(x):
            return delta_rule(x["q"], x["k"], x["v"], x["beta"], initial_state=x.get("h0"),
                              output_final_state=with_state, cu_seqlens=inputs["cu_seqlens"], backend=name)
        return fn

    def reference(x):
        return delta_rule_reference(l2norm(x["q"]), l2norm(x["k"]), x["v"], x["beta"], initial_state=x.get("h0"),
                                    output_final_state=with_state, cu_seqlens=inputs["cu_seqlens"])

    results = {"reference": run_op(reference, inputs, torch.float32),
               "torch": run_op(backend("torch"), inputs, torch.bfloat16)}
    if use_fla:
        results["fla"] = run_op(backend("fla"), inputs, torch.bfloat16)
    pairs = [("torch", "reference")] + ([("fla", "reference"), ("fla", "torch")] if use_fla else [])
    rows = []
    for a, b in pairs:
        for tensor in results[b]:
            kind = "forward" if tensor in ("o", "final_state") else "backward"
            err = relative_error(results[a][tensor], results[b][tensor])
            rows.append(dict(check=f"op {case}", compare=f"{a} vs {b}", tensor=tensor, rel_error=err,
                             ok=err < TOLERANCE[kind]))
    log(f"op {case}: " + ", ".join(f"{r['compare']} {r['tensor']} {r['rel_error']:.1e}" for r in rows))
    return rows


# --------------------------------------------------------------------------------------------------------------
# the layer against fla's layer
# --------------------------------------------------------------------------------------------------------------


def make_mixer(hidden, heads, head_dim, backend, device):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_flash.config import make_config
    from megatron_flash.models.specs import mixer_spec

    on_gpu = device.type == "cuda"
    config = make_config(hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=heads,
                         num_query_groups=heads, layer_pattern="D", deltanet_head_dim=head_dim,
                         params_dtype=torch.bfloat16 if on_gpu else torch.float32, bf16=on_gpu,
                         use_cpu_initialization=not on_gpu, delta_rule_backend=backend)
    return build_module(mixer_spec("D"), config=config, layer_number=1)


def layer_accuracy(params: dict, device) -> list[dict]:
    """DeltaNetMixer vs fla.layers.DeltaNet with the same bf16 weights: output, input grad, weight grads."""
    from fla.layers import DeltaNet

    from megatron_flash.layers.base import MixerInputs
    from megatron_flash.layers.deltanet import fla_to_fused_state, fused_to_fla_state

    hidden, heads, head_dim = params["hidden"], params["heads"], params["head_dim"]
    mixer = make_mixer(hidden, heads, head_dim, "fla", device)
    expand = heads * head_dim / hidden
    layer = DeltaNet(hidden_size=hidden, num_heads=heads, expand_k=expand, expand_v=expand).to(device)
    weights = {n: p.detach().float() for n, p in mixer.named_parameters()}
    layer.load_state_dict(fused_to_fla_state(weights, heads))
    layer.to(torch.bfloat16)

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(params["length"], params["batch"], hidden, generator=g).to(device, torch.bfloat16)
    grad_out = torch.randn(x.shape, generator=g).to(device)
    x_ours, x_theirs = x.clone().requires_grad_(), x.transpose(0, 1).contiguous().requires_grad_()
    ours = mixer(x_ours, MixerInputs())
    (ours.float() * grad_out).sum().backward()
    theirs = layer(x_theirs)[0].transpose(0, 1)
    (theirs.float() * grad_out).sum().backward()

    their_grads = fla_to_fused_state({n: p.grad for n, p in layer.named_parameters()})
    compared = {"output": (ours, theirs), "d_input": (x_ours.grad, x_theirs.grad.transpose(0, 1))}
    compared.update({f"d_{n}": (p.grad, their_grads[n]) for n, p in mixer.named_parameters()})
    rows = []
    for tensor, (a, b) in compared.items():
        err = relative_error(a, b)
        kind = "forward" if tensor == "output" else "backward"
        rows.append(dict(check="layer", compare="DeltaNetMixer vs fla DeltaNet", tensor=tensor, rel_error=err,
                         ok=err < TOLERANCE[kind]))
    log("layer: " + ", ".join(f"{r['tensor']} {r['rel_error']:.1e}" for r in rows))
    return rows


# --------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------


def time_step(step, device, warmup: int, repeats: int) -> dict:
    """Median milliseconds of step() (forward + backward) and its peak extra memory."""
    on_gpu = device.type == "cuda"
    for _ in range(warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = step_times_ms(step, 0, repeats, cuda=on_gpu)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if on_gpu else None
    return dict(ms=statistics.median(times), ms_min=min(times), peak_gib=peak, repeats=repeats)


def mixer_step(mixer, x, grad_out, inputs):
    def step():
        mixer.zero_grad(set_to_none=True)
        x.grad = None
        out = mixer(x, inputs)
        out.backward(grad_out)
    return step


def timings(params: dict, device, use_fla: bool, warmup: int, repeats: int) -> list[dict]:
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_flash.layers.base import MixerInputs
    from megatron_flash.ops.delta_rule import delta_rule

    hidden, heads, head_dim = params["hidden"], params["heads"], params["head_dim"]
    batch, length = params["batch"], params["length"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = f"B{batch} T{length} H{heads} d{head_dim}"
    rows = REPORT.rows("timing")  # saved at every row: a call cut short keeps what was timed

    def record(name, step, n_repeats=repeats, n_warmup=warmup):
        log(f"timing {name} ...")
        result = time_step(step, device, n_warmup, n_repeats)
        tokens = batch * length
        rows.append(dict(name=name, shape=shape, tokens_per_s=tokens / result["ms"] * 1e3, **result))
        log(f"  {result['ms']:.2f} ms, peak {result['peak_gib']} GiB")

    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(length, batch, hidden, generator=g).to(device, dtype).requires_grad_()
    grad_out = torch.randn(length, batch, hidden, generator=g).to(device, dtype)

    def packed_case(mixer, backend):
        # the same tokens as one packed row of documents of varied length (every document restarts)
        g_docs = torch.Generator(device="cpu").manual_seed(3)
        total = batch * length
        cuts = torch.randperm(total - 1, generator=g_docs)[: 4 * batch - 1].add(1).sort().values
        cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(device, torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=int(cu.diff().max()), max_seqlen_kv=int(cu.diff().max()))
        x_packed = x.detach().transpose(0, 1).reshape(total, 1, hidden).clone().requires_grad_()
        record(f"DeltaNetMixer fwd+bwd packed {len(cu) - 1} docs ({backend})",
               mixer_step(mixer, x_packed, grad_out.transpose(0, 1).reshape(total, 1, hidden),
                          MixerInputs(packed_seq_params=packed)))

    if use_fla:
        mixer = make_mixer(hidden, heads, head_dim, "fla", device)
        record("DeltaNetMixer fwd+bwd (fla)", mixer_step(mixer, x, grad_out, MixerInputs()))
        packed_case(mixer, "fla")
        del mixer

        # the kernel alone (what the layer adds around it is projections, convs, norm, layout copies)
        qkv = [torch.randn(batch, length, heads, head_dim, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3)]
        beta = torch.rand(batch, length, heads, generator=g).to(device, dtype).requires_grad_()
        grad_o = torch.randn(batch, length, heads, head_dim, generator=g).to(device, dtype)

        def op_step():
            for t in qkv + [beta]:
                t.grad = None
            o, _ = delta_rule(*qkv, beta, backend="fla")
            o.backward(grad_o)
        record("delta_rule op fwd+bwd (fla chunk, l2norm in kernel)", op_step)
        del qkv, beta, grad_o

        # the peer: fla's own DeltaNet layer at the same shape
        from fla.layers import DeltaNet

        expand = heads * head_dim / hidden
        layer = DeltaNet(hidden_size=hidden, num_heads=heads, expand_k=expand, expand_v=expand).to(device, dtype)
        x_bt = x.detach().transpose(0, 1).contiguous().requires_grad_()
        grad_bt = grad_out.transpose(0, 1).contiguous()

        def fla_layer_step():
            layer.zero_grad(set_to_none=True)
            x_bt.grad = None
            layer(x_bt)[0].backward(grad_bt)
        record("fla.layers.DeltaNet fwd+bwd", fla_layer_step)
        del layer, x_bt, grad_bt

    # the PyTorch path: slow at the full shape on GPU, a few repeats give its order of magnitude
    mixer = make_mixer(hidden, heads, head_dim, "torch", device)
    on_gpu = device.type == "cuda"
    record("DeltaNetMixer fwd+bwd (torch)", mixer_step(mixer, x, grad_out, MixerInputs()),
           n_repeats=3 if on_gpu else repeats, n_warmup=1 if on_gpu else warmup)
    if not use_fla:
        packed_case(mixer, "torch")
    return rows


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def print_tables(accuracy: list[dict], timing: list[dict]) -> None:
    print("\nAccuracy (relative error ||a-b||/||b||)")
    print(f"{'check':<12} {'compare':<32} {'tensor':<22} {'rel_error':>10}  ok")
    for r in accuracy:
        print(f"{r['check']:<12} {r['compare']:<32} {r['tensor']:<22} {r['rel_error']:>10.2e}  "
              f"{'yes' if r['ok'] else 'NO'}")
    print("\nTiming (forward + backward)")
    print(f"{'what':<56} {'shape':<24} {'median ms':>10} {'min ms':>8} {'tokens/s':>12} {'peak GiB':>9}")
    for r in timing:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['name']:<56} {r['shape']:<24} {r['ms']:>10.2f} {r['ms_min']:>8.2f} {r['tokens_per_s']:>12.0f} "
              f"{peak:>9}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU (fla parts skipped there)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--accuracy-cases", default="unpacked,packed,layer",
                        help="which accuracy checks to run (comma-separated; each autotunes its own kernels)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL

    environ = dict(os.environ)
    environ.setdefault("MASTER_PORT", str(runtime.free_port()))
    runtime.initialize(tensor_model_parallel_size=1, environ=environ)
    device = runtime.device()
    use_fla = fla_available(device)
    if not use_fla:
        print(f"fla kernels unavailable on {device}: checking the torch backend against the reference only")
    if device.type != "cuda" and not args.smoke:
        print("no GPU: use --smoke for a CPU run")
        return 2

    REPORT.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", smoke=args.smoke,
                   torch=torch.__version__, fla=use_fla, tolerance=TOLERANCE, accuracy=[], timing=[])
    accuracy, timing = [], []
    if not args.skip_accuracy:
        log("accuracy ...")
        cases = args.accuracy_cases.split(",")
        for case in ("unpacked", "packed"):
            if case in cases:
                accuracy += op_accuracy(case, sizes["accuracy"], device, use_fla)
        if use_fla and "layer" in cases:
            accuracy += layer_accuracy(sizes["layer"], device)
        REPORT["accuracy"] = accuracy
        REPORT.save()
    if not args.skip_timing:
        log("timing ...")
        timing = timings(sizes["timing"], device, use_fla, args.warmup, 2 if args.smoke else args.repeats)

    print_tables(accuracy, timing)
    code = REPORT.finish(all(r["ok"] for r in accuracy), "accuracy checks")
    runtime.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
