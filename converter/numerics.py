"""The FP8 arithmetic: the only place in omni-fp8 where a weight becomes FP8.

The converter and the runtime both call these functions, so a checkpoint converted offline and a
model quantized while loading hold the same bits.

The contract (E4M3FN, largest finite value 448):

* per tensor: ``s = max(amax(|W|) / 448, 2**-126)`` in float32 (``1.0`` when amax is 0),
  ``q = round_to_nearest_even(clamp(W_fp32 / s, -448, 448))``; stored as ``weight_scale = s``.
  The floor is float32's smallest normal number: below it ``amax / 448`` would round to a
  subnormal with too few bits (or to 0), and ``W / s`` would saturate or become NaN. At the floor
  the scale is a power of two, so ``W / s`` is exact and ``q`` is within one FP8 rounding step of
  ``W / s``. Every finite input therefore gets a finite, positive scale;
* per ``(bn, bk)`` block: the same for every block (edge blocks are partial), stored as the
  float32 grid ``weight_scale_inv`` of shape ``[ceil(N / bn), ceil(K / bk)]``;
* dequantization is ``q * s`` in both cases;
* static activations (a calibrated ``input_scale``): ``s_x = max(amax / 448, 2**-126)`` in
  float32 from the calibration's amax (which must be finite and positive), and
  ``x_q = RNE(clamp(x_fp32 / s_x, -448, 448))`` for every token alike: values beyond the
  calibrated range saturate at +-448 rather than overflow;
* a fused group (``to_q``/``to_k``/``to_v`` that an engine loads as one ``to_qkv``) shares one
  per-tensor scale, ``s = max(max_i amax(|W_i|) / 448, 2**-126)``: the scale of the concatenated
  weight, so each part's ``q`` is exactly the matching rows of the fused tensor's ``q``, and an
  engine that requantizes the parts to their largest scale changes no bits.

The work goes through a small float32 scratch buffer a chunk at a time: the obvious one-liner
materialises two full float32 copies of the weight and runs several times slower on a CPU.
"""

from __future__ import annotations

import math

import torch

from .errors import CalibrationError, CorruptScaleError, DtypeRangeError, NonFiniteWeightError

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "MIN_SCALE",
    "HIGH_PRECISION_DTYPES",
    "block_scale_shape",
    "quantize_weight",
    "quantize_per_tensor",
    "weight_amax",
    "shared_scale",
    "quantize_blockwise",
    "quantize_per_channel",
    "dequantize_weight",
    "quantize_activation",
    "activation_scale",
    "quantize_activation_static",
    "cast_checked",
    "check_scale",
    "has_fp8_nan",
    "check_fp8_codes",
    "fp8_nan_error",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = torch.finfo(torch.float32).tiny  # 2**-126, the smallest normal float32
HIGH_PRECISION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Elements per float32 scratch chunk: 4 MiB, small enough to stay in cache, large enough that
# per-op overhead vanishes (measured on 2 CPU cores: 1.5 GB/s of BF16 input vs 0.15 naive).
_CHUNK_ELEMENTS = 1 << 20


def block_scale_shape(shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, int]:
    """Shape of the ``weight_scale_inv`` grid for a ``[N, K]`` weight."""
    n, k = shape
    return math.ceil(n / block_size[0]), math.ceil(k / block_size[1])


