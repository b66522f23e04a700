"""Every Linear shape of a real-width pass, GEMM alone: BF16 against each FP8 GEMM the runtime can pick.

For the (M, N, K) of each Linear call in one forward of Qwen-Image / Z-Image at 1024x1024 (one
block, unfused and ``fuse_blocks_``'s wider QKV projections), times on the GPU, activation
quantization excluded:

    bf16          F.linear
    row           _scaled_mm with per-token x per-row scales (dynamic activations, per-channel
                  weights, fused QKV)
    tensor        _scaled_mm with a scalar scale on both sides (static activations, per-tensor weights)
    ...-fast      the same with cuBLASLt's fast accumulation (``Fp8Linear.fast_accum``)

and, for the few-row modulation Linears, the FP8-weight GEMV (``fp8_weight_gemv``) with its
shipped tile next to other tiles of its tensor-core and one-row paths (``--gemv-sweep``), in
GB/s of weight streamed. Each figure is
the median of ``--repeat`` samples of 20 back-to-back calls; the table gives TFLOP/s and each FP8
GEMM's speed-up over BF16, and the last rows weight each by how often a full-depth pass calls it.

    python bench/gemm_shapes.py --json bench/results/gemm_shapes_h200.json --gemv-sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_speed

GEMMS = ("bf16", "row", "row-fast", "tensor", "tensor-fast")  # step_speed.gemm_ms
GEMV_TILES = [(bn, bk, w, s) for bn in (16, 32, 64, 128) for bk in (128, 256, 512) for w in (4, 8) for s in (3, 5)]


def shapes(name: str, height: int, width: int, txt: int) -> Counter:
    """(M, N, K) -> calls per full-depth pass: one block measured, its calls scaled by the depth."""
    from omni_fp8 import fuse_blocks_

    from omni_fp8.converter.errors import ConfigError

    depth = step_speed.MODELS[name]["config"][step_speed.MODELS[name]["depth_key"]]
    blocks = "transformer_blocks" if name == "qwen-image" else "layers"
    total: Counter = Counter()
    for fused in (False, True):
        one, none = step_speed.build(name, 1), step_speed.build(name, 1)
        setattr(none, blocks, torch.nn.ModuleList())
        if fused:
            fuse_blocks_(one)
            try:
                fuse_blocks_(none)  # Z-Image's refiner blocks
            except ConfigError:
                pass  # Qwen-Image has no attention outside its blocks
        args_, kwargs = step_speed.inputs(name, one, height, width, txt)
        with_block = step_speed.linear_shapes(one, args_, kwargs)
        outside = step_speed.linear_shapes(none, args_, kwargs)
        for shape in with_block:
            per_block = with_block[shape] - outside.get(shape, 0)
            total[shape] = max(total[shape], outside.get(shape, 0) + per_block * depth)
        del one, none
    return total


def time_gemv(n: int, k: int, repeat: int, sweep: bool) -> dict:
    """The shipped GEMV, and with ``sweep`` each tile of GEMV_TILES launched through Triton."""
    import triton
    from omni_fp8.converter.numerics import FP8_DTYPE
    from omni_fp8.runtime import triton_kernels as tk
    from triton.runtime.errors import OutOfResources

    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    wq = (torch.randn(n, k, device="cuda") / 4).to(FP8_DTYPE)
    scale = torch.full((), 0.01, device="cuda")
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    out = {"shipped": step_speed.median_ms(lambda: tk.fp8_weight_gemv(x, wq, scale, None, None), 5, repeat, inner=20)}
    if sweep:  # rows through tensor cores (BLOCK_M 16), and the one-row path (BLOCK_M 1)
        for (bn, bk, warps, stages), bm in itertools.product(GEMV_TILES, (tk.GEMV_MAX_ROWS, 1)):
            def call(bn=bn, bk=bk, warps=warps, stages=stages, bm=bm):
                tk._fp8_weight_gemv[(triton.cdiv(n, bn), 1)](
                    x, wq, scale, y, y, 1, n, k, x.stride(0), wq.stride(0), 0, y.stride(0),
                    HAS_BIAS=False, BLOCKED=False, PER_ROW=False, BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_K=bk, SCALE_BN=1, SCALE_BK=1, num_warps=warps, num_stages=stages)
            label = f"m{bm} {bn}x{bk} w{warps} s{stages}"
            try:
                out[label] = step_speed.median_ms(call, 3, repeat, inner=20)
            except (RuntimeError, ValueError, OutOfResources) as e:  # a tile too big here
                out[label] = None
                print(f"  tile {label}: {type(e).__name__}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=list(step_speed.MODELS))
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--txt", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--gemv-sweep", action="store_true", help="also time other GEMV tiles")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU")
    from omni_fp8.runtime.triton_kernels import GEMV_MAX_ROWS

    step_speed.TEXT_MASK = False
    results: dict = {"device": torch.cuda.get_device_name(), "models": {}}
    for name in a.model or list(step_speed.MODELS):
        calls = shapes(name, a.height, a.width, a.txt)
        rows = {}
        print(f"\n{name} ({a.height}x{a.width}, {a.txt} text tokens): GEMM alone, ms per call, TFLOP/s, speed-up over BF16")
        print(f"{'M x N x K':<20}{'calls':>6}" + "".join(f"{g:>18}" for g in GEMMS))
        totals = Counter()
        for (m, n, k), count in sorted(calls.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[1]):
            if m <= GEMV_MAX_ROWS:
                t = time_gemv(n, k, a.repeat, a.gemv_sweep)
                rows[f"{m}x{n}x{k}"] = {"count": count, "gemv": t}
                best = min((v, c) for c, v in t.items() if v is not None)
                print(f"{m}x{n}x{k:<10}{count:>6}  GEMV shipped {t['shipped'] * 1e3:.1f} us "
                      f"({n * k / t['shipped'] / 1e6:.0f} GB/s); best {best[1]} {best[0] * 1e3:.1f} us "
                      f"({n * k / best[0] / 1e6:.0f} GB/s)")
                totals["gemv-shipped"] += count * t["shipped"]
                totals["gemv-best"] += count * best[0]
                continue
            t = step_speed.gemm_ms(m, n, k, a.repeat, GEMMS)
            rows[f"{m}x{n}x{k}"] = {"count": count, **t}
            flops = 2 * m * n * k
            cells = "".join(f"{t[g]:>8.3f} {flops / t[g] / 1e9:>4.0f} {t['bf16'] / t[g]:>4.2f}" for g in GEMMS)
            print(f"{f'{m}x{n}x{k}':<20}{count:>6}{cells}")
            for g in GEMMS:
                totals[g] += count * t[g]
        print("ms per pass, these calls: " + ", ".join(f"{g} {v:.1f}" for g, v in totals.items()))
        results["models"][name] = {"shapes": rows, "pass_ms": dict(totals)}
        if a.json:
            a.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
