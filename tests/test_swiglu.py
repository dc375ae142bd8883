"""ops.swiglu: both backends against swiglu_reference (autograd in fp64) and megatron's bias_swiglu_impl (its eager
math), values and input gradients, on awkward sizes: F not a multiple of the column block, several column blocks with
a masked tail, a row stride beyond 2F, leading dimensions that only a copy flattens. The triton kernels run on a GPU,
or on the CPU under Triton's interpreter (a subprocess with TRITON_INTERPRET=1, which triton reads at import).
FFNMixer against megatron's own MLP.forward on the same weights, on the CPU or a GPU."""

import re

import pytest
import torch

from megatron_flash.ops import swiglu as swiglu_module
from megatron_flash.ops.swiglu import OnePassSwiGLUFunction, swiglu, swiglu_reference
from megatron_flash.testing import relative_error, run_distributed
from tests.triton_kernels import TRITON_DEVICE, needs_triton_kernels, run_under_interpreter, starts_the_interpreter


# (leaf shape, y [..., 2F] as a function of the leaf, column block or None for the module's own)
CASES = {
    "F200_one_masked_block": ((37, 400), lambda t: t, None),
    "row_stride_403_four_blocks": ((37, 403), lambda t: t[:, 1:401], 64),  # 200 = 3 * 64 + 8; y starts unaligned
    "F13_blocks_of_8_3d": ((5, 3, 26), lambda t: t, 8),
    "transposed_flattened_by_a_copy": ((5, 3, 26), lambda t: t.transpose(0, 1), 8),
}

# fp32: the same math in fp32 on both sides, a few roundings of 2^-24 and the GPU's approximate exp in sigmoid
# (~1e-7 relative) apart, far inside 1e-5; atol for results near zero (silu' crosses zero at a = -1.28, where the
# fp32 error of 1 + a(1 - s) is absolute).
FP32 = dict(rtol=1e-5, atol=1e-5)
# bf16: inputs and cotangent are bf16 values, exact in fp32 and fp64, and the kernels round their fp32 result to bf16
# once: at most half a bf16 ulp, 2^-8 relative. One ulp, 2^-7, leaves the fp32 error above on top.
BF16 = dict(rtol=2 ** -7, atol=1e-5)
TOLERANCES = {torch.float32: FP32, torch.bfloat16: BF16}
# megatron's eager bf16 math rounds every intermediate to bf16 (five roundings in its backward, and a cancellation in
# 1 + a(1 - s)): compared in relative error ||a - b|| / ||b|| instead, as tests/test_short_conv.py does for bf16
MEGATRON_BF16_RELATIVE = 1e-2


def _leaf(shape, dtype, device, seed=0):
    # scaled by 3 so sigmoid also meets its saturated ends
    return (3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(device, dtype).requires_grad_()


def _value_and_grad(fn, leaf):
    leaf.grad = None
    out = fn(leaf)
    # bf16 values: every dtype holds them exactly, so each side gets the same cotangent
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).bfloat16().to(out)
    out.backward(cotangent)
    return out.detach(), leaf.grad.clone()


