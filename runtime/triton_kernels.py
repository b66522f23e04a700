"""The Triton kernels: activation quantization in one launch, and an FP8-weight GEMV for few rows.

``numerics.quantize_activation`` written in plain torch launches about seven kernels per call
(upcast, abs, amax, where, divide, clamp, cast), each one more launch per Linear in eager mode.
This kernel reads each row once and writes the FP8 row and its scale(s): one launch, same bits
(divisions rounded to nearest, as torch's are; the float32 -> E4M3 cast is round-to-nearest-even
and saturating, after the clamp). Under ``torch.compile`` the plain-torch version is used
instead, so Inductor fuses it into the op that produced the activations.

The GEMV is also a custom op with a fake implementation, so compiled graphs can call it.
"""

from __future__ import annotations

import functools

import torch

from omni_fp8.converter.numerics import FP8_DTYPE, FP8_MAX, MIN_SCALE

__all__ = ["HAVE_TRITON", "quantize_activation_cuda", "fp8_weight_gemv", "gemv_supports", "GEMV_MAX_ROWS"]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the emulated path needs no kernel
    triton = None

HAVE_TRITON = triton is not None

if HAVE_TRITON:

    @triton.jit
    def _fp8_weight_gemv(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_s, stride_y,
        HAS_BIAS: tl.constexpr, BLOCKED: tl.constexpr, PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(0, tl.cdiv(K, BLOCK_K)):
            k0 = kb * BLOCK_K
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            part = tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))  # FP8 -> BF16 is exact; float32 sums
            if BLOCKED:
                acc += part * tl.load(s_ptr + (pid * BLOCK_N // SCALE_BN) * stride_s + k0 // SCALE_BK)
            else:
                acc += part
        if PER_ROW:
            acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
        elif not BLOCKED:
            acc = acc * tl.load(s_ptr)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(tl.bfloat16), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _quantize_rows(
        x_ptr, q_ptr, s_ptr, M, K, group, stride_x, stride_q, stride_s_row, stride_s_group,
        BLOCK: tl.constexpr, FP8_LIMIT: tl.constexpr, MIN_SCALE: tl.constexpr,
    ):
        row = tl.program_id(0)
        g = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        cols = g * group + offs
        mask = (offs < group) & (cols < K)
        # Rows past M are padding (the block-scaled GEMM wants M a multiple of 16): x = 0 there,
        # so q = 0 and the scale is 1.
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask & (row < M), other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.where(amax == 0.0, 1.0, tl.maximum(tl.math.div_rn(amax, FP8_LIMIT), MIN_SCALE))
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_LIMIT), FP8_LIMIT)
        tl.store(q_ptr + row * stride_q + cols, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
        tl.store(s_ptr + row * stride_s_row + g * stride_s_group, scale)


def _scale_layout(m: int, groups: int, group_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-token scales are ``[M, 1]``; per-group ones ``[M, G]`` column-major, as cuBLAS wants."""
    if group_size == 0:
        return (m, 1), (1, 1)
    return (m, groups), (1, m)


def quantize_activation_cuda(
    x: torch.Tensor, group_size: int, pad_rows_to: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``numerics.quantize_activation`` for a 2-D CUDA tensor; ``group_size`` 0 means per token.

    Per-group scales come back column-major (strides ``(1, M)``), the layout the block-scaled
    GEMM takes; their values equal the reference's. ``pad_rows_to`` rounds the row count up with
    zero rows (scale 1) in the same launch.
    """
    m, k = x.shape
    rows = -(-m // pad_rows_to) * pad_rows_to
    group = k if group_size == 0 else group_size
    groups = -(-k // group)
    x = x.contiguous()
    # One allocation for both outputs (each allocation is host time on every Linear): the
    # float32 scales first, then the FP8 values at a 256-byte boundary, as cuBLASLt wants them.
    scale_bytes = rows * groups * 4
    offset = -(-scale_bytes // 256) * 256
    buf = torch.empty(offset + rows * k, dtype=torch.uint8, device=x.device)
    shape, strides = _scale_layout(rows, groups, group_size)
    s = buf[:scale_bytes].view(torch.float32).as_strided(shape, strides)
    q = buf[offset:].view(FP8_DTYPE).view(rows, k)
    if rows:
        block, warps = _launch_shape(group)
        _quantize_rows[(rows, groups)](
            x, q, s, m, k, group, x.stride(0), k, strides[0], strides[1] if group_size else 0,
            BLOCK=block, FP8_LIMIT=FP8_MAX, MIN_SCALE=MIN_SCALE, num_warps=warps,
        )
    return q, s


GEMV_MAX_ROWS = 16
_GEMV_BLOCK_N, _GEMV_BLOCK_K = 64, 128


def gemv_supports(block_size: tuple[int, int] | None) -> bool:
    """Whether ``fp8_weight_gemv`` takes weights of this scheme (block edges must align with its tiles)."""
    return HAVE_TRITON and (
        block_size is None or (block_size[0] % _GEMV_BLOCK_N == 0 and block_size[1] % _GEMV_BLOCK_K == 0)
    )


def fp8_weight_gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
    block_size: tuple[int, int] | None,
) -> torch.Tensor:
    """``x @ (q * s).T + b`` for at most 16 BF16 rows, reading the FP8 weight once (``s``: a
    per-tensor scale, one per row ``[N, 1]``, or a block grid).

    With a handful of rows (the AdaLN modulation Linears: one per image in the batch) a Linear
    only streams its weight: reading it as FP8 halves the bytes, and keeping the activations in
    BF16 spares the quantization launch. Weight-only FP8 here, so these layers are a little more
    accurate than the W8A8 GEMMs of the rest.
    """
    m, k = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    blocked = block_size is not None
    _fp8_weight_gemv[(triton.cdiv(n, _GEMV_BLOCK_N),)](
        x, weight, scale, bias if bias is not None else y, y, m, n, k, x.stride(0), weight.stride(0),
        scale.stride(0) if blocked else 0, y.stride(0),
        HAS_BIAS=bias is not None, BLOCKED=blocked, PER_ROW=not blocked and scale.numel() > 1,
        BLOCK_M=GEMV_MAX_ROWS, BLOCK_N=_GEMV_BLOCK_N,
        BLOCK_K=_GEMV_BLOCK_K, SCALE_BN=block_size[0] if blocked else 1, SCALE_BK=block_size[1] if blocked else 1,
        num_warps=4, num_stages=4,
    )
    return y


@functools.lru_cache(maxsize=None)
def _launch_shape(group: int) -> tuple[int, int]:
    block = triton.next_power_of_2(group)
    return block, max(1, min(16, block // 256))


@torch.library.custom_op("omni_fp8::fp8_weight_gemv", mutates_args=())
def fp8_weight_gemv_op(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int
) -> torch.Tensor:
    """``fp8_weight_gemv`` as a custom op for ``torch.compile`` (``block_n`` 0: per-tensor scale)."""
    return fp8_weight_gemv(x, weight, scale, bias, (block_n, block_k) if block_n else None)


@fp8_weight_gemv_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16)