def quantize_weight(
    weight: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    *,
    per_channel: bool = False,
    name: str = "weight",
    out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a ``[N, K]`` weight: ``(q, weight_scale)`` or ``(q, weight_scale_inv)``.

    ``name`` only serves the error message when the weight holds NaN or Inf. ``out``, an FP8
    tensor of the weight's shape, receives ``q`` instead of a fresh allocation. ``scale`` (per
    tensor only) is a fused group's ``shared_scale``, used instead of the weight's own.
    ``per_channel`` gives one scale per output row (``weight_scale`` ``[N, 1]``).
    """
    weight = weight.detach()  # quantization is not differentiable; a LoRA merge may pass a graph
    if per_channel:
        if block_size is not None or scale is not None:
            raise ValueError(f"{name}: per-channel scales are each row's own, without blocks or a shared scale")
        return quantize_per_channel(weight, name=name, out=out)
    if block_size is None:
        return quantize_per_tensor(weight, name=name, out=out, scale=scale)
    if scale is not None:
        raise ValueError(f"{name}: a shared scale is per tensor; block scales are each block's own")
    return quantize_blockwise(weight, block_size, name=name, out=out)


def weight_amax(weight: torch.Tensor, *, name: str = "weight") -> torch.Tensor:
    """``max(|W|)`` as float32 (0-dim), refusing NaN or Inf: one input of ``shared_scale``."""
    _check_weight(weight, name)
    return _amax(weight.contiguous(), name)


def shared_scale(amaxes: list[torch.Tensor]) -> torch.Tensor:
    """The one per-tensor scale of a fused group: the scale of the parts concatenated.

    ``max(|cat(W_i)|) == max_i max(|W_i|)`` exactly, so this equals the scale
    ``quantize_per_tensor`` gives the fused weight, bit for bit.
    """
    if not amaxes:
        raise ValueError("a fused group needs at least one part")
    return _scale_from_amax(torch.stack([a.to(torch.float32).reshape(()) for a in amaxes]).amax())


def quantize_per_tensor(
    weight: torch.Tensor,
    *,
    name: str = "weight",
    out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One float32 scale for the whole tensor; returns ``(q, scale)``, ``scale`` 0-dim float32.

    With ``scale`` given (a fused group's ``shared_scale``, at least this weight's own), ``q`` is
    ``RNE(clamp(W / scale))`` with that scale.
    """
    _check_weight(weight, name)
    weight = weight.contiguous()
    if scale is None:
        scale = _scale_from_amax(_amax(weight, name))
    else:
        scale = scale.to(device=weight.device, dtype=torch.float32).reshape(())
    flat = weight.view(-1)
    q = _output(weight, out).view(-1)
    scratch = torch.empty(min(_CHUNK_ELEMENTS, flat.numel()), dtype=torch.float32, device=weight.device)
    divisor = scale.reshape(1)  # 1-d, so the division promotes to float32 instead of the weight's dtype
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        stop = min(start + _CHUNK_ELEMENTS, flat.numel())
        _to_fp8(flat[start:stop], divisor, scratch[: stop - start], q[start:stop])
    return q.view(weight.shape), scale


