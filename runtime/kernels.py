"""The FP8 matmul behind ``Fp8Linear``: one dispatch, so a faster kernel can be swapped in here alone.

* ``fp8_tensor`` weights on a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: Ada,
  Hopper, Blackwell) and BF16 activations: activations are quantized per token and
  ``torch._scaled_mm`` multiplies FP8 x FP8 with row-wise scales, accumulating in float32.
* everywhere else (CPU, older GPUs, block-scaled weights for now): the same computation emulated
  in float32: the activations are quantized and dequantized with the same numerics, the weight is
  dequantized, and a float32 matmul follows. The result matches the FP8 GEMM up to summation
  order, so quality measured on a CPU is the quality a Hopper GPU delivers.
"""

from __future__ import annotations

import functools

import torch

from omni_fp8.converter.numerics import dequantize_weight, quantize_activation_per_token

__all__ = ["fp8_linear", "device_has_fp8", "FP8_MIN_CAPABILITY"]

FP8_MIN_CAPABILITY = (8, 9)


@functools.lru_cache(maxsize=None)
def device_has_fp8(device: torch.device | str) -> bool:
    """Whether ``device`` has FP8 matmuls ``torch._scaled_mm`` can use."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: tuple[int, int] | None,
    *,
    use_fp8_gemm: bool,
) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` with dynamic per-token FP8 activations; output in ``x.dtype``.

    ``use_fp8_gemm`` is decided once, when the module is placed on its device, not per call.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if use_fp8_gemm and block_size is None and x.dtype == torch.bfloat16:
        y = _scaled_mm_rowwise(x2, weight, scale, bias)
    else:
        y = _emulated(x2, weight, scale, bias, block_size)
    return y.reshape(*shape[:-1], weight.shape[0])


def _scaled_mm_rowwise(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    xq, x_scale = quantize_activation_per_token(x)
    w_scale = scale.reshape(1, 1).expand(1, weight.shape[0]).contiguous()
    return torch._scaled_mm(
        xq,
        weight.t(),  # column-major view of the row-major [N, K] weight, as cuBLASLt wants
        scale_a=x_scale,
        scale_b=w_scale,
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )


def _emulated(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, block_size: tuple[int, int] | None
) -> torch.Tensor:
    xq, x_scale = quantize_activation_per_token(x)
    x_deq = xq.to(torch.float32) * x_scale
    w_deq = dequantize_weight(weight, scale, block_size, torch.float32)
    y = x_deq @ w_deq.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
