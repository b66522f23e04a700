"""The FP8 matmul behind ``Fp8Linear``: one dispatch, so a faster kernel can be swapped in here alone.

* On a CUDA GPU with FP8 tensor cores (compute capability >= 8.9) and BF16 activations:
  activations are quantized per token (one Triton kernel in eager mode, fused by Inductor under
  ``torch.compile``) and cuBLASLt multiplies FP8 x FP8 in float32 with the scales applied in its
  epilogue: row-wise scales for per-tensor weights, DeepSeek-style 1x128 / 128x128 block scales
  for 128x128 block weights (Hopper). Which GEMM a device supports is found by a tiny probe
  multiplication, once per device.
* Everywhere else (CPU, older GPUs, other block sizes): the same computation emulated in float32:
  activations quantized and dequantized with the same numerics, the weight dequantized, a float32
  matmul. It matches the FP8 GEMM up to summation order, so quality measured on a CPU is the
  quality a Hopper GPU delivers (or slightly worse: the emulation quantizes the activations of
  every Linear, where the GPU keeps the few-row modulation Linears' activations in BF16).

Per-tensor weights pair with per-token activation scales; block weights ``(bn, bk)`` with
per-token, per-``bk``-column-group activation scales. A layer with a calibrated ``input_scale``
(static activations) quantizes with that one scale instead (no reduction; one Triton launch on a
GPU, plain tensor ops under torch.compile and elsewhere): for per-tensor weights a scalar-scaled
GEMM where K > N and the row-wise one with the scales repeated elsewhere (whichever measured
faster at that shape), the row-wise or block GEMM with the scale repeated for per-channel or
block weights. With at most 16 rows (the modulation
Linears) a Triton GEMV reads the FP8 weight with BF16 activations instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from omni_fp8.converter.errors import ConfigError
from omni_fp8.converter.numerics import FP8_DTYPE, dequantize_weight, quantize_activation, quantize_activation_static

from .triton_kernels import (
    GEMV_MAX_ROWS,
    HAVE_TRITON,
    fp8_weight_gemv,
    gemv_supports,
    quantize_activation_cuda,
    quantize_activation_static_cuda,
)

__all__ = ["fp8_linear", "eager_linear", "device_has_fp8", "gemm_for", "gemm_scale_layout", "FP8_MIN_CAPABILITY", "CUBLAS_BLOCK"]

FP8_MIN_CAPABILITY = (8, 9)
CUBLAS_BLOCK = (128, 128)  # the only block shape cuBLASLt's block-scaled FP8 GEMM takes


@functools.lru_cache(maxsize=None)
def device_has_fp8(device: torch.device | str) -> bool:
    """Whether ``device`` runs FP8 x FP8 GEMMs with row-wise scales (probed once)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        return False
    return _probe(device, None) is not None