def quantize_blockwise(
    weight: torch.Tensor, block_size: tuple[int, int], *, name: str = "weight", out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One float32 scale per ``(bn, bk)`` block; returns ``(q, scale_inv)`` with the scale grid."""
    _check_weight(weight, name)
    weight = weight.contiguous()
    n, k = weight.shape
    bn, bk = block_size
    grid_n, grid_k = block_scale_shape((n, k), block_size)
    full_k = (k // bk) * bk  # columns covered by whole blocks; the rest is one partial block
    q = _output(weight, out)
    scales = torch.empty((grid_n, grid_k), dtype=torch.float32, device=weight.device)
    scratch = torch.empty(min(bn, n) * k, dtype=torch.float32, device=weight.device)
    for row in range(grid_n):
        r0, r1 = row * bn, min((row + 1) * bn, n)
        rows, q_rows = weight[r0:r1], q[r0:r1]
        buf = scratch[: (r1 - r0) * k].view(r1 - r0, k)
        buf.copy_(rows)
        if full_k:
            blocks = buf[:, :full_k].view(r1 - r0, full_k // bk, bk)
            row_scales = _scale_from_amax(_block_amax(blocks, name))
            scales[row, : full_k // bk] = row_scales
            blocks.div_(row_scales.view(1, -1, 1))
        if full_k < k:
            tail = buf[:, full_k:]
            tail_scale = _scale_from_amax(_amax(tail, name))
            scales[row, -1] = tail_scale
            tail.div_(tail_scale)
        buf.clamp_(-FP8_MAX, FP8_MAX)
        q_rows.copy_(buf)  # the float32 -> float8_e4m3fn cast rounds to nearest even
    return q, scales


def quantize_per_channel(
    weight: torch.Tensor, *, name: str = "weight", out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One float32 scale per output row (``[N, 1]``): the per-tensor rule applied to each row.

    The layout vLLM's compressed-tensors and ModelOpt checkpoints use; a row-wise FP8 GEMM takes
    these scales in its epilogue at no cost.
    """
    _check_weight(weight, name)
    weight = weight.contiguous()
    n, k = weight.shape
    q = _output(weight, out)
    scales = torch.empty((n, 1), dtype=torch.float32, device=weight.device)
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    scratch = torch.empty(min(rows, n) * k, dtype=torch.float32, device=weight.device)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        buf = scratch[: (r1 - r0) * k].view(r1 - r0, k)
        buf.copy_(weight[r0:r1])
        amax = torch.maximum(buf.amax(dim=1, keepdim=True), buf.amin(dim=1, keepdim=True).neg())
        if not torch.isfinite(amax).all():
            raise _non_finite(name)
        row_scales = _scale_from_amax(amax)
        scales[r0:r1] = row_scales
        buf.div_(row_scales).clamp_(-FP8_MAX, FP8_MAX)
        q[r0:r1].copy_(buf)
    return q, scales


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``q * scale`` (per tensor, or per row with a ``[N, 1]`` scale) or ``q * scale_inv`` expanded
    over its blocks, cast to ``dtype``."""
    out = q.to(torch.float32)
    if block_size is None:
        out.mul_(scale.to(torch.float32))
    else:
        bn, bk = block_size
        n, k = q.shape
        expanded = scale.to(torch.float32).repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        out.mul_(expanded)
    return out.to(dtype)


def quantize_activation(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: one scale per token (row), or per ``group_size`` columns.

    The weight rule along the last dim: ``s = max(amax(|x|) / 448, 2**-126)`` in float32 (1 for
    an all-zero row or group), ``q = RNE(clamp(x_fp32 / s))``. Returns ``q`` (shape of ``x``) and the scales,
    ``[..., 1]`` per token or ``[..., ceil(K / group_size)]`` per group (the last one partial).
    Block-scaled weights pair with per-group activations (groups of the weight's block width), as
    DeepSeek-style FP8 GEMMs do.
    Plain tensor ops: ``torch.compile`` fuses them into the op that produced ``x``, and every
    device computes the same bits.
    """
    x32 = x.to(torch.float32)
    k = x.shape[-1]
    if group_size is not None:  # [..., G, group]; a partial last group is padded with zeros
        groups = -(-k // group_size)
        x32 = torch.nn.functional.pad(x32, (0, groups * group_size - k)).unflatten(-1, (groups, group_size))
    scale = _scale_from_amax(x32.abs().amax(dim=-1, keepdim=True))
    q = (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    if group_size is None:
        return q, scale
    return q.flatten(-2)[..., :k], scale.squeeze(-1)


def activation_scale(amax: torch.Tensor | float, *, name: str = "input") -> torch.Tensor:
    """A static ``input_scale`` (0-dim float32) from a calibrated activation amax.

    Unlike a weight's, an activation amax of 0 or a non-finite one has no meaningful scale: 0
    means the layer never saw a non-zero input during calibration, so any scale is a guess, and
    an infinite one means the recorded run overflowed. Both are refused, naming the layer.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    value = float(amax)
    if not math.isfinite(value) or value <= 0:
        raise CalibrationError(
            f"{name}: calibrated activation amax is {value!r}, which gives no FP8 input scale (the layer saw "
            f"{'only zeros' if value == 0 else 'non-finite values'} during calibration); keep it dynamic with "
            "--static-ignored-layers, or calibrate on other inputs."
        )
    return _divide(amax, FP8_MAX).clamp_min(MIN_SCALE)


def quantize_activation_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static activation quantization: ``RNE(clamp(x_fp32 / input_scale, -448, 448))`` as FP8.

    One stored scale for every token, so there is no reduction over ``x`` before the GEMM; values
    beyond the calibrated range saturate. ``input_scale`` is a float32 tensor on ``x``'s device
    (a tensor divisor: true division on every device, see ``_divide``).
    """
    return (x.to(torch.float32) / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _check_weight(weight: torch.Tensor, name: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{name}: FP8 weights must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in HIGH_PRECISION_DTYPES:
        raise ValueError(f"{name}: cannot quantize a {weight.dtype} tensor; expected BF16, FP16 or FP32")


def _output(weight: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    if out.dtype != FP8_DTYPE or out.shape != weight.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {FP8_DTYPE} tensor of shape {tuple(weight.shape)}")
    return out


def _amax(values: torch.Tensor, name: str) -> torch.Tensor:
    """max(|values|) as a float32 0-dim tensor, without materialising |values|."""
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=values.device)
    lo, hi = torch.aminmax(values)
    amax = torch.maximum(lo.float().neg(), hi.float())
    if not torch.isfinite(amax):
        raise _non_finite(name)
    return amax


def _block_amax(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """Per-block max(|x|) over a ``[rows, n_blocks, bk]`` float32 view: one value per block."""
    amax = torch.maximum(blocks.amax(dim=(0, 2)), blocks.amin(dim=(0, 2)).neg())
    if not torch.isfinite(amax).all():
        raise _non_finite(name)
    return amax


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    # An all-zero tensor gets scale 1, so q = 0 and q * s = 0. The floor keeps tiny (subnormal)
    # amaxes from giving a zero or few-bit scale (see the module docstring).
    amax = amax.to(torch.float32)
    scale = _divide(amax, FP8_MAX).clamp_min(MIN_SCALE)
    return torch.where(amax == 0, torch.ones_like(amax), scale)


def _divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor`` rounded to nearest, on every device.

    On CUDA, torch divides by a Python number as a multiplication by its reciprocal, which can
    differ in the last bit (measured on an H200: the scales of GPU-quantized weights did not
    match the CPU's). A divisor tensor on ``x``'s device gets a true division everywhere.
    """
    return x / torch.full((), divisor, dtype=torch.float32, device=x.device)


def _to_fp8(src: torch.Tensor, divisor: torch.Tensor, scratch: torch.Tensor, out: torch.Tensor) -> None:
    torch.div(src, divisor, out=scratch)  # upcast and divide in one pass: exactly W_fp32 / s
    scratch.clamp_(-FP8_MAX, FP8_MAX)
    out.copy_(scratch)


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype, *, name: str) -> torch.Tensor:
    """``tensor.to(dtype)``, refusing a cast that would turn finite values into +-inf.

    Casting to a float dtype of smaller range (FP32 or BF16 to FP16, FP32 to BF16 at the very
    top) overflows silently in torch; a kept norm weight of 1e6 would become inf and every
    output NaN. Casts that cannot overflow cost nothing extra.
    """
    if tensor.dtype == dtype or not (tensor.is_floating_point() and dtype.is_floating_point):
        return tensor.to(dtype)
    out = tensor.to(dtype)
    if torch.finfo(dtype).max < torch.finfo(tensor.dtype).max and tensor.numel():
        created = int(torch.isinf(out).sum()) - int(torch.isinf(tensor).sum())
        if created > 0:
            lo, hi = torch.aminmax(tensor[torch.isfinite(tensor)].float())
            largest = max(abs(float(lo)), abs(float(hi)))
            raise DtypeRangeError(
                f"{name}: holds {largest:.4g}, beyond {_dtype_words(dtype)}'s largest value "
                f"{torch.finfo(dtype).max:.6g}, so casting it to {_dtype_words(dtype)} would give inf "
                f"({created} value{'s' * (created != 1)}); keep its dtype (--dtype keep) or choose a wider one."
            )
    return out


def check_scale(scale: torch.Tensor, *, name: str, where: str) -> None:
    """Refuse a stored scale that is not finite and positive: the contract never writes one.

    A damaged or hand-edited file could hold inf, NaN, zero or a negative scale; loaded as is,
    the layer would output NaN or flipped signs without a word.
    """
    if scale.dtype != torch.float32:
        raise CorruptScaleError(f"{where}: {name} is {scale.dtype}, not float32; the checkpoint is damaged.")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        value = float(scale.reshape(-1)[bad.reshape(-1)][0])
        raise CorruptScaleError(
            f"{where}: {name} holds {value!r}; FP8 scales must be finite and positive, so the checkpoint is "
            "damaged or was edited. Re-download it or convert it again."
        )


def has_fp8_nan(q: torch.Tensor) -> bool:
    """Whether an E4M3FN tensor holds a NaN code; the quantizer never writes one.

    The two NaN codes, ``0x7F`` and ``0xFF``, are the largest values of the bytes read as int8
    and as uint8, so two max-reductions find them without any temporary (about 25 GB/s on 2 CPU
    cores, a tenth of the copy a load makes anyway).
    """
    if q.numel() == 0:
        return False
    return int(q.view(torch.int8).amax()) == 0x7F or int(q.view(torch.uint8).amax()) == 0xFF


def check_fp8_codes(q: torch.Tensor, *, name: str, where: str) -> None:
    """Refuse an FP8 weight holding NaN codes (``has_fp8_nan``), naming it and its file."""
    if has_fp8_nan(q):
        raise fp8_nan_error(name, where)


def fp8_nan_error(name: str, where: str) -> CorruptScaleError:
    return CorruptScaleError(
        f"{where}: {name} holds FP8 NaN codes, which no quantizer writes; the file is damaged. "
        "Re-download it or convert again."
    )


def _dtype_words(dtype: torch.dtype) -> str:
    return {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def _non_finite(name: str) -> NonFiniteWeightError:
    return NonFiniteWeightError(
        f"{name}: the weight holds NaN or Inf, so it has no FP8 scale; the checkpoint is damaged "
        "(re-download or re-export it), or keep this layer in high precision with --ignored-layers."
    )
