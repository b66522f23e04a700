"""FP8 attention kernels for the speed and quality labs: measured on an H200, not shipped.

Why it was tried: attention is the largest part of a compiled FP8 Qwen-Image step that the FP8
Linears leave in BF16, and published FP8 attention kernels run up to 1.45x faster than the best
BF16 one on Hopper. Why it is not a runtime option: at the models' own shapes it is not faster.
Measured on an H200 (``bench/attention_speed.py``, bench/RESULTS.md "FP8 attention kernels"):
at Qwen-Image 1024x1024 (4352 tokens, 24 heads) cuDNN's BF16 flash attention through SDPA takes
0.40 ms per call (579 TFLOP/s); this Triton kernel alone 0.42 ms, 0.60 ms with its Q/K/V
quantization; cuDNN's own FP8 SDPA 0.64 ms with its quantization. At 1328x1328 the kernels alone
are 1.12x (Triton) and about 1.2x (cuDNN) faster, and the quantization (0.22-0.29 ms) takes that
back. Whole steps were slower with either. The issue's bar was 15% faster than BF16 at equal
quality; what could still get there is writing the E4M3 codes in the kernel that produces Q, K
and V (QK-norm + RoPE), which removes the quantization pass.

Numerics (the quality lab's ``attention.py`` emulation imports them from here, so the lab and the
kernels share one definition):

* Q, K, V are rounded to E4M3 with one scale each per batch item and head (``head``: the Triton
  kernel, FlashAttention-3's descales) or per call (``tensor``: cuDNN's FP8 SDPA); scale =
  amax / 448;
* Q.K^T sums the FP8 products in float32; the softmax runs in float32 (``exp2`` with log2(e)
  folded into the scores' scale);
* the probabilities are rounded to E4M3 with the fixed scale 1/448 before P.V, which sums in
  float32. The kernel rounds them as FlashAttention does, unnormalised against the running row
  maximum (``exp2(s - m) * 448``), and divides by the float32 row sum at the end; the lab rounds
  the normalised probabilities. E4M3 is a floating-point format, so both round each probability
  to the same relative precision (tests/test_attention_fp8.py compares the two on the CPU).

Quality (deep lab, 24 blocks, H200, on top of FP8 Linears): per-head 39.52 dB against 40.05
without FP8 attention, per-tensor 39.14, Sage-style 39.39; all pass the gate. On Hopper, cuDNN's
FP8 SDPA writes its output in E4M3 too (a BF16 output is Blackwell-only in cuDNN 9.19), one more
rounding.

    >>> out = fp8_attention(q, k, v, mask, backend="triton")   # [B, L, H, D] in and out
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omni_fp8.converter.errors import ConfigError

from omni_fp8.runtime.triton_kernels import HAVE_TRITON

__all__ = [
    "BACKENDS",
    "MODES",
    "emulated_sdpa",
    "fp8_attention",
    "fp8_attention_reference",
    "quantize_qkv",
]

MODES = ("tensor", "head", "sage")
BACKENDS = ("triton", "cudnn", "reference")
FP8_MAX = 448.0
SAGE_BLOCK = 64
TINY = torch.finfo(torch.float32).tiny
LOG2E = 1.4426950408889634
LOG2_FP8_MAX = math.log2(FP8_MAX)
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: E4M3 tensor-core MMAs
_PAD = 128  # FP8 codes are padded to this many tokens: every block size divides it


# --------------------------------------------------------------------------- the numerics, in torch


def fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to E4M3 with ``scale`` (broadcast), back in float32: the value an FP8 kernel sees."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 (at least the smallest normal float32); 1 where the values are all zero."""
    return torch.where(amax > 0, (amax / FP8_MAX).clamp_min(TINY), torch.ones_like(amax))


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> tuple[torch.Tensor, ...]:
    """Q, K, V ``[B, H, L, D]`` as ``mode``'s FP8 kernel would hold them (float32 values).

    ``tensor``: one scale each over the whole call; ``head``: one per batch item and head;
    ``sage``: K minus its mean over the tokens (softmax does not change), Q and K scaled per block
    of 64 tokens per head, V per channel (SageAttention-style).
    """
    if mode == "tensor":
        return tuple(fp8_round(t, fp8_scale(t.abs().amax())) for t in (q, k, v))
    if mode == "head":
        return tuple(fp8_round(t, fp8_scale(t.abs().amax(dim=(2, 3), keepdim=True))) for t in (q, k, v))
    if mode != "sage":
        raise ValueError(f"unknown FP8 attention mode {mode!r}; use one of {', '.join(MODES)}")
    k = k - k.mean(dim=2, keepdim=True)  # softmax(q.(k - m)) == softmax(q.k): each row shifts by q.m
    out = []
    for t in (q, k):
        b, h, n, d = t.shape
        pad = (-n) % SAGE_BLOCK
        blocks = torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(b, h, -1, SAGE_BLOCK, d)
        scale = fp8_scale(blocks.abs().amax(dim=(3, 4), keepdim=True))
        out.append(fp8_round(blocks, scale).reshape(b, h, n + pad, d)[:, :, :n])
    out.append(fp8_round(v, fp8_scale(v.abs().amax(dim=2, keepdim=True))))  # per channel of V
    return tuple(out)


