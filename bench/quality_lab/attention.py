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
what a fully FP8 step would do). The emulation itself lives in ``bench/fp8_attention.py``
(``quantize_qkv``, ``emulated_sdpa``), where the FP8 attention kernels and their tests use it too.

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
from fp8_attention import MODES, emulated_sdpa, quantize_qkv  # noqa: E402, F401 - one definition

from quality_lab import gate


def fp8_sdpa(mode: str):
    """A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` with ``mode``'s numerics
    (``emulated_sdpa``: the definition the runtime's FP8 attention and its tests share)."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p or is_causal or enable_gqa:
            raise NotImplementedError("the emulation covers what the lab DiT calls: no dropout, causality or GQA")
        return emulated_sdpa(query, key, value, attn_mask, scale, mode)

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
