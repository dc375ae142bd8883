"""GPU check of softmax attention in bf16: the SDPA core attention and the whole AttentionMixer against a plain fp32
masked-softmax reference, forward and backward, for full causal, sliding-window and packed-document masks.

Run on one GPU (megatron-core; no flash-attn package or Transformer Engine needed: SDPA picks its own kernel):

    python benchmarks/gpu_check_attention.py            # writes $OUT/attention_gpu.json when OUT is set
    python benchmarks/gpu_check_attention.py --smoke    # tiny sizes; runs on CPU too

Every case runs at the 1B attention shape (16 query / 4 KV heads of 128), B=2, T=1000 (not a multiple of any kernel
block size), under four masks: ``full`` (causal), ``window`` (causal, sliding window 257: an 'S' layer),
``packed`` (one row of documents of lengths 1, 300, 129, 517, 53 as cu_seqlens: the "thd" layout of packed rows)
and ``packed_window`` (both). Relative error ||a - b|| / ||b||, b the fp32 reference on the same bf16-rounded
values (inputs and upstream gradient alike):

1. core attention (``SDPAttention``, what every attention layer calls) on bf16 q, k, v: output, dq, dk, dv against
   :func:`masked_softmax_attention`, a plain fp32 softmax(q k^T / sqrt(d)) v that builds its mask from positions
   and computes every document alone (no code shared with SDPAttention's mask). The same comparison on fp32 inputs
   checks the definition (mask, window edge, document boundaries, GQA head mapping) at fp32 rounding, where a
   difference shows even when it is smaller than bf16 noise.
2. the whole ``AttentionMixer`` (megatron SelfAttention: QKV projection, RoPE, core attention, output projection,
   built from the repo's spec), bf16 weights and activations on the GPU, against the same layer with the same
   weights in fp32 whose core attention is the reference above (``mixer_spec`` with the core swapped). So the
   reference side runs no SDPA kernel at all, while projections and RoPE stay megatron's own code: the bf16 row is
   the precision of the layer's whole bf16 path, the fp32 row (fp32 layer with SDPA) checks the layer's wiring of
   the core (its window taken from the layer pattern, the batch-less "thd" tensors of a packed row). Compared:
   output, input gradient, weight gradients. (RoPE itself, the same megatron code on both sides, is checked against
   an independent implementation by tests/test_convert.py and tests/test_hf_modeling.py.)

The SDPA backend each call dispatched to (flash, memory-efficient, cuDNN, math) is recorded next to its rows: it is
asked of torch's dispatcher (``torch._fused_sdp_choice``, which SDPA itself consults) with the exact arguments of
the call. Exits with status 1 when an error exceeds its bound (see TOLERANCE).

No Triton, no autotuning: the checks themselves should take seconds on an H200; start-up (imports, CUDA context)
dominates.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402

from megatron_flash import runtime  # noqa: E402
from megatron_flash.layers.attention import window_of  # noqa: E402
from megatron_flash.testing import CheckReport, relative_error  # noqa: E402

# Bounds on relative error against the fp32 reference. One bf16 rounding of a Gaussian tensor is ~1.7e-3; a bf16
# path stacks a few (the output, the probabilities fed to the PV product in flash kernels, the projections and RoPE
# in the layer), and backward adds the cancellation in dS = P * (dP - rowsum(dO * O)). At the full shape torch's CPU
# bf16 kernels give: core output 2.0e-3, dq/dk/dv <= 5.4e-3; layer output 4.3e-3, gradients <= 6.9e-3. The bounds
# leave 2-3x headroom over those for the GPU kernels' own rounding, and stay below what a mask error costs at the
# full shape: a window edge off by one key gives ~4e-2, a document boundary off by one token ~2e-1
# (tests/test_gpu_check_attention.py). fp32 paths sit at ~1e-7..1e-6 (full fp32 matmuls, or 3xTF32 in the GPU's
# memory-efficient kernel): 1e-4 is where any definition difference would show.
TOLERANCE = {"bf16 forward": 1e-2, "bf16 backward": 2e-2, "fp32": 1e-4}

# mask cases: the layer-pattern character (A full, S sliding window) and whether the row holds packed documents
CASES = {"full": ("A", False), "window": ("S", False), "packed": ("A", True), "packed_window": ("S", True)}
CHECKS = ("core", "layer")

FULL = dict(heads=16, kv_heads=4, head_dim=128, batch=2, length=1000, window=257, documents=[1, 300, 129, 517, 53])
SMOKE = dict(heads=4, kv_heads=2, head_dim=16, batch=2, length=70, window=9, documents=[1, 30, 13, 26])

REPORT = CheckReport("attention_gpu.json")
log = REPORT.log


# --------------------------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------------------------


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int] = None,
                             cu_seqlens: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None) -> torch.Tensor:
    """q [s, b, hq, d], k/v [s, b, hkv, d] -> [s, b, hq, d]: softmax(scale * q k^T) v with query head h reading KV
    head h // (hq / hkv); query i sees key j iff j <= i and i - j < window. With ``cu_seqlens`` every document
    [cu[n], cu[n + 1]) is computed alone (its own positions from 0)."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        return torch.cat([masked_softmax_attention(q[a:b], k[a:b], v[a:b], window, scale=scale)
                          for a, b in zip(bounds[:-1], bounds[1:])])
    length, head_dim = q.shape[0], q.shape[-1]
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    scores = torch.einsum("ibhd,jbhd->bhij", q, k) * (scale if scale is not None else 1 / math.sqrt(head_dim))
    i = torch.arange(length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhij,jbhd->ibhd", probs, v)


class MaskedSoftmaxAttention(MegatronModule):
    """:func:`masked_softmax_attention` as a core attention: SDPAttention's constructor and call, for the spec."""

    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal, attention_type="self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if (config.attention_dropout if attention_dropout is None else attention_dropout) != 0.0:
            raise ValueError("the reference core attention has no dropout: set attention_dropout=0")
        self.window = window_of(config, layer_number)
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("the reference core attention builds its own mask: attention_mask/bias must be None")
        packed = query.dim() == 3  # "thd": [t, heads, d], no batch dimension
        if packed:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        ctx = masked_softmax_attention(query, key, value, self.window, cu, self.softmax_scale)
        ctx = ctx.reshape(ctx.shape[0], ctx.shape[1], -1)
        return ctx.squeeze(1) if packed else ctx


# --------------------------------------------------------------------------------------------------------------
# which SDPA kernel ran
# --------------------------------------------------------------------------------------------------------------


class SDPABackendRecorder(TorchFunctionMode):
    """Records the backend torch's dispatcher picks for each scaled_dot_product_attention call inside it."""

    def __init__(self):
        super().__init__()
        self.backends: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            try:
                self.backends.append(SDPBackend(torch._fused_sdp_choice(*args, **kwargs)).name.lower())
            except (RuntimeError, TypeError, ValueError) as exc:  # a private API: its loss must not stop the check
                self.backends.append(f"unknown ({type(exc).__name__})")
        return func(*args, **kwargs)

    def summary(self) -> str:
        return ",".join(sorted(set(self.backends))) or "none"


# --------------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------------


def attention_config(case: str, params: dict, dtype: torch.dtype, device, window: Optional[int] = None):
    """The config of one attention layer (layer 1) of the case's kind: hidden = heads x head_dim, as in the 1B.
    ``window`` replaces the case's sliding window (the tests build deliberately wrong cores with it)."""
    from megatron_flash.config import make_config

    char, _ = CASES[case]
    hidden = params["heads"] * params["head_dim"]
    return make_config(hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=params["heads"],
                       num_query_groups=params["kv_heads"], layer_pattern=char,
                       sliding_window=(window or params["window"]) if char == "S" else None,
                       params_dtype=dtype, bf16=dtype == torch.bfloat16,
                       use_cpu_initialization=device.type != "cuda")


def packed_seq_params(case: str, params: dict, device) -> Optional[PackedSeqParams]:
    if not CASES[case][1]:
        return None
    lengths = torch.tensor(params["documents"])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device, torch.int32)
    longest = int(lengths.max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def length_and_batch(case: str, params: dict) -> tuple[int, int]:
    """(sequence length, batch): a packed case is one row holding the documents."""
    if CASES[case][1]:
        return sum(params["documents"]), 1
    return params["length"], params["batch"]


def bf16_values(*shape, generator, device) -> torch.Tensor:
    """fp32 tensor of standard-normal values rounded to bf16: both precisions then see exactly the same numbers."""
    return torch.randn(*shape, generator=generator).bfloat16().float().to(device)


def compare(rows: list, check: str, path: str, backend: str, got: dict, want: dict, output: str) -> None:
    """One row per tensor of ``want``; ``output`` names the forward result (the rest are gradients)."""
    for tensor in want:
        err = relative_error(got[tensor], want[tensor])
        bound = TOLERANCE["fp32" if path == "fp32" else "bf16 forward" if tensor == output else "bf16 backward"]
        rows.append(dict(check=check, path=path, backend=backend, tensor=tensor, rel_error=err, bound=bound,
                         ok=err < bound))


# --------------------------------------------------------------------------------------------------------------
# 1. core attention
# --------------------------------------------------------------------------------------------------------------


def run_core(core, inputs: dict, dtype: torch.dtype, packed: Optional[PackedSeqParams]) -> tuple[dict, str]:
    """Output and dq, dk, dv of core(q, k, v) for the loss <out, grad_out>, on the inputs cast to dtype."""
    # fresh leaves per run: .to(dtype) of an fp32 tensor is the tensor itself, whose .grad would accumulate
    leaves = {n: inputs[n].detach().clone().to(dtype).requires_grad_() for n in ("q", "k", "v")}
    q, k, v = (leaves[n].squeeze(1) if packed else leaves[n] for n in ("q", "k", "v"))  # "thd" comes batch-less
    with SDPABackendRecorder() as recorder:
        out = core(q, k, v, None, packed_seq_params=packed)
    (out.float() * inputs["grad_out"].reshape(out.shape)).sum().backward()
    return {"out": out.detach(), **{f"d{n}": leaf.grad for n, leaf in leaves.items()}}, recorder.summary()


def core_accuracy(case: str, params: dict, device, core=None) -> list[dict]:
    """SDPAttention (or ``core``) on bf16 and on fp32 inputs vs the fp32 reference; the reference and, by default,
    the core are built from the case's config."""
    from megatron_flash.layers.attention import SDPAttention

    config = attention_config(case, params, torch.float32, device)
    core = core if core is not None else SDPAttention(config, layer_number=1)
    reference = MaskedSoftmaxAttention(config, layer_number=1)
    packed = packed_seq_params(case, params, device)
    length, batch = length_and_batch(case, params)
    heads, kv_heads, head_dim = params["heads"], params["kv_heads"], params["head_dim"]
    g = torch.Generator().manual_seed(0)
    inputs = dict(q=bf16_values(length, batch, heads, head_dim, generator=g, device=device),
                  k=bf16_values(length, batch, kv_heads, head_dim, generator=g, device=device),
                  v=bf16_values(length, batch, kv_heads, head_dim, generator=g, device=device),
                  grad_out=bf16_values(length, batch, heads * head_dim, generator=g, device=device))
    want, _ = run_core(reference, inputs, torch.float32, packed)
    rows = []
    for dtype, path in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        got, backend = run_core(core, inputs, dtype, packed)
        compare(rows, f"core {case}", path, backend, got, want, output="out")
    log(f"core {case}: " + ", ".join(f"{r['path']} {r['tensor']} {r['rel_error']:.1e}" for r in rows)
        + f" (SDPA backend bf16 {rows[0]['backend']}, fp32 {rows[-1]['backend']})")
    return rows


# --------------------------------------------------------------------------------------------------------------
# 2. the layer
# --------------------------------------------------------------------------------------------------------------


def reference_mixer_spec(char: str):
    """The repo's mixer spec with the core attention swapped for the masked-softmax reference."""
    from megatron_flash.models.specs import mixer_spec

    spec = mixer_spec(char)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules,
                                                                    core_attention=MaskedSoftmaxAttention))


