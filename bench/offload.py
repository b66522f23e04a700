"""Offloaded FP8 transformers on a GPU: peak memory and step time per offload mode, BF16 against FP8.

A real-width Qwen-Image transformer (random weights, ``--blocks`` blocks), 1024x1024 (4096 image
tokens) with 256 text tokens, one forward per step. For each offload mode the model starts on
the CPU (as offloading does), and for BF16 and for FP8 (``quantize_`` of the same weights) we
record the peak GPU memory allocated from the move onwards (weights that stay on the GPU
included), the wall time of one step (forward plus synchronisation, as a pipeline step runs;
median over ``--repeat`` steps after two warm-up steps), and, for FP8, how many Linear calls ran the emulation instead of an
FP8 kernel (must be 0: the GEMM plan follows the weight whichever way it moved).

Modes: ``gpu`` (no offloading, the baseline), ``model`` (accelerate's ``cpu_offload_with_hook``,
what ``enable_model_cpu_offload`` puts on each component: the first step moves the model),
``sequential`` (accelerate's ``cpu_offload``, what ``enable_sequential_cpu_offload`` does),
``group-block`` / ``group-leaf`` (``enable_group_offload``, with ``-stream`` for ``use_stream=True``).

    python bench/offload.py --blocks 8
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import build, counting_emulation, inputs, output  # noqa: E402

WARMUP = 2  # steps before timing (the first moves the model for "model"; kernels and caches warm up)
MODES = ["gpu", "model", "sequential", "group-block", "group-block-stream", "group-leaf", "group-leaf-stream"]


def apply(model, mode: str) -> None:
    from accelerate import cpu_offload, cpu_offload_with_hook

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    if mode == "gpu":
        model.to(cuda)
    elif mode == "model":
        cpu_offload_with_hook(model, execution_device=cuda)
    elif mode == "sequential":
        cpu_offload(model, execution_device=cuda, offload_buffers=len(model._parameters) > 0)
    else:
        level = mode.split("-")[1]
        model.enable_group_offload(onload_device=cuda, offload_device=cpu, offload_type=f"{level}_level",
                                   num_blocks_per_group=1 if level == "block" else None,
                                   use_stream=mode.endswith("stream"))


def measure(name: str, blocks: int, fp8: bool, mode: str, repeat: int) -> dict:
    from omni_fp8 import quantize_

    model = build(name, blocks)  # seeded: the same weights every time
    if fp8:
        quantize_(model, {"preset": "none"})
    args_, kwargs = inputs(name, model, 1024, 1024, 256)
    model.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    with counting_emulation() as emulated:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # the inputs only: the model is on the CPU
        apply(model, mode)
        times = []
        with torch.no_grad():
            for _ in range(repeat + WARMUP):
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = output(model(*args_, **kwargs))
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() - base
    result = {"first_ms": times[0] * 1e3, "step_ms": statistics.median(times[WARMUP:]) * 1e3,
              "peak_gib": peak / 2**30, "emulated_calls": emulated["n"], "out": out.float().cpu()}
    del model, out
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-image")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mode", action="append", choices=MODES, help="modes to run (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = []
    reference = {}
    for mode in args.mode or MODES:
        for fp8 in (False, True):
            r = measure(args.model, args.blocks, fp8, mode, args.repeat)
            key = "fp8" if fp8 else "bf16"
            reference.setdefault(key, r["out"])
            err = ((r.pop("out") - reference[key]).norm() / reference[key].norm()).item()
            rows.append({"mode": mode, "weights": key, **r, "rel_l2_vs_gpu": err})
            print(f"{mode:<20} {key:<5} first {r['first_ms']:8.1f} ms  step {r['step_ms']:8.1f} ms  "
                  f"peak {r['peak_gib']:6.2f} GiB  emulated {r['emulated_calls']}  vs no offload {err:.1e}",
                  flush=True)

    print(f"\n{args.model}, real widths, {args.blocks} blocks, 1024x1024, 256 text tokens; peak = GPU memory "
          "allocated from the move on; step = wall time of one forward")
    print(f"{'mode':<20} {'BF16 step':>10} {'FP8 step':>10} {'FP8/BF16':>9} {'BF16 peak':>10} {'FP8 peak':>9} "
          f"{'FP8/BF16':>9} {'FP8 emulated':>13}")
    for mode in args.mode or MODES:
        b = next(r for r in rows if r["mode"] == mode and r["weights"] == "bf16")
        f = next(r for r in rows if r["mode"] == mode and r["weights"] == "fp8")
        print(f"{mode:<20} {b['step_ms']:8.1f}ms {f['step_ms']:8.1f}ms {b['step_ms'] / f['step_ms']:8.2f}x "
              f"{b['peak_gib']:8.2f}G {f['peak_gib']:7.2f}G {f['peak_gib'] / b['peak_gib']:8.2f}x {f['emulated_calls']:>13}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "blocks": args.blocks, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