@functools.lru_cache(maxsize=None)
def _probe(device: torch.device, block_size: tuple[int, int] | None) -> Callable | None:
    """The GEMM that works on ``device`` for this weight scheme, tried on a tiny problem.

    Activations are quantized with the reference numerics here, so the probe judges the GEMM
    alone (the Triton kernel has tests of its own).
    """
    m, n, k = 16, 256, 256
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=device) / 16).to(FP8_DTYPE)
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)
    scale = torch.ones((n // 128, k // 128) if block_size else (), device=device)
    xq, xs = _quantize_for_gemm_reference(x, None if block_size is None else block_size[1])
    expected = x.float() @ w.float().t() + bias.float()
    candidates = [_rowwise_mm] if block_size is None else [
        _blockwise_v2, _blockwise_v1, _bias_after(_blockwise_v2), _bias_after(_blockwise_v1)]
    for mm in candidates:
        try:
            y = mm(xq, xs, w, gemm_scale_layout(scale, n, block_size), bias)
        except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError, ImportError):
            continue
        if torch.isfinite(y).all() and (y.float() - expected).norm() < 0.1 * expected.norm():
            return mm
    return None


def no_fp8_gemm_error(device: torch.device, scheme: str = "fp8") -> ConfigError:
    """The one message for ``force_fp8_kernels`` on a device that cannot honour it."""
    return ConfigError(
        f"force_fp8_kernels: {device} has no FP8 matmul for {scheme} weights (needs a CUDA GPU of compute "
        "capability >= 8.9, and Hopper with 128x128 blocks for block scales); drop force_fp8_kernels "
        "to run the emulated path."
    )


def gemm_for(device: torch.device, shape: tuple[int, int], block_size: tuple[int, int] | None,
             fast_accum: bool = False) -> Callable | None:
    """The FP8 GEMM for a weight of ``shape`` on ``device``, or ``None`` (emulate).

    Decided when a layer is placed or moved: the forward only calls what this returns (nothing
    to look up per call, nothing for ``torch.compile`` to trace through).
    """
    if device.type != "cuda" or not device_has_fp8(device):
        return None
    n, k = shape
    if block_size is None:
        return _rowwise_mm_fast if fast_accum else _rowwise_mm
    if tuple(block_size) != CUBLAS_BLOCK or n % 128 or k % 128:
        return None
    if _probe(device, CUBLAS_BLOCK) is None:
        return None
    return _blockwise_mm


def gemm_scale_layout(scale: torch.Tensor, n: int, block_size: tuple[int, int] | None) -> torch.Tensor:
    """The weight scale in the layout the FP8 GEMM takes; the same values on every device."""
    if block_size is None:  # row-wise: one scale per output (a per-tensor scale repeated)
        return scale.reshape(1, -1).expand(1, n).contiguous()
    grid_n, grid_k = scale.shape
    padded_k = -(-grid_k // 4) * 4
    # [ceil(K/128) rounded up to 4, ceil(N/128)], column-major, as cuBLASLt's 128x128 recipe wants.
    return torch.nn.functional.pad(scale, (0, padded_k - grid_k)).contiguous().t()


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: tuple[int, int] | None,
    mm: Callable | None,
    gemm_scale: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` with FP8 activations; output in ``x.dtype``.

    ``mm`` and ``gemm_scale`` (``gemm_for``, ``gemm_scale_layout``) are the FP8 GEMM and its weight scale;
    ``None`` means emulate. ``input_scale`` (0-dim float32) makes the activations static.
    ``fast_accum`` is the layer's own flag (``gemm_for`` already built it into ``mm``): the static
    path calls ``_scaled_mm`` itself and takes it from here, a plain bool that ``torch.compile``
    reads as a constant, where comparing ``mm`` with the fast GEMM by identity is not kept by
    tracing (measured: a compiled static layer ran with exact accumulation).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    group = None if block_size is None else block_size[1]
    if mm is not None and x.dtype == torch.bfloat16:
        if x2.shape[0] <= GEMV_MAX_ROWS and gemv_supports(block_size):
            y = _small_m(x2, weight, scale, bias, block_size)
        elif input_scale is not None:
            y = _static_mm(x2, input_scale, weight, scale, bias, block_size, mm, gemm_scale, fast_accum)
        else:
            xq, xs = _shared_quantize(x, x2, group)
            y = mm(xq, xs, weight, gemm_scale, bias)
            if y.shape[0] != x2.shape[0]:
                y = y[: x2.shape[0]]  # rows the block-scaled GEMM needed as padding
    else:
        y = _emulated(x2, weight, scale, bias, block_size, input_scale)
    return y.reshape(*shape[:-1], weight.shape[0])


def _static_mm(x2, input_scale, weight, scale, bias, block_size, mm, gemm_scale, fast_accum: bool = False):
    """The FP8 GEMM with a calibrated activation scale: quantize with it, then multiply.

    cuBLASLt takes a scalar scale on both sides (per-tensor weights), or row-wise / 1x128 scales
    on both; for per-channel and block weights the one activation scale is repeated into that
    layout, which gives the same products.
    """
    m = x2.shape[0]
    xq = _quantize_static(x2, input_scale)
    if block_size is None:
        if scale.dim() == 0 and per_tensor_gemm_faster(*weight.shape):
            return torch._scaled_mm(xq, weight.t(), scale_a=input_scale, scale_b=scale,
                                    bias=None if bias is None else bias.to(torch.bfloat16),
                                    out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
        xs = input_scale.reshape(1, 1).expand(m, 1).contiguous()
        return _rowwise_mm(xq, xs, weight, gemm_scale, bias, fast_accum)
    groups = -(-x2.shape[1] // block_size[1])
    xs = input_scale.reshape(1, 1).expand(groups, m).contiguous().t()  # column-major [M, K/128]
    y = mm(xq, xs, weight, gemm_scale, bias)
    return y[:m] if y.shape[0] != m else y


def eager_linear(layer) -> Callable | None:
    """The per-call work of ``fp8_linear`` for one placed per-tensor/per-channel layer, in eager mode.

    An eager forward pays host time for every Python step of every Linear, and a step of a
    60-block model makes about a thousand FP8 Linear calls: this closure does only what depends
    on the input (reshape, quantize or GEMV, GEMM) with everything else looked up once when the
    layer is placed (the GEMM, the transposed weight view, the scale layout). The layer re-makes
    it whenever it is placed again, so the captured views never outlive a move.
    Returns ``None`` where this shortcut does not apply (emulation, block scales).
    """
    mm = layer._gemm_fn
    if mm is not _rowwise_mm and mm is not _rowwise_mm_fast:
        return None
    fast = mm is _rowwise_mm_fast
    params, buffers = layer._parameters, layer._buffers
    weight, gemm_scale = params["weight"], buffers["gemm_scale"]
    n, k = weight.shape
    weight_t = weight.t()
    scale = layer.scale
    scaled_mm, bf16 = torch._scaled_mm, torch.bfloat16
    gemv = fp8_weight_gemv if gemv_supports(None) else None
    input_scale = params.get("input_scale")
    if input_scale is not None:
        return _eager_static(params, weight, weight_t, scale, gemm_scale, input_scale, gemv, fast)

    def run(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, k)
        bias = params["bias"]  # looked up per call: offloading may swap the bias alone
        if bias is not None and bias.dtype != bf16:
            bias = bias.to(bf16)  # a float32 model called with BF16 activations: the GEMM adds BF16
        if gemv is not None and x2.shape[0] <= GEMV_MAX_ROWS:
            y = gemv(x2, weight, scale, bias, None)
        else:
            xq, xs = _shared_quantize(x, x2, None)
            y = scaled_mm(xq, weight_t, scale_a=xs, scale_b=gemm_scale, bias=bias, out_dtype=bf16, use_fast_accum=fast)
        return y.view(*shape[:-1], n)

    return run


def _eager_static(params, weight, weight_t, scale, gemm_scale, input_scale, gemv, fast) -> Callable:
    """``eager_linear``'s closure for a layer with a calibrated ``input_scale``: no amax
    reduction, and for per-tensor weights with K > N a scalar scale on both sides
    (``per_tensor_gemm_faster``)."""
    n, k = weight.shape
    scaled_mm, bf16 = torch._scaled_mm, torch.bfloat16
    quantize = quantize_activation_static_cuda if HAVE_TRITON else quantize_activation_static
    per_tensor = scale.dim() == 0 and per_tensor_gemm_faster(n, k)
    scale_b = scale if per_tensor else gemm_scale
    # Row-wise GEMMs take the activation scale once per row: kept for the last row count (a layer
    # sees one per resolution: the image or the text stream's tokens) instead of made per call,
    # and made again when the row count changes or the scale is written in place.
    rows: list = [-1, -1, None]  # row count, input_scale's version, the [M, 1] scale

    def row_scales(m: int) -> torch.Tensor:
        version = input_scale._version
        if rows[0] != m or rows[1] != version:
            rows[:] = [m, version, input_scale.reshape(1, 1).expand(m, 1).contiguous()]
        return rows[2]

    def run(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, k)
        bias = params["bias"]
        if bias is not None and bias.dtype != bf16:
            bias = bias.to(bf16)
        if gemv is not None and x2.shape[0] <= GEMV_MAX_ROWS:
            y = gemv(x2, weight, scale, bias, None)
        else:
            xq = quantize(x2, input_scale)
            xs = input_scale if per_tensor else row_scales(x2.shape[0])
            y = scaled_mm(xq, weight_t, scale_a=xs, scale_b=scale_b, bias=bias, out_dtype=bf16, use_fast_accum=fast)
        return y.view(*shape[:-1], n)

    return run


# Static activations with a per-tensor weight can take either cuBLASLt GEMM: a scalar scale on
# both sides, or the row-wise one with the scales repeated (the same products). Measured on an H200
# at every Linear shape of Qwen-Image and Z-Image (bench/gemm_shapes.py, bench/RESULTS.md), the
# scalar one is faster only where K > N (the MLPs' down projections); elsewhere row-wise is, by up
# to 9% (Z-Image's output projection, 4352x3840x3840: 0.108 against 0.119 ms with fast accumulation).
STATIC_ROWWISE_UNLESS_K_ABOVE_N = True


def per_tensor_gemm_faster(n: int, k: int) -> bool:
    """Whether a static per-tensor layer of weight ``[n, k]`` multiplies with scalar scales."""
    return k > n or not STATIC_ROWWISE_UNLESS_K_ABOVE_N


def _quantize_static(x2: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """One Triton launch on a GPU outside torch.compile; the plain-torch numerics elsewhere (Inductor
    fuses those into the producer)."""
    if HAVE_TRITON and x2.is_cuda and not torch.compiler.is_compiling():
        return quantize_activation_static_cuda(x2, input_scale)
    return quantize_activation_static(x2, input_scale)


def _small_m(x2, weight, scale, bias, block_size):
    """A few rows (AdaLN modulation: one per image): the FP8-weight GEMV, BF16 activations.

    Measured on an H200 against the FP8 GEMM and BF16 (bench/RESULTS.md): the GEMV streams the
    weight once as FP8 and needs no activation-quantization launch.
    """
    if torch.compiler.is_compiling():
        bn, bk = block_size or (0, 0)
        return torch.ops.omni_fp8.fp8_weight_gemv(x2, weight, scale, bias, bn, bk)
    return fp8_weight_gemv(x2, weight, scale, bias, block_size)


# Sibling projections (to_q, to_k, to_v) read the same activation: quantize it once. An entry
# keeps its input alive, so its memory cannot be reused by another tensor while it is cached.
# Two entries: a fused AdaLN kernel (fused_blocks) quantizes a block's image and text
# activations one after the other, before either stream's projections run.
_last_quantized: list[tuple] = []
_SHARED_ENTRIES = 2


def forget_shared_activation() -> None:
    """Drop the cached quantized activations (CUDA graph capture: they must not outlive the graph)."""
    _last_quantized.clear()


def share_quantized_activation(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    """Record ``q``, ``s`` (per token, ``[M, K]`` and ``[M, 1]``) as the quantization of ``x``, made
    by the kernel that produced ``x``: the next per-tensor FP8 Linear called on ``x`` uses them."""
    _last_quantized[:] = [(x, x._version, None, q, s), *_last_quantized[: _SHARED_ENTRIES - 1]]


def _shared_quantize(x: torch.Tensor, x2: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        return _quantize_for_gemm(x2, group)  # Inductor fuses this into the producer; CSE shares it
    for cached_x, version, cached_group, q, s in _last_quantized:
        if cached_x is x and version == x._version and cached_group == group:
            return q, s
    q, s = _quantize_for_gemm(x2, group)
    _last_quantized[:] = [(x, x._version, group, q, s), *_last_quantized[: _SHARED_ENTRIES - 1]]
    return q, s


def _quantize_for_gemm(x2: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if HAVE_TRITON and x2.is_cuda and not torch.compiler.is_compiling():
        return quantize_activation_cuda(x2, group or 0, 1 if group is None else _BLOCK_ROWS)
    return _quantize_for_gemm_reference(x2, group)


def _quantize_for_gemm_reference(x2: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference numerics, scales laid out for the GEMM (what Inductor compiles and fuses)."""
    q, s = quantize_activation(x2, group)
    if group is not None:
        s = s.t().contiguous().t()  # column-major [M, K/128], as the block-scaled GEMM wants
    return q, s


def _rowwise_mm(xq, xs, weight, gemm_scale, bias, fast_accum: bool = False):
    return torch._scaled_mm(
        xq,
        weight.t(),  # column-major view of the row-major [N, K] weight, as cuBLASLt wants
        scale_a=xs,
        scale_b=gemm_scale,
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
        use_fast_accum=fast_accum,
    )


# cuBLASLt's fast FP8 accumulation (partial sums not promoted to full float32 precision at
# intervals): faster, less exact. Used by ``Fp8Linear.fast_accum``.
_rowwise_mm_fast = functools.partial(_rowwise_mm, fast_accum=True)


def _blockwise_mm(xq, xs, weight, gemm_scale, bias):
    if torch.compiler.is_compiling():
        return torch.ops.omni_fp8.scaled_mm_blockwise(xq, xs, weight, gemm_scale, bias)
    # Eager: directly, since the custom op's dispatcher would add to every Linear's host time.
    return _blockwise_padded(xq, xs, weight, gemm_scale, bias)


def _blockwise_padded(xq, xs, weight, gemm_scale, bias):
    """The probed block-scaled GEMM, rows padded to a multiple of 16 first if they are not.

    cuBLASLt has no block-scaled kernel for other row counts (seen on H200, CUDA 13). The eager
    quantizer pads in its own launch; otherwise (torch.compile, no Triton) rows are padded here
    with zeros (scale 1) and dropped again.
    """
    mm = _probe(xq.device, CUBLAS_BLOCK)
    m = xq.shape[0]
    if m % _BLOCK_ROWS == 0:
        return mm(xq, xs, weight, gemm_scale, bias)
    padded = -(-m // _BLOCK_ROWS) * _BLOCK_ROWS
    xq_p = torch.zeros((padded, xq.shape[1]), dtype=xq.dtype, device=xq.device)
    xq_p[:m] = xq
    xs_p = torch.ones((xs.shape[1], padded), dtype=xs.dtype, device=xs.device).t()  # column-major
    xs_p[:m] = xs
    return mm(xq_p, xs_p, weight, gemm_scale, bias)[:m].contiguous()


def _blockwise_v1(xq, xs, weight, gemm_scale, bias):
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=gemm_scale, bias=bias, out_dtype=torch.bfloat16)


def _blockwise_v2(xq, xs, weight, gemm_scale, bias):
    # torch._scaled_mm_v2 directly: the torch.nn.functional.scaled_mm wrapper around it costs
    # about as much host time again, on every call.
    return torch._scaled_mm_v2(xq, weight.t(), [xs], [_RECIPE_1x128], [], [gemm_scale], [_RECIPE_128x128], [], bias,
                               torch.bfloat16, [], False)


def _bias_after(mm: Callable) -> Callable:
    """``mm`` for a GEMM whose epilogue takes no bias: add it afterwards."""

    def run(xq, xs, weight, gemm_scale, bias):
        y = mm(xq, xs, weight, gemm_scale, None)
        return y if bias is None else y + bias.to(y.dtype)

    return run


def _scaling_type(*names: str) -> int:
    try:
        from torch.nn.functional import ScalingType
    except ImportError:
        return -1
    return next((getattr(ScalingType, n).value for n in names if hasattr(ScalingType, n)), -1)


_RECIPE_1x128 = _scaling_type("BlockWise1x128", "Blockwise_1x128")
_RECIPE_128x128 = _scaling_type("BlockWise128x128", "Blockwise_128x128")
_BLOCK_ROWS = 16  # cuBLASLt's block-scaled FP8 GEMM wants M a multiple of 16 (see _blockwise_padded)


@torch.library.custom_op("omni_fp8::scaled_mm_blockwise", mutates_args=())
def _scaled_mm_blockwise(
    xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, gemm_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``_blockwise_padded`` as a custom op: ``torch.compile`` cannot trace the GEMM's newer entry
    point (torch 2.11), so it sees this op and its fake implementation instead."""
    return _blockwise_padded(xq, xs, weight, gemm_scale, bias)


@_scaled_mm_blockwise.register_fake
def _(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, gemm_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return xq.new_empty((xq.shape[0], weight.shape[0]), dtype=torch.bfloat16)


def _emulated(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
    block_size: tuple[int, int] | None, input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    group = None if block_size is None else block_size[1]
    if input_scale is not None:  # static: one calibrated scale for every token and group
        x_deq = quantize_activation_static(x, input_scale).to(torch.float32) * input_scale
    else:
        xq, x_scale = quantize_activation(x, group)
        if group is not None:
            x_scale = x_scale.repeat_interleave(group, dim=-1)[..., : x.shape[-1]]
        x_deq = xq.to(torch.float32) * x_scale
    w_deq = dequantize_weight(weight, scale, block_size, torch.float32)
    y = x_deq @ w_deq.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