def run_layer(mixer, x: torch.Tensor, grad_out: torch.Tensor, inputs, dtype: torch.dtype) -> tuple[dict, str]:
    """Output, input gradient and weight gradients of the mixer for the loss <out, grad_out>."""
    leaf = x.detach().clone().to(dtype).requires_grad_()
    mixer.zero_grad(set_to_none=True)
    with SDPABackendRecorder() as recorder:
        out = mixer(leaf, inputs)
    (out.float() * grad_out).sum().backward()
    result = {"output": out.detach(), "d_input": leaf.grad}
    result.update({f"d_{n}": p.grad for n, p in mixer.named_parameters()})
    return result, recorder.summary()


def layer_accuracy(case: str, params: dict, device) -> list[dict]:
    """AttentionMixer in bf16 and in fp32 vs the same weights in fp32 with the reference core."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from megatron_flash.layers.base import MixerInputs
    from megatron_flash.models.specs import mixer_spec

    char, _ = CASES[case]
    on_gpu = device.type == "cuda"
    config_bf16 = attention_config(case, params, torch.bfloat16, device)
    config_fp32 = attention_config(case, params, torch.float32, device)
    mixer_bf16 = build_module(mixer_spec(char), config=config_bf16, layer_number=1).to(device)
    mixer_fp32 = build_module(mixer_spec(char), config=config_fp32, layer_number=1).to(device)
    reference = build_module(reference_mixer_spec(char), config=config_fp32, layer_number=1).to(device)
    weights = dict(mixer_bf16.named_parameters())
    with torch.no_grad():
        for other in (mixer_fp32, reference):
            for name, p in other.named_parameters():
                p.copy_(weights[name].float())  # the bf16 weights, exactly

    packed = packed_seq_params(case, params, device)
    length, batch = length_and_batch(case, params)
    rope_length = packed.max_seqlen_q if packed is not None else length  # RoPE restarts in every document
    rope = RotaryEmbedding(config_fp32.kv_channels, rotary_percent=1.0,
                           use_cpu_initialization=not on_gpu)(rope_length).to(device)
    inputs = MixerInputs(rotary_pos_emb=rope, packed_seq_params=packed)
    g = torch.Generator().manual_seed(1)
    hidden = config_fp32.hidden_size
    x = bf16_values(length, batch, hidden, generator=g, device=device)
    grad_out = bf16_values(length, batch, hidden, generator=g, device=device)

    want, _ = run_layer(reference, x, grad_out, inputs, torch.float32)
    rows = []
    for mixer, dtype, path in ((mixer_bf16, torch.bfloat16, "bf16"), (mixer_fp32, torch.float32, "fp32")):
        got, backend = run_layer(mixer, x, grad_out, inputs, dtype)
        compare(rows, f"layer {case}", path, backend, got, want, output="output")
    log(f"layer {case}: " + ", ".join(f"{r['path']} {r['tensor']} {r['rel_error']:.1e}" for r in rows))
    return rows


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    print("\nRelative error ||a-b||/||b|| against the fp32 masked-softmax reference")
    print(f"{'check':<20} {'path':<5} {'SDPA backend':<20} {'tensor':<24} {'rel_error':>10} {'bound':>8}  ok")
    for r in rows:
        print(f"{r['check']:<20} {r['path']:<5} {r['backend']:<20} {r['tensor']:<24} {r['rel_error']:>10.2e} "
              f"{r['bound']:>8.0e}  {'yes' if r['ok'] else 'NO'}")


def parse_list(text: str, allowed, flag: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise SystemExit(f"{flag}: unknown or no names {unknown or text!r}; choose from {', '.join(allowed)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU")
    parser.add_argument("--cases", default=",".join(CASES), help="masks to check (comma-separated)")
    parser.add_argument("--checks", default=",".join(CHECKS), help="core attention op and/or the whole layer")
    args = parser.parse_args(argv)
    cases = parse_list(args.cases, CASES, "--cases")
    checks = parse_list(args.checks, CHECKS, "--checks")
    params = SMOKE if args.smoke else FULL

    # the fp32 references must not run on TF32 (10-bit mantissa): keep full fp32 matmuls, torch's default, whatever
    # the environment set
    torch.set_float32_matmul_precision("highest")
    environ = dict(os.environ)
    environ.setdefault("MASTER_PORT", str(runtime.free_port()))
    runtime.initialize(tensor_model_parallel_size=1, environ=environ)
    device = runtime.device()
    if device.type != "cuda" and not args.smoke:
        print("no GPU: use --smoke for a CPU run")
        return 2

    REPORT.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", smoke=args.smoke,
                   torch=torch.__version__, sizes=params, tolerance=TOLERANCE, rows=[])
    rows = REPORT["rows"]
    for check in checks:
        for case in cases:
            rows += (core_accuracy if check == "core" else layer_accuracy)(case, params, device)
            REPORT.save()

    print_table(rows)
    code = REPORT.finish(all(r["ok"] for r in rows), "attention checks")
    runtime.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
