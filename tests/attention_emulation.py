"""The Triton FP8 attention kernel's algorithm, step for step in torch: the tests' yardstick.

``fp8_attention_reference`` (the quality lab's numerics) rounds the normalised probabilities;
the kernel rounds ``exp2(s - m) * 448`` against the running row maximum of each block of keys, as
FlashAttention does, so the two agree statistically, not bit for bit. This emulation does what
the kernel does, in the same order and float32 roundings, so the kernel must match it up to
float32 summation order. ``e4m3`` is the cast under test: torch's on a GPU, Triton's own in its
CPU interpreter (which rounds differently, see ``interpreter_e4m3``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from fp8_attention import FP8_MAX, LOG2_FP8_MAX, LOG2E, fp8_scale  # noqa: E402


def torch_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).to(torch.float32)


def interpreter_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E4M3 as Triton 3.6's interpreter casts (round half up on the cut-off bit, a carry
    that can drop a binade, subnormals its own way), back to float32."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import _convert_float

    data = x.detach().float().contiguous().numpy()
    codes = _convert_float(data, tl.float32, tl.float8e4nv, ir.ROUNDING_MODE.RTNE).view(np.uint8)
    return torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).to(torch.float32).reshape(x.shape)


def kernel_codes(t: torch.Tensor, e4m3: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L, H, D]`` -> its E4M3 code values ``[B, H, L, D]`` (float32) and per-head scales ``[B, H, 1, 1]``."""
    x = t.float().transpose(1, 2)
    scale = fp8_scale(x.abs().amax(dim=(2, 3), keepdim=True))
    return e4m3((x / scale).clamp(-FP8_MAX, FP8_MAX)), scale


def emulate_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, block_n: int,
                   e4m3: Callable = torch_e4m3, scale: float | None = None) -> torch.Tensor:
    """The kernel's output ``[B, Lq, H, D]`` in float32 (``mask``: boolean ``[B, Lk]`` or None)."""
    qc, sq = kernel_codes(q, e4m3)
    kc, sk = kernel_codes(k, e4m3)
    vc, sv = kernel_codes(v, e4m3)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)
    c = sq * sk * f32(q.shape[-1] ** -0.5 if scale is None else scale) * f32(LOG2E)
    b, h, lq, d = qc.shape
    lk = kc.shape[2]
    m = torch.full((b, h, lq), -1.0e30, device=qc.device)
    l_sum = torch.zeros((b, h, lq), device=qc.device)
    acc = torch.zeros((b, h, lq, d), device=qc.device)
    for start in range(0, lk, block_n):
        stop = min(start + block_n, lk)
        s = (qc @ kc[:, :, start:stop].transpose(-1, -2)) * c
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, start:stop], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - (m_new - f32(LOG2_FP8_MAX))[..., None])
        alpha = torch.exp2(m - m_new)
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + e4m3(p) @ vc[:, :, start:stop]
        m = m_new
    out = acc * (sv[..., 0] / torch.where(l_sum > 0, l_sum, 1.0))[..., None]
    return out.transpose(1, 2)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