def emulated_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                  scale: float | None, mode: str) -> torch.Tensor:
    """SDPA (``[B, H, L, D]``, as ``torch.nn.functional.scaled_dot_product_attention`` takes it)
    with ``mode``'s FP8 numerics, in float32: FP8 Q, K, V; float32 softmax; probabilities rounded
    to E4M3 with the fixed scale 1/448 (they lie in [0, 1]) before P.V."""
    dtype = query.dtype
    q, k, v = quantize_qkv(query.float(), key.float(), value.float(), mode)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    p = torch.softmax(s, dim=-1)
    p = fp8_round(p, torch.tensor(1.0 / FP8_MAX))
    return (p @ v).to(dtype)


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                            mode: str = "head", scale: float | None = None) -> torch.Tensor:
    """``fp8_attention``'s numerics in plain torch (the quality lab's emulation), any device:
    ``[B, L, H, D]`` in and out, ``attn_mask`` a boolean key mask as ``fp8_attention`` takes it."""
    mask = _key_mask(attn_mask, q, k)
    mask4 = None if mask is None else mask[:, None, None, :]
    out = emulated_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask4, scale, mode)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------- the public function


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                  scale: float | None = None, backend: str = "triton") -> torch.Tensor:
    """Attention of ``q`` over ``k``, ``v`` (diffusers' ``[B, L, H, D]``, BF16 or FP16; out the same)
    with FP8 Q, K, V and probabilities (module docstring).

    ``attn_mask``: ``None`` or a boolean key-padding mask (``[B, Lk]``, or diffusers'
    ``[B, 1, 1, Lk]``; True = attend). ``backend``: ``"triton"`` (per-head scales),
    ``"cudnn"`` (cuDNN's FP8 SDPA, per-tensor scales; masks must be a valid prefix per item)
    or ``"reference"`` (the plain-torch emulation, any device; slow).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown FP8 attention backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    _check_inputs(q, k, v)
    mask = _key_mask(attn_mask, q, k)
    if backend != "reference" and not torch.compiler.is_compiling():  # checked eagerly, not traced
        _check_device(q, backend)
    return torch.ops.omni_fp8_lab.fp8_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else float(scale),
                                            backend)


@torch.library.custom_op("omni_fp8_lab::fp8_attention", mutates_args=())
def _fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                      backend: str) -> torch.Tensor:
    """``fp8_attention`` as one op for ``torch.compile`` (inputs checked by the caller)."""
    with torch.no_grad():
        if backend == "triton":
            return triton_fp8_attention(q, k, v, mask, scale)
        if backend == "cudnn":
            return _CUDNN.run(q, k, v, mask, scale)
        return fp8_attention_reference(q, k, v, mask, "head", scale).contiguous()


@_fp8_attention_op.register_fake
def _(q, k, v, mask, scale, backend):
    return q.new_empty(q.shape)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        raise ValueError("fp8_attention takes q, k, v as 4-D tensors [batch, tokens, heads, head_dim].")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"fp8_attention takes BF16/FP16/FP32 q, k, v of one dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}.")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"fp8_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         "match ([B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D]; no grouped heads).")
    if not (q.device == k.device == v.device):
        raise ValueError("fp8_attention: q, k and v must be on one device.")


def _key_mask(attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A boolean key mask ``[B, Lk]`` (True = attend) from ``[B or 1, Lk]`` or ``[B or 1, 1, 1, Lk]``."""
    if attn_mask is None:
        return None
    b, lk = q.shape[0], k.shape[1]
    shape = tuple(attn_mask.shape)
    if attn_mask.dtype != torch.bool or shape[-1] != lk or shape[0] not in (1, b) or any(
            n != 1 for n in shape[1:-1]) or attn_mask.dim() not in (2, 4):
        raise ValueError(f"fp8_attention takes a boolean key-padding mask [B, Lk] or [B, 1, 1, Lk] (B={b}, Lk={lk}); "
                         f"got {attn_mask.dtype} {shape}.")
    return attn_mask.reshape(shape[0], lk).expand(b, lk)


