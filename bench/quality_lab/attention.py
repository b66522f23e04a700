"""What FP8 attention would do to the lab DiT's images, before any FP8 attention kernel exists.

FP8 attention kernels (cuDNN's FP8 SDPA, FlashAttention-3 FP8, SageAttention) multiply FP8 Q, K
and V with FP32 accumulation; they differ in where the scales sit. This script emulates their
numerics in float32 around PyTorch's SDPA, which diffusers' native attention backend calls, and
samples the lab's fixed evaluation set through the quality gate (``gate.score``/``gate.passes``),
so the numerics are decided on measured damage, not on a kernel's speed:

* ``tensor``: one scale each for Q, K and V over the whole call (cuDNN's per-tensor FP8 SDPA);
* ``head``: one scale per batch item and head for Q, K and V (FlashAttention-3's descales);
* ``sage``: K minus its mean over the tokens (softmax does not change), Q and K scaled per block
  of 64 tokens per head, V per channel (SageAttention-style).

In every mode the softmax runs in float32 and its probabilities P (in [0, 1]) are rounded to E4M3
with the fixed scale 1/448 before the P.V product, as FP8 kernels do; the products accumulate in
float32. The Linears stay BF16 (attention alone), or run per-tensor FP8 W8A8 (``+ W8A8`` rows:
what a fully FP8 step would do).

    python bench/quality_lab/attention.py --samples 256 --steps 20 --json bench/results/quality_lab_attention.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality_lab import gate  # noqa: E402

MODES = ("tensor", "head", "sage")
FP8_MAX = 448.0
SAGE_BLOCK = 64
_TINY = torch.finfo(torch.float32).tiny


def _fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to E4M3 with ``scale`` (broadcast), back in float32: the value an FP8 kernel sees."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, (amax / FP8_MAX).clamp_min(_TINY), torch.ones_like(amax))


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> tuple[torch.Tensor, ...]:
    """Q, K, V ``[B, H, L, D]`` as ``mode``'s FP8 kernel would hold them (float32 values)."""
    if mode == "tensor":
        return tuple(_fp8(t, _scale(t.abs().amax())) for t in (q, k, v))
    if mode == "head":
        return tuple(_fp8(t, _scale(t.abs().amax(dim=(2, 3), keepdim=True))) for t in (q, k, v))
    if mode != "sage":
        raise ValueError(f"unknown FP8 attention mode {mode!r}; use one of {', '.join(MODES)}")
    k = k - k.mean(dim=2, keepdim=True)  # softmax(q.(k - m)) == softmax(q.k): each row shifts by q.m
    out = []
    for t in (q, k):
        b, h, n, d = t.shape
        pad = (-n) % SAGE_BLOCK
        blocks = torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(b, h, -1, SAGE_BLOCK, d)
        scale = _scale(blocks.abs().amax(dim=(3, 4), keepdim=True))
        out.append(_fp8(blocks, scale).reshape(b, h, n + pad, d)[:, :, :n])
    out.append(_fp8(v, _scale(v.abs().amax(dim=2, keepdim=True))))  # per channel of V
    return tuple(out)


def fp8_sdpa(mode: str):
    """A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` with ``mode``'s numerics."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p or is_causal or enable_gqa:
            raise NotImplementedError("the emulation covers what the lab DiT calls: no dropout, causality or GQA")
        dtype = query.dtype
        q, k, v = quantize_qkv(query.float(), key.float(), value.float(), mode)
        s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
        p = torch.softmax(s, dim=-1)
        p = _fp8(p, torch.tensor(1.0 / FP8_MAX))  # probabilities in [0, 1]: a fixed scale
        return (p @ v).to(dtype)

    return sdpa


@contextlib.contextmanager
def fp8_attention(mode: str) -> Iterator[None]:
    """Every SDPA call inside runs with ``mode``'s FP8 numerics (diffusers' native backend looks the
    function up at each call)."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fp8_sdpa(mode)
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def run(samples: int, steps: int, modes: tuple[str, ...] = MODES) -> dict[str, dict]:
    from omni_fp8 import quantize_

    evaluation = gate.EvaluationSet(samples, steps)
    reference_model = evaluation.model
    w8a8 = quantize_(copy.deepcopy(reference_model), {"preset": "none"})
    results: dict[str, dict] = {}
    todo = [("W8A8 Linears, BF16 attention", w8a8, None)]
    for mode in modes:
        todo += [(f"FP8 attention ({mode}), BF16 Linears", reference_model, mode),
                 (f"FP8 attention ({mode}) + W8A8 Linears", w8a8, mode)]
    for name, model, mode in todo:
        with fp8_attention(mode) if mode else contextlib.nullcontext():
            metrics = results[name] = evaluation.measure(model)
        print(f"{name}: PSNR {metrics['psnr']:.2f} dB, perceptual {metrics['perceptual']:.4f}, FID "
              f"{metrics['fid']:.3f} -> {'pass' if metrics['passes'] else 'FAIL'} ({metrics['seconds']:.0f} s)",
              flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", dest="modes", action="append", choices=MODES, help="default: all three")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args(argv)
    results = run(a.samples, a.steps, tuple(a.modes or MODES))
    print(gate.table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
