"""Weight gradients accumulated straight into the fp32 main gradients (megatron's gradient accumulation fusion).

megatron's linear layers, with ``config.gradient_accumulation_fusion``, hand the weight gradient's matmul to APEX's
``fused_weight_gradient_mlp_cuda`` extension, which adds ``grad_output^T @ input`` into ``weight.main_grad`` in
one fp32-accumulating GEMM. Without it the layer returns a bf16 gradient that megatron's DDP hook then adds into
the main gradient: one more pass over every weight, read and written in fp32, plus the bf16 gradient itself. APEX
is a CUDA build the lent GPU cannot run; torch's matmul with an fp32 output from bf16 operands
(``addmm(..., out_dtype=float32)``, CUDA) is the same GEMM. :func:`install` gives megatron these functions in
APEX's place; :func:`wgrad_accumulate_reference` is the definition.
"""

from __future__ import annotations

import torch


def wgrad_accumulate_reference(total_input: torch.Tensor, grad_output: torch.Tensor,
                               main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` with the product formed in fp32 (the definition)."""
    main_grad += (grad_output.t().float() @ total_input.float()).to(main_grad.dtype)


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """APEX's signature: ``main_grad`` [out, in] (fp32) += ``grad_output`` [N, out]^T @ ``total_input`` [N, in].

    On CUDA one GEMM reads the 16-bit operands and accumulates into the fp32 ``main_grad`` in place; elsewhere
    (no mixed-dtype matmul on the CPU) the operands are widened first."""
    if main_grad.dtype != torch.float32:
        raise TypeError(f"wgrad_gemm_accum_fp32 accumulates into an fp32 main_grad, got {main_grad.dtype}")
    if main_grad.is_cuda and total_input.dtype != torch.float32:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)
    else:
        main_grad.addmm_(grad_output.t().float(), total_input.float())


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """APEX's signature, for a 16-bit ``main_grad`` of the operands' dtype (``grad_reduce_in_fp32`` off)."""
    main_grad.addmm_(grad_output.t(), total_input)


def install() -> None:
    """Where APEX is missing, make megatron's linear layers use these functions for ``gradient_accumulation_fusion``
    (they look for APEX's module at import and refuse the option without it). Call before building a model with
    the option."""
    import sys

    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = sys.modules[__name__]
        layers._grad_accum_fusion_available = True