def _check_device(q: torch.Tensor, backend: str) -> None:
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) < FP8_MIN_CAPABILITY:
        raise ConfigError(f"FP8 attention ({backend}) needs a CUDA GPU with FP8 tensor cores (compute capability "
                          f"8.9+: Ada, Hopper or newer); got {_describe(q.device)}. backend='reference' emulates it "
                          "(slowly) anywhere.")
    if backend == "triton":
        _need_triton()
        if q.shape[-1] not in _HEAD_DIMS:
            raise ConfigError(f"FP8 attention (triton) takes head_dim {' or '.join(map(str, _HEAD_DIMS))}, got "
                              f"{q.shape[-1]}; use backend='cudnn'.")
    else:
        _cudnn_module()


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return f"a {device.type} tensor"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def _need_triton() -> None:
    if not HAVE_TRITON:
        raise ConfigError("FP8 attention (triton) needs Triton: pip install triton (PyTorch's CUDA wheels ship it).")


# --------------------------------------------------------------------------- the Triton kernels

_HEAD_DIMS = (32, 64, 128)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_of(amax, FP8_LIMIT: tl.constexpr, MIN_SCALE: tl.constexpr):
        """``fp8_scale`` (the division rounded to nearest, as torch's is)."""
        return tl.where(amax > 0.0, tl.maximum(tl.math.div_rn(amax, FP8_LIMIT), MIN_SCALE), 1.0)

    @triton.jit
    def _head_chunk(x_ptr, L, H, stride_b, stride_l, stride_h, BLOCK_L: tl.constexpr, D: tl.constexpr):
        """This program's (batch item, head) and its BLOCK_L-token chunk of ``x`` (zeros past L)."""
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        cols = tl.arange(0, D)
        base = x_ptr + b.to(tl.int64) * stride_b + h * stride_h
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=rows[:, None] < L, other=0.0)
        return bh, rows, cols, x

    @triton.jit
    def _amax_kernel(x_ptr, amax_ptr, L, H, stride_b, stride_l, stride_h, amax_stride, BLOCK_L: tl.constexpr,
                     D: tl.constexpr):
        """amax over tokens and channels of one (batch item, head) (``amax_stride`` 0: of the whole
        tensor), from BLOCK_L-token chunks."""
        bh, rows, cols, x = _head_chunk(x_ptr, L, H, stride_b, stride_l, stride_h, BLOCK_L, D)
        tl.atomic_max(amax_ptr + bh * amax_stride, tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0))

    @triton.jit
    def _quantize_kernel(x_ptr, amax_ptr, out_ptr, L, L_OUT, H, stride_b, stride_l, stride_h, amax_stride, out_stride_bh,
                         out_stride_l, out_stride_d, BLOCK_L: tl.constexpr, D: tl.constexpr, FP8_LIMIT: tl.constexpr,
                         MIN_SCALE: tl.constexpr):
        """E4M3 codes of one (batch item, head) chunk with its scale; rows from L to L_OUT (padding) get 0."""
        bh, rows, cols, x = _head_chunk(x_ptr, L, H, stride_b, stride_l, stride_h, BLOCK_L, D)
        scale = _scale_of(tl.load(amax_ptr + bh * amax_stride), FP8_LIMIT, MIN_SCALE)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x.to(tl.float32), scale), -FP8_LIMIT), FP8_LIMIT)
        out = out_ptr + bh.to(tl.int64) * out_stride_bh + rows[:, None] * out_stride_l + cols[None, :] * out_stride_d
        tl.store(out, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=rows[:, None] < L_OUT)

    @triton.jit
    def _attn_block(acc, l_i, m_i, q, k_ptrs, vt_ptrs, mask_ptrs, start, Lk, c,
                    MASKED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, LOG2_LIMIT: tl.constexpr):
        """One BLOCK_N block of keys: FP8 scores, online softmax in float32, FP8 probabilities."""
        kt = tl.load(k_ptrs)  # [D, BLOCK_N]: K's rows, channels contiguous (K-major for the MMA)
        s = tl.dot(q, kt) * c  # log2-scaled scores
        if MASKED:
            offs = start + tl.arange(0, BLOCK_N)
            valid = offs < Lk
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptrs, mask=valid, other=0) != 0)
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # exp2(s - m) * 448 in one exp2: the probabilities' E4M3 scale folded into the shift
        p = tl.math.exp2(s - (m_new - LOG2_LIMIT)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(vt_ptrs)  # [D, BLOCK_N]: V transposed, tokens contiguous (K-major for the MMA)
        acc = tl.dot(p.to(tl.float8e4nv, fp_downcast_rounding="rtne"), tl.trans(vt), acc * alpha[:, None])
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd(qc_ptr, kc_ptr, vt_ptr, amax_ptr, mask_ptr, out_ptr, sm_scale, Lq, Lk, H, BH, L_PAD_Q, L_PAD_K,
                  stride_ob, stride_ol, stride_oh, stride_mb, stride_mn,
                  HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  FP8_LIMIT: tl.constexpr, MIN_SCALE: tl.constexpr, LOG2_LIMIT: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        sq = _scale_of(tl.load(amax_ptr + bh), FP8_LIMIT, MIN_SCALE)
        sk = _scale_of(tl.load(amax_ptr + BH + bh), FP8_LIMIT, MIN_SCALE)
        sv = _scale_of(tl.load(amax_ptr + 2 * BH + bh), FP8_LIMIT, MIN_SCALE)
        c = sq * sk * sm_scale * 1.4426950408889634  # codes' product -> log2-scaled score
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        bh64 = bh.to(tl.int64)
        q = tl.load(qc_ptr + bh64 * L_PAD_Q * D + offs_m[:, None] * D + offs_d[None, :])  # padded: no mask
        k_ptrs = kc_ptr + bh64 * L_PAD_K * D + offs_n[None, :] * D + offs_d[:, None]
        vt_ptrs = vt_ptr + bh64 * L_PAD_K * D + offs_d[:, None] * L_PAD_K + offs_n[None, :]
        mask_ptrs = mask_ptr + b.to(tl.int64) * stride_mb + offs_n * stride_mn
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30  # finite: a fully masked block gives p = 0, not NaN
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        full = (Lk // BLOCK_N) * BLOCK_N
        for start in tl.range(0, full, BLOCK_N):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_ptrs, vt_ptrs, mask_ptrs, start, Lk, c,
                                        HAS_MASK, HAS_MASK, BLOCK_N, LOG2_LIMIT)
            k_ptrs += BLOCK_N * D
            vt_ptrs += BLOCK_N
            mask_ptrs += BLOCK_N * stride_mn
        if full < Lk:  # the last, partial block: keys past Lk masked
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_ptrs, vt_ptrs, mask_ptrs, full, Lk, c,
                                        True, HAS_MASK, BLOCK_N, LOG2_LIMIT)
        # acc sums 448 * p codes times V codes, l_i the 448 * p: the 448 cancels, V's scale remains.
        # A row whose keys are all masked has l_i = 0 and gives 0.
        o = acc * (sv / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
        out = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=offs_m[:, None] < Lq)

    _CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": n}, num_warps=8, num_stages=s)
                for n, stages in ((64, (2, 3, 4)), (128, (2, 3))) for s in stages]
    _attn_fwd_tuned = triton.autotune(_CONFIGS, key=["Lq", "Lk", "D", "HAS_MASK"])(_attn_fwd)