def _compare(backend, dtype, device, case):
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    shape, view, _ = CASES[case]
    leaf = _leaf(shape, dtype, device)
    got = _value_and_grad(lambda t: swiglu(view(t), backend), leaf)
    want = _value_and_grad(lambda t: swiglu_reference(view(t)), leaf.detach().double().requires_grad_())
    # megatron's SwiGLUFunction with its torch.compile'd functions run eagerly: dynamo off for forward and backward
    with torch._dynamo.config.patch(disable=True):
        megatron = _value_and_grad(lambda t: bias_swiglu_impl(view(t).contiguous(), None),
                                   leaf.detach().clone().requires_grad_())
    for what, g, w, m in zip(("output", "input gradient"), got, want, megatron, strict=True):
        assert g.dtype == dtype and g.shape == w.shape, what
        torch.testing.assert_close(g.double(), w, **TOLERANCES[dtype], msg=lambda msg: f"{what}: {msg}")
        if dtype == torch.bfloat16:
            assert relative_error(g.double(), m.double()) < MEGATRON_BF16_RELATIVE, what
        else:
            torch.testing.assert_close(g, m, **FP32, msg=lambda msg: f"{what} against megatron: {msg}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_the_reference(case, dtype):
    _compare("torch", dtype, "cpu", case)


def test_torch_backend_gradients_against_finite_differences():
    """In fp64 the torch backend keeps fp64: its hand-written backward against gradcheck's numerical Jacobian."""
    y = _leaf((4, 3, 10), torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda t: swiglu(t, "torch"), (y,))


def _saved_by_swiglu(backend, device):
    """What autograd saves for the backward of swiglu alone: the tensors packed while it runs."""
    y = _leaf((6, 16), torch.float32, device)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu(y, backend)
    return y, packed


def test_only_the_input_is_saved_for_backward():
    y, packed = _saved_by_swiglu("torch", "cpu")
    assert len(packed) == 1 and packed[0].data_ptr() == y.data_ptr() and packed[0].shape == y.shape


def test_bad_arguments_are_clear_errors():
    y = torch.randn(4, 10)
    with pytest.raises(ValueError, match="must be even"):
        swiglu(y[:, :9])
    with pytest.raises(ValueError, match="unit stride in the last dimension"):
        swiglu(y.t())
    with pytest.raises(ValueError, match="unknown swiglu backend"):
        swiglu(y, "cudnn")


@needs_triton_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_kernels_match_the_reference(case, dtype, monkeypatch):
    block = CASES[case][2]
    if block is not None:
        monkeypatch.setattr(swiglu_module, "COLUMN_BLOCK", block)
    _compare("triton", dtype, TRITON_DEVICE, case)


@needs_triton_kernels
def test_triton_kernels_save_only_the_input_and_take_empty_inputs():
    y, packed = _saved_by_swiglu("triton", TRITON_DEVICE)
    assert len(packed) == 1 and packed[0].data_ptr() == y.data_ptr() and packed[0].shape == y.shape
    empty = torch.zeros(0, 3, 8, device=TRITON_DEVICE, requires_grad=True)
    out = swiglu(empty, "triton")
    out.sum().backward()
    assert out.shape == (0, 3, 4) and empty.grad.shape == empty.shape


TRITON_KERNEL_TESTS = 2 * len(CASES) + 1


@starts_the_interpreter
def test_triton_kernels_under_the_interpreter():
    """Runs the triton_kernels tests above in a subprocess under Triton's interpreter; they must pass, not skip."""
    summary = run_under_interpreter([__file__, "-k", "triton_kernels_match or triton_kernels_save"])
    assert re.search(rf"\b{TRITON_KERNEL_TESTS} passed", summary) and "skipped" not in summary, summary


# --------------------------------------------------------------------------------------------------------------
# FFNMixer against megatron's MLP.forward
# --------------------------------------------------------------------------------------------------------------


def _autograd_functions(out):
    """The autograd.Function classes in out's backward graph."""
    found, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        found.add(getattr(node, "_forward_cls", None))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _ffn_body():
    """For the configs without and with biases: FFNMixer's and MLP.forward's output, input gradient and parameter
    gradients on the same weights (bf16 on a GPU, fp32 on the CPU), and whether ops.swiglu ran."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import build_module

    from megatron_flash import runtime
    from megatron_flash.config import make_config
    from megatron_flash.layers.base import MixerInputs
    from megatron_flash.models.specs import mixer_spec

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(37, 2, 64, generator=gen).to(runtime.device(), dtype)
    out_weights = torch.randn(37, 2, 64, generator=gen).to(runtime.device())
    results = {}
    for add_bias_linear in (False, True):
        config = make_config(hidden_size=64, ffn_hidden_size=200, num_attention_heads=4, num_query_groups=4,
                             layer_pattern="F", use_cpu_initialization=True, params_dtype=dtype,
                             add_bias_linear=add_bias_linear)
        mixer = build_module(mixer_spec("F"), config=config, layer_number=1).to(runtime.device())
        with torch.no_grad():  # megatron zeroes its biases; nonzero ones show whether a path drops them
            for name, p in mixer.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen))

        def run(forward):
            mixer.zero_grad()
            x = x0.clone().requires_grad_()
            out = forward(x)
            (out.float() * out_weights).sum().backward()
            return {"out": out.detach().cpu(), "x_grad": x.grad.cpu(), "one_pass": OnePassSwiGLUFunction in
                    _autograd_functions(out), **{n: p.grad.cpu() for n, p in mixer.named_parameters()}}

        def megatron_forward(x):
            out, bias = MLP.forward(mixer, x)
            return out if bias is None else out + bias

        results[add_bias_linear] = {"ffn": run(lambda x: mixer(x, MixerInputs())), "megatron": run(megatron_forward)}
    return results


@pytest.fixture(scope="module")
def ffn_runs():
    return run_distributed(_ffn_body, world_size=1)[0]


@pytest.mark.parametrize("add_bias_linear", [False, True])
def test_ffn_layer_matches_megatron_mlp(ffn_runs, add_bias_linear):
    """Bias-free SwiGLU (our models) runs ops.swiglu, anything else megatron's MLP.forward; either way the layer's
    output and gradients are megatron's. fp32 (CPU): the same fp32 math; bf16 (GPU): ops.swiglu's kernel against
    megatron's compiled one, one bf16 rounding of the activation apart before fc2 and its gradients mix it."""
    ffn, megatron = ffn_runs[add_bias_linear]["ffn"], ffn_runs[add_bias_linear]["megatron"]
    assert ffn.pop("one_pass") is not add_bias_linear and megatron.pop("one_pass") is False
    assert ffn.keys() == megatron.keys()
    for name, want in megatron.items():
        got = ffn[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.dtype == torch.bfloat16:
            assert relative_error(got.double(), want.double()) < 1e-2, name
        else:
            torch.testing.assert_close(got, want, **FP32, msg=lambda msg: f"{name}: {msg}")
