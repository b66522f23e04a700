"""One denoising step on a GPU: BF16 against FP8, eager and compiled, at real widths and depth.

For each model (random weights, real layer widths; full depth unless ``--blocks``), at 1024x1024
(4096 image tokens) with 256 text tokens, batch 1:

1. build it in BF16 on the GPU, time one transformer forward eager and compiled
   (diffusers' ``compile_repeated_blocks``), and record every Linear call's shape;
2. for each FP8 scheme (per-tensor; 128x128 blocks): rebuild the same weights, ``quantize_`` in
   place, time eager and compiled, measure the output's relative L2 error against BF16;
3. time each distinct Linear shape alone in BF16 (``F.linear``) and FP8 (the GEMM only,
   activation quantization excluded; for at most 16 rows the better of the GEMM and the
   FP8-weight GEMV): the Linears' share of the step, and so the ceiling
   ``T_bf16 - (T_linears_bf16 - T_linears_fp8)`` and the fraction of the possible saving reached,
   ``(T_bf16 - T_fp8) / (T_bf16 - T_ceiling)``.

Timings: CUDA events, warm-up first, median of ``--repeat``. Ratios within one run only.

    python bench/step_speed.py --model qwen-image --blocks 4          # quick
    python bench/step_speed.py --model qwen-image --model z-image     # full depth (fits in 80 GB)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODELS = {
    "qwen-image": {
        "class_name": "QwenImageTransformer2DModel",
        "config": {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
                   "num_attention_heads": 24, "joint_attention_dim": 3584, "axes_dims_rope": [16, 56, 56]},
        "depth_key": "num_layers",
    },
    "z-image": {
        "class_name": "ZImageTransformer2DModel",
        "config": {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
                   "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560,
                   "axes_dims": [32, 48, 48], "axes_lens": [1024, 512, 512]},
        "depth_key": "n_layers",
    },
}
SCHEMES = {"tensor": None, "block": (128, 128)}


def build(name: str, blocks: int | None, seed: int = 0) -> nn.Module:
    """The model with seeded random BF16 weights made directly on the GPU (no CPU copy)."""
    from omni_fp8.converter.plan import empty_model

    spec = MODELS[name]
    config = dict(spec["config"])
    if blocks:
        config[spec["depth_key"]] = blocks
    model = empty_model(spec["class_name"], config)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for pname, p in list(model.named_parameters()):
        t = torch.empty(p.shape, dtype=torch.bfloat16, device="cuda")
        if p.dim() == 2:
            t.normal_(0, 1 / math.sqrt(p.shape[1]), generator=gen)
        elif "norm" in pname:
            t.fill_(1)
        elif pname.endswith("bias"):
            t.normal_(0, 0.02, generator=gen)
        else:
            t.normal_(0, 1, generator=gen)
        module_name, _, attr = pname.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(t, requires_grad=False)
    return model.to("cuda").eval()


@contextlib.contextmanager
def counting_emulation() -> Iterator[dict]:
    """Count the FP8 Linear calls that fall back to the float32 emulation instead of an FP8 GEMM
    (``counts["n"]``; 0 on a GPU with FP8 tensor cores, whatever moved the weights)."""
    from omni_fp8.runtime import kernels

    counts = {"n": 0}
    real = kernels._emulated

    def counting(*args, **kwargs):
        counts["n"] += 1
        return real(*args, **kwargs)

    kernels._emulated = counting
    try:
        yield counts
    finally:
        kernels._emulated = real


def inputs(name: str, model: nn.Module, height: int, width: int, txt: int,
           device: str = "cuda") -> tuple[tuple, dict]:
    gen = torch.Generator(device=device).manual_seed(1)
    cfg = model.config
    if name == "qwen-image":
        h, w = height // 16, width // 16
        return (), {
            "hidden_states": torch.randn(1, h * w, cfg.in_channels, device=device, generator=gen).bfloat16(),
            "encoder_hidden_states": torch.randn(1, txt, cfg.joint_attention_dim, device=device, generator=gen).bfloat16(),
            "encoder_hidden_states_mask": torch.ones(1, txt, dtype=torch.bool, device=device),
            "timestep": torch.full((1,), 0.5, device=device).bfloat16(),
            "img_shapes": [[(1, h, w)]],
            "return_dict": False,
        }
    latents = [torch.randn(cfg.in_channels, 1, height // 8, width // 8, device=device, generator=gen).bfloat16()]
    caps = [torch.randn(txt, cfg.cap_feat_dim, device=device, generator=gen).bfloat16()]
    return (latents, torch.full((1,), 0.5, device=device).bfloat16(), caps), {"return_dict": False}


def output(result) -> torch.Tensor:
    out = result[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out


def median_ms(fn, warmup: int, repeat: int, inner: int = 1) -> float:
    """Median over ``repeat`` samples of the mean time of ``inner`` back-to-back calls.

    Back-to-back calls let the GPU run ahead of the launches, as inside a forward; a single
    synchronised call would time the launch latency instead of the kernel.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def time_model(model, args_, kwargs, mode: str, warmup: int, repeat: int) -> tuple[float, float, torch.Tensor]:
    """Median ms of one forward in ``mode`` ('eager' or a torch.compile mode), and compile seconds."""
    torch._dynamo.reset()
    for block in _blocks(model):
        block._compiled_call_impl = None  # back to eager
    compile_s = 0.0
    with torch.no_grad():
        if mode != "eager":
            model.compile_repeated_blocks(fullgraph=True, mode=None if mode == "default" else mode)
            start = time.perf_counter()
            model(*args_, **kwargs)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
        ms = median_ms(lambda: model(*args_, **kwargs), warmup, repeat)
        out = output(model(*args_, **kwargs)).float()
        if PROFILE:
            profile(lambda: model(*args_, **kwargs), mode)
    return ms, compile_s, out