_AMAX_BLOCK = 64
_QUANT_BLOCK = 64


def quantize_heads(x: torch.Tensor, amax: torch.Tensor, padded_len: int, transpose: bool,
                   per_tensor: bool = False) -> torch.Tensor:
    """E4M3 codes of ``x`` ``[B, L, H, D]`` with one scale per (batch item, head), as
    ``[B*H, padded_len, D]`` (``transpose``: ``[B*H, D, padded_len]``), zeros past L.

    ``amax`` (float32, zeroed) receives the amax of each (batch item, head) ``[B*H]``, or with
    ``per_tensor`` the tensor's ``[1]``, whose one scale then quantizes every head."""
    b, n, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    amax_stride = 0 if per_tensor else 1
    if n:
        _amax_kernel[(b * h, triton.cdiv(n, _AMAX_BLOCK))](x, amax, n, h, x.stride(0), x.stride(1), x.stride(2),
                                                          amax_stride, BLOCK_L=_AMAX_BLOCK, D=d, num_warps=4)
    shape = (b * h, d, padded_len) if transpose else (b * h, padded_len, d)
    codes = torch.empty(shape, dtype=torch.float8_e4m3fn, device=x.device)
    strides = (codes.stride(0), 1, padded_len) if transpose else (codes.stride(0), d, 1)
    _quantize_kernel[(b * h, triton.cdiv(padded_len, _QUANT_BLOCK))](
        x, amax, codes, n, padded_len, h, x.stride(0), x.stride(1), x.stride(2), amax_stride, *strides,
        BLOCK_L=_QUANT_BLOCK, D=d, FP8_LIMIT=FP8_MAX, MIN_SCALE=TINY, num_warps=4)
    return codes


