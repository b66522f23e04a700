"""Quantizing one weight: omni-fp8's chunked numerics against the one-liner, in the same run.

The one-liner ``(W.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)`` materialises two
float32 copies of the weight; ``numerics.quantize_weight`` works through a small float32 scratch
chunk in place. Both must give the same bits; the chunked one must be >= 4x faster.

    python bench/quantize_speed.py                 # 3072x12288 BF16 (a Qwen-Image MLP weight)
    python bench/quantize_speed.py --shape 3072,3072 --repeat 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from omni_fp8.converter.numerics import FP8_MAX, quantize_weight


def naive(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.abs().amax().float()
    s = amax / FP8_MAX if amax > 0 else torch.tensor(1.0)
    return (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="3072,12288")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(getattr(torch, args.dtype))
    nbytes = w.numel() * w.element_size()

    q_naive, s_naive = naive(w)
    rows = [("naive one-liner", timed(lambda: naive(w), args.repeat), True)]
    q, s = quantize_weight(w)
    same = torch.equal(q.view(torch.uint8), q_naive.view(torch.uint8)) and torch.equal(s, s_naive.reshape(()))
    rows.append(("omni-fp8 per-tensor", timed(lambda: quantize_weight(w), args.repeat), same))
    rows.append(("omni-fp8 block 128x128", timed(lambda: quantize_weight(w, (128, 128)), args.repeat), None))

    print(f"weight {list(shape)} {args.dtype}, {nbytes / 1e6:.0f} MB, {torch.get_num_threads()} threads, "
          f"median of {args.repeat}")
    print(f"{'method':<24} {'ms':>8} {'GB/s':>6} {'vs naive':>9}  bit-identical to naive")
    base = rows[0][1]
    for name, seconds, identical in rows:
        mark = "-" if identical is None else ("yes" if identical else "NO")
        print(f"{name:<24} {seconds * 1e3:>8.1f} {nbytes / seconds / 1e9:>6.2f} {base / seconds:>8.1f}x  {mark}")


if __name__ == "__main__":
    main()