PROFILE = False


def profile(fn, label: str, top: int = 12) -> None:
    """Print where one forward's GPU time goes, per kernel, and the CPU time that launched it."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f"    profile {label}: GPU kernels {total / 1e3:.1f} ms in {sum(e.count for e in events)} launches")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"      {e.self_device_time_total / 1e3:7.2f} ms {e.count:5d}x  {e.key[:90]}")


def _blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_repeated_blocks", []))
    return [m for m in model.modules() if type(m).__name__ in names]


def linear_shapes(model, args_, kwargs) -> Counter:
    """(M, N, K) of every Linear call in one forward, with counts."""
    calls: Counter = Counter()
    hooks = [m.register_forward_hook(lambda m, i, o: calls.update([(i[0].numel() // i[0].shape[-1], m.out_features, m.in_features)]))
             for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(*args_, **kwargs)
    for h in hooks:
        h.remove()
    return calls


def time_linears(shapes: Counter, repeat: int) -> dict:
    """Per shape: BF16 F.linear, FP8 row-wise GEMM, FP8 block GEMM (activation quantization excluded)."""
    from omni_fp8.converter.numerics import FP8_DTYPE, quantize_activation
    from omni_fp8.runtime import kernels

    rows = {}
    block_mm = kernels._probe(torch.device("cuda"), kernels.CUBLAS_BLOCK)
    for (m, n, k), count in sorted(shapes.items()):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
        wq = (w * 8).to(FP8_DTYPE)
        row = {"count": count, "bf16": median_ms(lambda: F.linear(x, w), 5, repeat, inner=20)}
        xq, xs = quantize_activation(x)
        ws = torch.ones(1, n, device="cuda")
        row["fp8_tensor"] = median_ms(lambda: kernels._rowwise_mm(xq, xs, wq, ws, None), 5, repeat, inner=20)
        if block_mm is not None and n % 128 == 0 and k % 128 == 0:
            xqb, xsb = kernels._quantize_for_gemm(x, 128)
            wsb = kernels.gemm_scale_layout(torch.ones(n // 128, k // 128, device="cuda"), n, kernels.CUBLAS_BLOCK)
            row["fp8_block"] = median_ms(lambda: kernels._blockwise_mm(xqb, xsb, wq, wsb, None), 5, repeat, inner=20)
        else:
            row["fp8_block"] = row["fp8_tensor"]
        row["quant"] = median_ms(lambda: kernels._quantize_for_gemm(x, None), 5, repeat, inner=20)
        if m <= kernels.GEMV_MAX_ROWS:  # what Fp8Linear runs for few rows: the FP8-weight GEMV
            from omni_fp8.runtime.triton_kernels import fp8_weight_gemv

            wscale = torch.ones((), device="cuda")
            row["gemv"] = median_ms(lambda: fp8_weight_gemv(x, wq, wscale, None, None), 5, repeat, inner=20)
            row["fp8_tensor_gemm"], row["fp8_tensor"] = row["fp8_tensor"], min(row["fp8_tensor"], row["gemv"])
            row["fp8_block_gemm"], row["fp8_block"] = row["fp8_block"], min(row["fp8_block"], row["gemv"])
        rows[f"{m}x{n}x{k}"] = row
    return rows


def launch_costs(k: int = 3072, calls: int = 2000) -> dict:
    """Host time per call of each piece of an FP8 Linear, on a problem too small to keep the GPU
    busy (M=16), so the rate is the launch cost: eager mode pays it for every Linear."""
    from omni_fp8 import Fp8Linear
    from omni_fp8.runtime import kernels
    from omni_fp8.runtime.triton_kernels import quantize_activation_cuda

    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    linear = nn.Linear(k, k).cuda().bfloat16()
    layer = Fp8Linear.from_linear(linear).cuda()
    xq, xs = quantize_activation_cuda(x, 0)
    pieces = {
        "nn.Linear (bf16)": lambda: linear(x),
        "Fp8Linear": lambda: layer(x.clone()),
        "x.clone() (subtract from Fp8Linear)": lambda: x.clone(),
        "triton quantize": lambda: quantize_activation_cuda(x, 0),
        "torch._scaled_mm": lambda: kernels._rowwise_mm(xq, xs, layer.weight, layer.gemm_scale, layer.bias),
        "torch.empty": lambda: torch.empty(16, k, device="cuda"),
    }
    costs = {}
    with torch.no_grad():
        for name, fn in pieces.items():
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            costs[name] = (time.perf_counter() - start) / calls * 1e6
    print("Host time per call (us): " + ", ".join(f"{n} {c:.1f}" for n, c in costs.items()))
    return costs


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run_model(name: str, a) -> dict:
    from omni_fp8 import Fp8Config, quantize_

    torch.cuda.empty_cache()
    result: dict = {"model": name, "blocks": a.blocks or MODELS[name]["config"][MODELS[name]["depth_key"]]}
    if PROFILE:
        result["launch_us"] = launch_costs()
    model = build(name, a.blocks)
    args_, kwargs = inputs(name, model, a.height, a.width, a.txt)
    result["bf16_weight_bytes"] = weight_bytes(model)
    shapes = linear_shapes(model, args_, kwargs)
    result["linears"] = time_linears(shapes, a.repeat * 4)
    lin = result["linears"]
    t_lin = {s: sum(r["count"] * r[s] for r in lin.values()) for s in ("bf16", "fp8_tensor", "fp8_block")}
    result["linear_ms"] = t_lin
    timings: dict = {}
    for mode in a.modes:
        ms, cs, out = time_model(model, args_, kwargs, mode, a.warmup, a.repeat)
        timings[("bf16", mode)] = {"ms": ms, "compile_s": cs}
        if mode == "eager":
            reference = out
        print(f"  {name} bf16 {mode}: {ms:.1f} ms", flush=True)
    del model
    torch.cuda.empty_cache()
    errors, memory = {}, {}
    for scheme in a.schemes:
        model = build(name, a.blocks)
        quantize_(model, Fp8Config(preset=a.preset, weight_block_size=SCHEMES[scheme]))
        memory[scheme] = weight_bytes(model)
        for mode in a.modes:
            ms, cs, out = time_model(model, args_, kwargs, mode, a.warmup, a.repeat)
            timings[(scheme, mode)] = {"ms": ms, "compile_s": cs}
            if mode == "eager":
                errors[scheme] = ((out - reference).norm() / reference.norm()).item()
            print(f"  {name} fp8 {scheme} {mode}: {ms:.1f} ms", flush=True)
        del model
        torch.cuda.empty_cache()
    result["timings"] = {f"{k[0]}/{k[1]}": v for k, v in timings.items()}
    result["rel_l2_vs_bf16"] = errors
    result["fp8_weight_bytes"] = memory

    print(f"\n{name}: {result['blocks']} blocks, {a.height}x{a.width}, {a.txt} text tokens, preset {a.preset}, "
          f"{torch.cuda.get_device_name()}")
    print(f"Linears alone: BF16 {t_lin['bf16']:.1f} ms, FP8 per-tensor {t_lin['fp8_tensor']:.1f} ms, "
          f"FP8 block {t_lin['fp8_block']:.1f} ms (GEMM only)")
    header = f"{'scheme':<12} {'mode':<26} {'ms':>8} {'vs bf16':>8} {'ceiling':>8} {'of saving':>10} {'weights':>9} {'rel L2':>8}"
    print(header)
    for mode in a.modes:
        base = timings[("bf16", mode)]["ms"]
        print(f"{'bf16':<12} {mode:<26} {base:>8.1f} {1:>7.2f}x {'':>8} {'':>10} "
              f"{result['bf16_weight_bytes'] / 2**30:>5.1f} GiB {'':>8}")
        for scheme in a.schemes:
            ms = timings[(scheme, mode)]["ms"]
            saving = t_lin["bf16"] - t_lin[f"fp8_{scheme}"]
            ceiling = base / (base - saving) if base > saving else float("inf")
            reached = (base - ms) / saving if saving > 0 else float("nan")
            print(f"{'fp8 ' + scheme:<12} {mode:<26} {ms:>8.1f} {base / ms:>7.2f}x {ceiling:>7.2f}x {100 * reached:>9.0f}% "
                  f"{memory[scheme] / 2**30:>5.1f} GiB {_error_text(errors.get(scheme)):>8}")
    print("FP8 weight memory vs BF16: " + ", ".join(
        f"{s} {100 * memory[s] / result['bf16_weight_bytes']:.1f}%" for s in a.schemes))
    print(f"{'Linear MxNxK':<20} {'count':>5} {'bf16 us':>8} {'fp8 us':>8} {'block us':>9} {'quant us':>9} {'gemv us':>8}")
    for shape, v in lin.items():
        gemm, block = v.get("fp8_tensor_gemm", v["fp8_tensor"]), v.get("fp8_block_gemm", v["fp8_block"])
        gemv = f"{v['gemv'] * 1e3:>8.0f}" if "gemv" in v else f"{'':>8}"
        print(f"{shape:<20} {v['count']:>5} {v['bf16'] * 1e3:>8.0f} {gemm * 1e3:>8.0f} "
              f"{block * 1e3:>9.0f} {v['quant'] * 1e3:>9.0f} {gemv}")
    return result


def _error_text(error: float | None) -> str:
    return "-" if error is None else f"{error:.4f}"  # needs the eager mode, which gives the reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=list(MODELS))
    parser.add_argument("--blocks", type=int, help="fewer blocks for a quick run (default: full depth)")
    parser.add_argument("--scheme", dest="schemes", action="append", choices=list(SCHEMES))
    parser.add_argument("--mode", dest="modes", action="append",
                        help="eager, default, max-autotune-no-cudagraphs (default: eager and default)")
    parser.add_argument("--preset", default="none", help="'none' quantizes every aligned Linear")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--txt", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", action="store_true", help="print each mode's top GPU kernels")
    a = parser.parse_args()
    global PROFILE
    PROFILE = a.profile
    a.model = a.model or list(MODELS)
    a.schemes = a.schemes or list(SCHEMES)
    a.modes = a.modes or ["eager", "default"]
    results = []
    for name in a.model:
        results.append(run_model(name, a))
        if a.json:
            a.json.write_text(json.dumps(results, indent=2))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