def triton_prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The Triton kernel's inputs: Q, K codes ``[B*H, L_pad, D]``, V's transposed ``[B*H, D, L_pad]``
    and the amax ``[3, B*H]`` their per-head scales come from."""
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    amax = torch.zeros((3, b * h), dtype=torch.float32, device=q.device)
    qc = quantize_heads(q, amax[0], _padded(lq), transpose=False)
    kc = quantize_heads(k, amax[1], _padded(lk), transpose=False)
    vt = quantize_heads(v, amax[2], _padded(lk), transpose=True)
    return qc, kc, vt, amax


def triton_attention_prepared(qc: torch.Tensor, kc: torch.Tensor, vt: torch.Tensor, amax: torch.Tensor, lk: int,
                              mask: torch.Tensor | None, out: torch.Tensor, scale: float,
                              config: dict[str, int] | None = None) -> torch.Tensor:
    """The attention kernel on ``triton_prepare``'s codes (``lk`` keys), into ``out`` ``[B, Lq, H, D]``
    (channels contiguous). ``config`` (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``)
    skips the autotuner."""
    b, lq, h, d = out.shape
    if mask is not None:
        mask_arg, stride_mb, stride_mn = mask.view(torch.uint8), mask.stride(0), mask.stride(1)
    else:
        mask_arg, stride_mb, stride_mn = amax, 0, 0  # never read
    args = (qc, kc, vt, amax, mask_arg, out, scale, lq, lk, h, b * h, qc.shape[1], kc.shape[1],
            out.stride(0), out.stride(1), out.stride(2), stride_mb, stride_mn)
    consts = {"HAS_MASK": mask is not None, "D": d, "FP8_LIMIT": FP8_MAX, "MIN_SCALE": TINY,
              "LOG2_LIMIT": LOG2_FP8_MAX}
    if config is None:
        _attn_fwd_tuned[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * h)](*args, **consts)
    else:
        config = dict(config)
        warps, stages = config.pop("num_warps", 8), config.pop("num_stages", 2)
        _attn_fwd[(triton.cdiv(lq, config["BLOCK_M"]), b * h)](*args, **consts, **config, num_warps=warps,
                                                                num_stages=stages)
    return out


def triton_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, config: dict[str, int] | None = None) -> torch.Tensor:
    """``fp8_attention``'s Triton backend (inputs checked by the caller)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    qc, kc, vt, amax = triton_prepare(q, k, v)
    return triton_attention_prepared(qc, kc, vt, amax, k.shape[1], mask, out, scale, config)


