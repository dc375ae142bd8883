"""ops/wgrad.py: the weight gradient accumulated into an fp32 main gradient equals its definition (the product
formed in fp32, then added), for 16-bit and fp32 operands of awkward sizes; on CUDA through the mixed-dtype GEMM."""

import pytest
import torch

from megatron_flash.ops import wgrad

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp32_accumulation_equals_the_definition(device, dtype):
    gen = torch.Generator().manual_seed(0)
    total_input = torch.randn(37, 29, generator=gen).to(device, dtype)
    grad_output = torch.randn(37, 13, generator=gen).to(device, dtype)
    start = torch.randn(13, 29, generator=gen).to(device)
    main_grad, expected = start.clone(), start.clone()
    wgrad.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    wgrad.wgrad_accumulate_reference(total_input, grad_output, expected)
    torch.testing.assert_close(main_grad, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(main_grad, start)  # it added something


def test_fp16_accumulation_equals_the_definition():
    gen = torch.Generator().manual_seed(1)
    total_input, grad_output = torch.randn(41, 7, generator=gen), torch.randn(41, 5, generator=gen)
    main_grad = torch.randn(5, 7, generator=gen).to(torch.bfloat16)
    expected = main_grad.clone()
    wgrad.wgrad_gemm_accum_fp16(total_input.to(torch.bfloat16), grad_output.to(torch.bfloat16), main_grad)
    wgrad.wgrad_accumulate_reference(total_input.to(torch.bfloat16), grad_output.to(torch.bfloat16), expected)
    torch.testing.assert_close(main_grad, expected, rtol=2e-2, atol=2e-2)


def test_a_16_bit_main_grad_is_refused_by_the_fp32_entry_point():
    with pytest.raises(TypeError, match="fp32 main_grad"):
        wgrad.wgrad_gemm_accum_fp32(torch.ones(2, 3), torch.ones(2, 4), torch.zeros(4, 3, dtype=torch.bfloat16))
