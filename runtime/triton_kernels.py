"""The Triton kernels: activation quantization in one launch, an FP8-weight GEMV for few rows, and
for ``fuse_blocks_`` AdaLN modulation and QK-norm with RoPE.

``numerics.quantize_activation`` written in plain torch launches about seven kernels per call
(upcast, abs, amax, where, divide, clamp, cast), each one more launch per Linear in eager mode.
This kernel reads each row once and writes the FP8 row and its scale(s): one launch, same bits
(divisions rounded to nearest, as torch's are; the float32 -> E4M3 cast is round-to-nearest-even
and saturating, after the clamp). Under ``torch.compile`` the plain-torch version is used
instead, so Inductor fuses it into the op that produced the activations.

The GEMV and the QK-norm/RoPE kernel are also custom ops with fake implementations, so compiled
graphs can call them.
"""

from __future__ import annotations

import functools

import torch

from omni_fp8.converter.numerics import FP8_DTYPE, FP8_MAX, MIN_SCALE

__all__ = ["HAVE_TRITON", "quantize_activation_cuda", "fp8_weight_gemv", "gemv_supports", "GEMV_MAX_ROWS",
           "modulate_cuda", "quantize_activation_static_cuda", "qk_norm_rope_cuda", "qk_norm_rope_supports"]

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
            if BLOCK_M == 1:  # one row (one image): multiply-adds on the weight as loaded, no tensor-core layout
                part = tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
            else:
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


    @triton.jit
    def _round_to_bf16(v):
        """float32 -> the nearest BF16 value (ties to even), still as float32 (finite inputs)."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _quantize_static(x_ptr, s_ptr, q_ptr, N, BLOCK: tl.constexpr, FP8_LIMIT: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, tl.load(s_ptr)), -FP8_LIMIT), FP8_LIMIT)
        tl.store(q_ptr + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def _modulate_rows(
        x_ptr, shift_ptr, scale_ptr, y_ptr, q_ptr, s_ptr, K, rows_per_sample, stride_x, stride_mod,
        BLOCK: tl.constexpr, QUANT: tl.constexpr, FP8_LIMIT: tl.constexpr, MIN_SCALE: tl.constexpr,
    ):
        row = tl.program_id(0)
        sample = row // rows_per_sample
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + sample * stride_mod + offs, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + sample * stride_mod + offs, mask=mask, other=0.0).to(tl.float32)
        # Eager torch's roundings: each BF16 op of x * (1 + scale) + shift rounded to BF16 in turn.
        # Each intermediate rounded to BF16 with integer arithmetic: a float round trip
        # (.to(bf16).to(f32)) may be folded away by the compiler, which then fuses the multiply and
        # add into one FMA, one rounding instead of torch's three (measured on an H200).
        one_plus = _round_to_bf16(1.0 + scale)
        y = _round_to_bf16(x * one_plus)
        y = (y + shift).to(tl.bfloat16, fp_downcast_rounding="rtne")
        tl.store(y_ptr + row * K + offs, y, mask=mask)
        if QUANT:  # _quantize_rows on the BF16 result, per token
            v = y.to(tl.float32)
            amax = tl.max(tl.abs(v), axis=0)
            s = tl.where(amax == 0.0, 1.0, tl.maximum(tl.math.div_rn(amax, FP8_LIMIT), MIN_SCALE))
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, s), -FP8_LIMIT), FP8_LIMIT)
            tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
            tl.store(s_ptr + row, s)


    @triton.jit
    def _rms_rope_heads(x, xp, w, wp, cos, sin, even, eps, D: tl.constexpr, ROPE_FMA: tl.constexpr):
        """diffusers' RMSNorm and then its RoPE (complex multiplication) on ``x`` [heads, D] (float32
        from BF16), ``xp`` holding each element's pair partner (``x[..., d ^ 1]``) and ``wp`` the
        weight's: ``x * rsqrt(mean(x^2) + eps)`` rounded to BF16, times the BF16 weight rounded
        again, rotated in float32 with ``cos``/``sin`` [D] (each pair's, repeated)."""
        r = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        y = _round_to_bf16(_round_to_bf16(x * r) * w)
        yp = _round_to_bf16(_round_to_bf16(xp * r) * wp)
        # (a + ib)(c + is) as c10::complex writes it: a*c - b*s at even d (y = a, yp = b), a*s + b*c
        # at odd d (y = b, yp = a). Compiled without FMA contraction: ROPE_FMA alone says which
        # product, if any, is fused into the sum (the choice torch's own kernel was compiled with).
        if ROPE_FMA == 1:  # fma(a, c, -(b*s)), fma(a, s, b*c)
            out = tl.where(even, tl.fma(y, cos, -(yp * sin)), tl.fma(yp, sin, y * cos))
        elif ROPE_FMA == 2:  # fma(-b, s, a*c), fma(b, c, a*s)
            out = tl.where(even, tl.fma(-yp, sin, y * cos), tl.fma(y, cos, yp * sin))
        else:
            out = tl.where(even, y * cos - yp * sin, yp * sin + y * cos)
        return out

    @triton.jit
    def _qk_norm_rope(
        q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, cs_ptr, oq_ptr, ok_ptr, ov_ptr, S, stride_b, stride_s,
        cs_stride_b, cs_stride_s, out_stride_b, out_offset, eps,
        H: tl.constexpr, D: tl.constexpr, HEADS: tl.constexpr, COPY_V: tl.constexpr, ROPE_FMA: tl.constexpr,
    ):
        # One token of one stream and HEADS of its heads per program: q and k normed and rotated,
        # and (with COPY_V) v copied, each written to row ``out_offset + s`` of the [B, S_out, H, D]
        # output. Plain 2-D tiles: each element's RoPE partner is a second load of the same lines.
        pid = tl.program_id(0)
        b = pid // S
        s = pid - b * S
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = (h < H) & (d < D)
        src = b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + h * D
        dst = b.to(tl.int64) * out_stride_b + (out_offset + s).to(tl.int64) * (H * D) + h * D + d
        partner = d ^ 1
        even = (d & 1) == 0
        cs = cs_ptr + b.to(tl.int64) * cs_stride_b + s.to(tl.int64) * cs_stride_s + (d >> 1) * 2
        cos, sin = tl.load(cs), tl.load(cs + 1)
        xq = tl.load(q_ptr + src + d, mask=mask, other=0.0).to(tl.float32)
        xqp = tl.load(q_ptr + src + partner, mask=mask, other=0.0).to(tl.float32)
        xk = tl.load(k_ptr + src + d, mask=mask, other=0.0).to(tl.float32)
        xkp = tl.load(k_ptr + src + partner, mask=mask, other=0.0).to(tl.float32)
        if COPY_V:
            tl.store(ov_ptr + dst, tl.load(v_ptr + src + d, mask=mask), mask=mask)
        wq, wqp = tl.load(wq_ptr + d).to(tl.float32), tl.load(wq_ptr + partner).to(tl.float32)
        wk, wkp = tl.load(wk_ptr + d).to(tl.float32), tl.load(wk_ptr + partner).to(tl.float32)
        yq = _rms_rope_heads(xq, xqp, wq, wqp, cos, sin, even, eps, D, ROPE_FMA)
        tl.store(oq_ptr + dst, yq.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)
        yk = _rms_rope_heads(xk, xkp, wk, wkp, cos, sin, even, eps, D, ROPE_FMA)
        tl.store(ok_ptr + dst, yk.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)

_STATIC_BLOCK = 2048


def quantize_activation_static_cuda(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """``numerics.quantize_activation_static`` for a CUDA tensor in one launch: plain torch runs
    it as four kernels through a float32 copy of the activation (upcast, divide, clamp, cast), which
    made a static eager step slower than a dynamic one. Same bits (rounded division, clamp, RNE)."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    n = x.numel()
    if n:
        key = (x.device.index, x.dtype, n % 16 == 0, x.data_ptr() % 16 == 0)
        _STATIC.launch(key, (triton.cdiv(n, _STATIC_BLOCK), 1), (x, input_scale, q, n),
                       {"BLOCK": _STATIC_BLOCK, "FP8_LIMIT": FP8_MAX}, num_warps=4)
    return q


def modulate_cuda(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, quantize: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """AdaLN's ``x * (1 + scale) + shift`` in one launch, and with ``quantize`` the result's
    per-token FP8 codes and scales (``[B*S, K]``, ``[B*S, 1]``), as ``quantize_activation_cuda``
    gives them.

    ``x`` is ``[B, S, K]`` BF16 (the LayerNorm's output), ``shift``/``scale`` ``[B, K]`` (views
    with any row stride, as ``chunk`` leaves them). Eager torch runs this as three launches plus
    the quantization's, each reading and writing the activation; here it is read once and
    written once (plus its FP8 copy), with the same roundings, so the same bits.
    """
    b, rows, k = x.shape
    x2 = x.reshape(b * rows, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((b * rows, k), dtype=torch.bfloat16, device=x.device)
    q = torch.empty((b * rows, k), dtype=FP8_DTYPE, device=x.device) if quantize else None
    s = torch.empty((b * rows, 1), dtype=torch.float32, device=x.device) if quantize else None
    if shift.stride(-1) != 1 or scale.stride(-1) != 1 or (b > 1 and shift.stride(0) != scale.stride(0)):
        shift, scale = shift.contiguous(), scale.contiguous()
    if b * rows:
        block, warps = _launch_shape(k)
        stride_mod = shift.stride(0) if b > 1 else 0
        key = (x.device.index, k, rows, x2.stride(0), stride_mod, quantize,
               x2.data_ptr() % 16 == 0, shift.data_ptr() % 16 == 0, scale.data_ptr() % 16 == 0)
        _MODULATE.launch(
            key, (b * rows, 1), (x2, shift, scale, y, q if quantize else y, s if quantize else y, k, rows,
                                 x2.stride(0), stride_mod),
            {"BLOCK": block, "QUANT": quantize, "FP8_LIMIT": FP8_MAX, "MIN_SCALE": MIN_SCALE}, num_warps=warps,
        )
    return y.view(b, rows, k), q, s


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
    # Two plain allocations: measured on an H200 host, cheaper than one allocation cut into
    # views (each view is a dispatcher call too). The allocator aligns both as cuBLASLt wants.
    shape, strides = _scale_layout(rows, groups, group_size)
    q = torch.empty((rows, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty_strided(shape, strides, dtype=torch.float32, device=x.device)
    if rows:
        block, warps = _launch_shape(group)
        key = (x.device.index, m == 1, m % 16 == 0, rows, k, group_size, x.data_ptr() % 16 == 0)
        _QUANTIZE.launch(
            key, (rows, groups), (x, q, s, m, k, group, x.stride(0), k, strides[0], strides[1] if group_size else 0),
            {"BLOCK": block, "FP8_LIMIT": FP8_MAX, "MIN_SCALE": MIN_SCALE}, num_warps=warps,
        )
    return q, s


GEMV_MAX_ROWS = 16
# Tiles (rows of the weight, columns, warps, stages): several rows through tensor cores, and one
# row (one image, the common case) as plain multiply-adds on the loaded weight.
_GEMV_TILE = (64, 128, 4, 4)
_GEMV_ONE_ROW_TILE = (32, 256, 4, 3)  # 1x18432x3072 on an H200: 21.0 us against 29.1 (bench/gemm_shapes.py)
_GEMV_ONE_ROW_BLOCKED_TILE = (32, 128, 4, 3)  # a tile must not straddle a 128x128 scale block


def gemv_supports(block_size: tuple[int, int] | None) -> bool:
    """Whether ``fp8_weight_gemv`` takes weights of this scheme (block edges must align with its tiles)."""
    return HAVE_TRITON and (block_size is None or all(
        block_size[0] % tile[0] == 0 and block_size[1] % tile[1] == 0
        for tile in (_GEMV_TILE, _GEMV_ONE_ROW_BLOCKED_TILE)))


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
    per_row = not blocked and scale.numel() > 1
    stride_s = scale.stride(0) if blocked else 0
    key = (x.device.index, m == 1, m % 16 == 0, n, k, weight.stride(0), stride_s, bias is not None, blocked, per_row, block_size,
           x.data_ptr() % 16 == 0, weight.data_ptr() % 16 == 0, scale.data_ptr() % 16 == 0,
           bias is None or bias.data_ptr() % 16 == 0)
    one_row = _GEMV_ONE_ROW_BLOCKED_TILE if blocked else _GEMV_ONE_ROW_TILE
    block_n, block_k, warps, stages = one_row if m == 1 else _GEMV_TILE
    _GEMV.launch(
        key, (triton.cdiv(n, block_n), 1),
        (x, weight, scale, bias if bias is not None else y, y, m, n, k, x.stride(0), weight.stride(0), stride_s,
         y.stride(0)),
        {"HAS_BIAS": bias is not None, "BLOCKED": blocked, "PER_ROW": per_row, "BLOCK_M": 1 if m == 1 else GEMV_MAX_ROWS,
         "BLOCK_N": block_n, "BLOCK_K": block_k, "SCALE_BN": block_size[0] if blocked else 1,
         "SCALE_BK": block_size[1] if blocked else 1},
        num_warps=warps, num_stages=stages,
    )
    return y


class _Launcher:
    """Launch a Triton kernel for a call pattern seen before without Triton's per-call binding.

    ``kernel[grid](...)`` re-derives the arguments' specialization (which integers are 1 or
    multiples of 16, which pointers are 16-byte aligned), hashes it and looks the compiled kernel
    up on every call: measured on an H200 host, half of an FP8 Linear's eager host time. The
    caller names the call pattern with a ``key`` that fixes everything the specialization depends
    on; the first call of a pattern goes through Triton and keeps the compiled kernel, later ones
    call its launcher directly, as Triton itself does after the lookup. If that entry point is not
    the one this Triton has (a launcher that takes different arguments), every call goes through
    Triton. While a launch hook is set (torch.profiler sets one while it records), patterns seen
    for the first time go through Triton, so the hook sees them, and are kept once it is gone: a
    profiled step does not leave the rest of the process on the slow path.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: dict[tuple, tuple] = {}
        self.direct = True
        self.why_not: str | None = None  # why Triton's own launch path is used, if it is

    def launch(self, key: tuple, grid: tuple[int, int], args: tuple, constexprs: dict, **options) -> None:
        entry = self.compiled.get(key) if self.direct else None
        if entry is not None:
            run, function, metadata, tail = entry
            try:
                run(grid[0], grid[1], 1, torch._C._cuda_getCurrentRawStream(args[0].device.index), function,
                    metadata, None, None, None, *args, *tail)
                return
            except TypeError as e:  # a launcher with another signature: Triton's own path from now on
                self.direct, self.why_not = False, f"{type(e).__name__}: {e}"
        compiled = self.kernel[grid](*args, **constexprs, **options)
        if self.direct:
            self._keep(key, compiled, constexprs)

    def _keep(self, key: tuple, compiled, constexprs: dict) -> None:
        try:
            from triton import knobs

            hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
            names = list(self.kernel.arg_names)
            tail = tuple(constexprs[n] for n in names[len(names) - len(constexprs):])
            entry = (compiled.run, compiled.function, compiled.packed_metadata, tail)
        except (ImportError, AttributeError, KeyError, TypeError) as e:
            self.direct, self.why_not = False, f"{type(e).__name__}: {e}"  # a Triton without this entry point
            return
        if not all(_no_hook(h) for h in hooks):
            return  # kept at a later call, once the hook is gone
        if len(self.compiled) < 4096:
            self.compiled[key] = entry


def _no_hook(hook) -> bool:
    """Whether a Triton launch hook slot is empty: ``None``, or an empty hook chain (Triton >= 3.5
    keeps a chain object there, never ``None``)."""
    if hook is None:
        return True
    for attr in ("calls", "hooks", "_hooks"):
        value = getattr(hook, attr, None)
        if isinstance(value, list):
            return not value
    try:
        return len(hook) == 0
    except TypeError:
        return False  # a hook of a kind not known here: let Triton call it


if HAVE_TRITON:
    _QUANTIZE = _Launcher(_quantize_rows)
    _GEMV = _Launcher(_fp8_weight_gemv)
    _MODULATE = _Launcher(_modulate_rows)
    _STATIC = _Launcher(_quantize_static)


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


# Which product of RoPE's complex multiplication is fused into its sum (see _rms_rope_heads): the
# one that gives torch's bits on an H200 (tests/test_gpu_fused_blocks.py compares all three).
_ROPE_FMA = 1
_QK_HEADS = 8  # heads per program: [8, 128] tiles, Qwen-Image's 24 heads in 3 programs per token
QK_NORM_ROPE_MAX_HEADS = 128


def qk_norm_rope_supports(q: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                          cos_sin: torch.Tensor) -> bool:
    """Whether ``qk_norm_rope_cuda`` takes ``q`` [B, S, H, D] with these RMSNorm weights and
    ``cos_sin`` (``view_as_real`` of the complex frequencies, [S, D/2, 2] or [B, S, D/2, 2]): BF16
    on a CUDA GPU, BF16 weights, a power-of-two head size. No autograd: it has no backward."""
    if not (HAVE_TRITON and q.is_cuda and q.dtype == torch.bfloat16 and q.dim() == 4 and not torch.is_grad_enabled()):
        return False
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1) or q.shape[-2] > QK_NORM_ROPE_MAX_HEADS:
        return False
    if any(w.dtype != torch.bfloat16 or w.shape != (d,) for w in (q_weight, k_weight)):
        return False
    return (cos_sin.dtype == torch.float32 and cos_sin.dim() in (3, 4) and cos_sin.shape[-2:] == (d // 2, 2)
            and cos_sin.shape[-3] == q.shape[1] and (cos_sin.dim() == 3 or cos_sin.shape[0] in (1, q.shape[0])))


def qk_norm_rope_cuda(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
                      q_weights: list[torch.Tensor], k_weights: list[torch.Tensor], cos_sins: list[torch.Tensor],
                      eps: float) -> list[torch.Tensor]:
    """QK-RMSNorm and RoPE of one or more streams, written straight into the attention's inputs.

    Stream ``i`` is ``qs[i]``, ``ks[i]`` (and ``vs[i]`` if ``vs`` is given), each [B, S_i, H, D]
    BF16 (views of a fused projection's output are fine), normed with ``q_weights[i]`` /
    ``k_weights[i]`` and rotated with ``cos_sins[i]`` (``qk_norm_rope_supports``). Returns the
    joint [B, sum S_i, H, D] query and key, streams in order (Qwen-Image: text, then image), and
    the joint value when ``vs`` is given. diffusers runs this as about twenty kernels per stream in
    eager mode (the norms' float32 steps, the complex RoPE, the concatenating copies) and Inductor
    as one kernel per tensor that reads and writes in its own layout; here it is one launch per
    stream that reads q, k, v once and writes them once. Same roundings as torch: the variance's
    float32 sum is ordered differently, which can move a value by one BF16 step, rarely.
    """
    b, _, h, d = qs[0].shape
    total = sum(q.shape[1] for q in qs)
    out_q = torch.empty((b, total, h, d), dtype=torch.bfloat16, device=qs[0].device)
    out_k = torch.empty_like(out_q)
    out_v = torch.empty_like(out_q) if vs else None
    offset = 0
    for i, q in enumerate(qs):
        k, v = ks[i], (vs[i] if vs else q)
        if not (q.stride()[:2] == k.stride()[:2] == v.stride()[:2] and q.stride()[2:] == k.stride()[2:]
                == v.stride()[2:] == (d, 1)):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        cs = cos_sins[i]
        if cs.stride()[-2:] != (2, 1):
            cs = cs.contiguous()
        seq = q.shape[1]
        cs_stride_b = cs.stride(0) if cs.dim() == 4 and cs.shape[0] > 1 else 0
        wq, wk = q_weights[i].contiguous(), k_weights[i].contiguous()
        if b * seq:
            args = (q, k, v, wq, wk, cs, out_q, out_k, out_v if vs else out_q, seq, q.stride(0), q.stride(1),
                    cs_stride_b, cs.stride(-3), total * h * d, offset, float(eps))
            key = (q.device.index, seq, q.stride(0), q.stride(1), cs_stride_b, cs.stride(-3), total, offset, h, d,
                   bool(vs), _ROPE_FMA, *(t.data_ptr() % 16 == 0 for t in args[:9]))
            heads = min(_QK_HEADS, triton.next_power_of_2(h))
            _QK_NORM_ROPE.launch(
                key, (b * seq, triton.cdiv(h, heads)), args,
                {"H": h, "D": d, "HEADS": heads, "COPY_V": bool(vs), "ROPE_FMA": _ROPE_FMA},
                num_warps=4, enable_fp_fusion=False,
            )
        offset += seq
    return [out_q, out_k] + ([out_v] if vs else [])


if HAVE_TRITON:
    _QK_NORM_ROPE = _Launcher(_qk_norm_rope)


@torch.library.custom_op("omni_fp8::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
                    q_weights: list[torch.Tensor], k_weights: list[torch.Tensor], cos_sins: list[torch.Tensor],
                    eps: float) -> list[torch.Tensor]:
    """``qk_norm_rope_cuda`` as a custom op for ``torch.compile``."""
    return qk_norm_rope_cuda(qs, ks, vs, q_weights, k_weights, cos_sins, eps)


@qk_norm_rope_op.register_fake
def _(qs, ks, vs, q_weights, k_weights, cos_sins, eps):
    b, _, h, d = qs[0].shape
    shape = (b, sum(q.shape[1] for q in qs), h, d)
    return [qs[0].new_empty(shape) for _ in range(3 if vs else 2)]