def _padded(n: int) -> int:
    return max(_PAD, -(-n // _PAD) * _PAD)


# --------------------------------------------------------------------------- cuDNN's FP8 SDPA


def _cudnn_module() -> Any:
    try:
        import cudnn
    except (ImportError, OSError, RuntimeError) as e:
        raise ConfigError(f"FP8 attention (cudnn) needs cuDNN's Python frontend: pip install nvidia-cudnn-frontend "
                          f"(import cudnn failed: {' '.join(str(e).split())[:200]}).") from e
    if not hasattr(getattr(cudnn, "pygraph", None), "sdpa_fp8"):
        raise ConfigError(f"FP8 attention (cudnn): this nvidia-cudnn-frontend ({getattr(cudnn, '__version__', '?')}) "
                          "has no sdpa_fp8; pip install -U nvidia-cudnn-frontend.")
    try:  # its pure-Python graph (cudnn._device) asks the CUDA driver about the device through cuda-python
        import importlib.util

        if importlib.util.find_spec("cudnn._device") is not None:
            import cuda.bindings.driver  # noqa: F401
    except ImportError as e:
        raise ConfigError("FP8 attention (cudnn): nvidia-cudnn-frontend needs cuda-python here: pip install "
                          "cuda-python.") from e
    return cudnn


class _CudnnFp8:
    """cuDNN's FP8 SDPA with per-tensor scales: one graph per shape, built on first use and kept.

    Hopper's FP8 SDPA writes its output in E4M3 too (scaled by 448 / amax(V): the output is a
    convex combination of V's rows), which this dequantizes; where cuDNN accepts a BF16 output
    (tried first), there is no such rounding. Masks must keep a prefix of each item's keys (cuDNN's
    padding mask: a length per item); checking that reads the mask on the host.
    """

    def __init__(self) -> None:
        self.graphs: dict[tuple, tuple] = {}
        self.handles: dict[int, Any] = {}

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
        cudnn = _cudnn_module()
        b, lq, h, d = q.shape
        lk = k.shape[1]
        lengths = None
        if mask is not None and not bool(mask.all()):
            lengths = mask.sum(dim=1, dtype=torch.int32)
            if not torch.equal(mask, torch.arange(lk, device=mask.device) < lengths[:, None]):
                raise ConfigError("FP8 attention (cudnn) takes key masks that keep a prefix of each item's keys "
                                  "(padding at the end); use backend='triton' for other masks.")
        codes, scales = _quantize_per_tensor(q, k, v)
        key = (q.device.index, b, h, lq, lk, d, scale, lengths is not None)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._build(cudnn, q.device, b, h, lq, lk, d, scale, lengths is not None)
        graph, tensors, bf16_out, workspace = entry
        handle = self.handles[q.device.index]
        cudnn.set_stream(handle, torch.cuda.current_stream(q.device).cuda_stream)
        sq, sk, sv = scales[0], scales[1], scales[2]
        one = torch.ones((), dtype=torch.float32, device=q.device)
        out = torch.empty((b, lq, h, d), dtype=torch.bfloat16 if bf16_out else torch.float8_e4m3fn, device=q.device)
        amax_out = torch.empty((2, 1, 1, 1, 1), dtype=torch.float32, device=q.device)
        values = {"q": codes[0], "k": codes[1], "v": codes[2], "descale_q": sq, "descale_k": sk, "descale_v": sv,
                  "descale_s": one / FP8_MAX, "scale_s": one * FP8_MAX, "scale_o": one if bf16_out else 1 / sv,
                  "o": out, "amax_s": amax_out[0], "amax_o": amax_out[1]}
        if lengths is not None:
            values["seq_q"] = torch.full((b, 1, 1, 1), lq, dtype=torch.int32, device=q.device)
            values["seq_kv"] = lengths.reshape(b, 1, 1, 1)
        pack = {tensors[name]: value.reshape(tensors[name + "_shape"]) if name + "_shape" in tensors else value
                for name, value in values.items()}
        graph.execute(pack, workspace, handle=handle)
        if bf16_out:
            return out.to(q.dtype)
        return (out.float() * sv).to(q.dtype)

    def _build(self, cudnn, device, b, h, lq, lk, d, scale, masked) -> tuple:
        if device.index not in self.handles:
            with torch.cuda.device(device):
                self.handles[device.index] = cudnn.create_handle()
        errors = []
        # A BF16 output where cuDNN has one (no rounding of O); the inference flag under its newer
        # name first, then its older one.
        for bf16_out in (True, False):
            for inference in ({"generate_stats": False}, {"is_inference": True}):
                try:
                    return self._graph(cudnn, device, b, h, lq, lk, d, scale, masked, bf16_out, inference)
                except Exception as e:  # noqa: BLE001 - cuDNN reports an unsupported graph in several ways
                    errors.append(f"{'BF16' if bf16_out else 'FP8'} output, {next(iter(inference))}: "
                                  f"{' '.join(str(e).split())[:200]}")
        raise ConfigError(f"FP8 attention (cudnn): cuDNN built no FP8 SDPA for B={b} H={h} Lq={lq} Lk={lk} D={d} "
                          f"({'; '.join(errors)}).")

    def _graph(self, cudnn, device, b, h, lq, lk, d, scale, masked, bf16_out, inference) -> tuple:
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32,
                              handle=self.handles[device.index])
        t = {}
        # Q, K, V: the codes as [B*H, L, D] buffers, seen as dims (B, H, L, D)
        for name, n in (("q", lq), ("k", lk), ("v", lk)):
            t[name] = graph.tensor(name=name, dim=(b, h, n, d), stride=(h * n * d, n * d, d, 1), data_type=e4m3)
            t[name + "_shape"] = (b, h, n, d)
        scalar = {"dim": (1, 1, 1, 1), "stride": (1, 1, 1, 1), "data_type": f32}
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t[name] = graph.tensor(name=name, **scalar)
            t[name + "_shape"] = (1, 1, 1, 1)
        options = {"attn_scale": scale, "use_causal_mask": False, **inference}
        if masked:
            for name in ("seq_q", "seq_kv"):
                t[name] = graph.tensor(name=name, dim=(b, 1, 1, 1), stride=(1, 1, 1, 1),
                                       data_type=cudnn.data_type.INT32)
            options.update(use_padding_mask=True, seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"])
        o, _, amax_s, amax_o = graph.sdpa_fp8(
            q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
            descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
            name="omni_fp8_attention", **options)
        # O as [B, Lq, H, D], the layout diffusers wants back
        o.set_output(True).set_dim((b, h, lq, d)).set_stride((lq * h * d, d, h * d, 1)).set_data_type(
            cudnn.data_type.BFLOAT16 if bf16_out else e4m3)
        for name, tensor in (("amax_s", amax_s), ("amax_o", amax_o)):
            tensor.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
            t[name] = tensor
        t["o"] = o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        workspace = torch.empty(max(1, graph.get_workspace_size()), dtype=torch.uint8, device=device)
        return graph, t, bf16_out, workspace


def _quantize_per_tensor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Q, K, V codes ``[B*H, L, D]`` with one scale each (``tensor`` mode) and the scales ``[3]``."""
    if HAVE_TRITON:
        amax = torch.zeros((3, 1), dtype=torch.float32, device=q.device)
        codes = [quantize_heads(t, amax[i], t.shape[1], transpose=False, per_tensor=True)
                 for i, t in enumerate((q, k, v))]
        return codes, fp8_scale(amax[:, 0])
    scales = fp8_scale(torch.stack([t.detach().abs().amax().float() for t in (q, k, v)]))
    codes = [(t.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).transpose(1, 2).reshape(
        -1, t.shape[1], t.shape[3]) for t, s in zip((q, k, v), scales)]
    return codes, scales


_CUDNN = _CudnnFp8()
