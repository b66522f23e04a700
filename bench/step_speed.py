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
    python bench/step_speed.py --model qwen-image --scheme tensor --mode eager --mode graphs \
        --processes 10 --host --no-linears                            # eager, fresh processes
    python bench/step_speed.py --model qwen-image --scheme tensor --peer torchao-row \
        --peer diffusers-fp8r --mode eager --mode default             # peers in the same run
    python bench/step_speed.py --model qwen-image --scheme tensor --fused --no-linears
                                      # + fuse_blocks_ on BF16 and each scheme (fused-bf16, ...)
    python bench/step_speed.py --model qwen-image --model z-image --scheme tensor --scheme tensor-static \
        --scheme channel --scheme channel-static --mode eager --mode graphs --mode default   # static activations

``-static`` schemes (``tensor-static``, ``channel-static``, ``block-static``) quantize activations
with one calibrated ``input_scale`` per Linear instead of per-token scales: the calibration is the
timed input itself (``calibrate`` on the BF16 model), which is what a real calibration gives
at this timestep.
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
from collections.abc import Iterator, Sequence
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


TEXT_MASK = True  # Qwen-Image: pass the (all-True) text mask, as the pipeline does


def inputs(name: str, model: nn.Module, height: int, width: int, txt: int,
           device: str = "cuda") -> tuple[tuple, dict]:
    gen = torch.Generator(device=device).manual_seed(1)
    cfg = model.config
    if name == "qwen-image":
        h, w = height // 16, width // 16
        return (), {
            "hidden_states": torch.randn(1, h * w, cfg.in_channels, device=device, generator=gen).bfloat16(),
            "encoder_hidden_states": torch.randn(1, txt, cfg.joint_attention_dim, device=device, generator=gen).bfloat16(),
            # what QwenImagePipeline passes for one prompt: a mask with no padding (``--no-text-mask``: None)
            "encoder_hidden_states_mask": torch.ones(1, txt, dtype=torch.bool, device=device) if TEXT_MASK else None,
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


def sample_ms(fn, warmup: int, repeat: int, inner: int = 1) -> list[float]:
    """``repeat`` samples of the mean time of ``inner`` back-to-back calls, after ``warmup`` calls:
    CUDA events on a GPU, the wall clock without one (the benches' CPU smoke tests).

    Back-to-back calls let the GPU run ahead of the launches, as inside a forward; a single
    synchronised call would time the launch latency instead of the kernel.
    """
    for _ in range(warmup):
        fn()
    times = []
    if not torch.cuda.is_available():
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - start) * 1e3 / inner)
        return times
    torch.cuda.synchronize()
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return times


def median_ms(fn, warmup: int, repeat: int, inner: int = 1) -> float:
    """The median of ``sample_ms``."""
    return statistics.median(sample_ms(fn, warmup, repeat, inner))


def time_model(model, args_, kwargs, mode: str, warmup: int, repeat: int) -> tuple[float, float, torch.Tensor]:
    """Median ms of one forward in ``mode`` and the seconds its first call took (compile, capture).

    Modes: ``eager``; ``graphs`` (eager blocks replayed as CUDA graphs, ``enable_cuda_graphs``);
    a torch.compile mode (``default``, ``max-autotune-no-cudagraphs``) of the repeated blocks;
    ``compiled-graphs``: each block compiled and its compiled kernels replayed as a CUDA graph
    (``enable_cuda_graphs`` around the compiled forward). Inductor's own ``reduce-overhead``
    fails with regional compilation: one block's graph output is overwritten by the next block's
    replay before it is read.
    """
    from omni_fp8.runtime.cuda_graphs import disable_cuda_graphs, enable_cuda_graphs, repeated_blocks

    torch._dynamo.reset()
    for block in repeated_blocks(model):
        block._compiled_call_impl = None  # back to eager
    compile_s = 0.0
    with torch.no_grad():
        if mode == "graphs":
            enable_cuda_graphs(model)
            start = time.perf_counter()
            for _ in range(2):  # the warm-up call, then the capture
                model(*args_, **kwargs)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
        elif mode == "compiled-graphs":
            originals = _compile_inside_graphs(model)
            start = time.perf_counter()
            for _ in range(2):  # the warm-up call (compiles), then the capture
                model(*args_, **kwargs)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
        elif mode != "eager":
            model.compile_repeated_blocks(fullgraph=True, mode=None if mode == "default" else mode)
            start = time.perf_counter()
            model(*args_, **kwargs)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
        ms = median_ms(lambda: model(*args_, **kwargs), warmup, repeat)
        out = output(model(*args_, **kwargs)).float()
        if PROFILE:
            profile(lambda: model(*args_, **kwargs), mode)
        if mode in ("graphs", "compiled-graphs"):
            disable_cuda_graphs(model)
            torch.cuda.empty_cache()
        if mode == "compiled-graphs":
            for block, forward in originals:
                block.forward = forward
    return ms, compile_s, out


def _compile_inside_graphs(model) -> list:
    """``enable_cuda_graphs`` with each block's own forward compiled (Inductor, fullgraph) inside
    the graph hook: the graphs replay the compiled kernels, which would remove the compiled step's
    launch gaps if it had any (measured on an H200: no faster, bench/RESULTS.md). Returns the
    blocks' forwards to put back."""
    from diffusers.hooks import HookRegistry
    from omni_fp8.runtime.cuda_graphs import HOOK_NAME, enable_cuda_graphs, repeated_blocks

    blocks = repeated_blocks(model)
    originals = [(block, block.forward) for block in blocks]
    enable_cuda_graphs(model)
    for block in blocks:
        hook = HookRegistry.check_if_exists_or_initialize(block).get_hook(HOOK_NAME)
        hook.fn_ref.original_forward = torch.compile(hook.fn_ref.original_forward, fullgraph=True)
    return originals


def host_ms(model, name: str, repeat: int = 5) -> float:
    """Host time of one eager forward: the same blocks and kernels on a 128x128 image (64 image
    tokens) with 32 text tokens, where the GPU work is too small to set the pace (so wall time is
    launch time); more than 16 rows, so the FP8 Linears take the same path as at full size."""
    args_, kwargs = inputs(name, model, 128, 128, 32)
    with torch.no_grad():
        for _ in range(2):
            model(*args_, **kwargs)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            model(*args_, **kwargs)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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


def gemm_ms(m: int, n: int, k: int, repeat: int, which: Sequence[str]) -> dict[str, float]:
    """Median ms of one ``m x n x k`` GEMM alone (activation quantization excluded), for each of
    ``which``: ``bf16`` (F.linear); FP8 ``row`` (per-token x per-row scales: dynamic activations,
    per-channel weights, fused QKV), ``tensor`` (a scalar scale on both sides: static per-tensor
    layers), each with ``-fast`` accumulation; ``block`` (128x128 block scales; the row-wise GEMM's
    time where this GPU or shape has none)."""
    from omni_fp8.converter.numerics import FP8_DTYPE, quantize_activation
    from omni_fp8.runtime import kernels

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    wq = (w * 8).to(FP8_DTYPE)
    xq, xs = quantize_activation(x)
    ws, one = torch.ones(1, n, device="cuda"), torch.ones((), device="cuda")
    calls = {
        "bf16": lambda: F.linear(x, w),
        "row": lambda: kernels._rowwise_mm(xq, xs, wq, ws, None),
        "row-fast": lambda: kernels._rowwise_mm(xq, xs, wq, ws, None, True),
        "tensor": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
        "tensor-fast": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                use_fast_accum=True),
    }
    if kernels._probe(torch.device("cuda"), kernels.CUBLAS_BLOCK) is not None and n % 128 == 0 and k % 128 == 0:
        xqb, xsb = kernels._quantize_for_gemm(x, 128)
        wsb = kernels.gemm_scale_layout(torch.ones(n // 128, k // 128, device="cuda"), n, kernels.CUBLAS_BLOCK)
        calls["block"] = lambda: kernels._blockwise_mm(xqb, xsb, wq, wsb, None)
    else:
        calls["block"] = calls["row"]
    return {g: median_ms(calls[g], 5, repeat, inner=20) for g in which}


def time_linears(shapes: Counter, repeat: int) -> dict:
    """Per shape: BF16 F.linear, FP8 row-wise GEMM, FP8 block GEMM (activation quantization excluded)."""
    from omni_fp8.converter.numerics import FP8_DTYPE
    from omni_fp8.runtime import kernels

    rows = {}
    for (m, n, k), count in sorted(shapes.items()):
        t = gemm_ms(m, n, k, repeat, ("bf16", "row", "block"))
        row = {"count": count, "bf16": t["bf16"], "fp8_tensor": t["row"], "fp8_block": t["block"]}
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row["quant"] = median_ms(lambda: kernels._quantize_for_gemm(x, None), 5, repeat, inner=20)
        if m <= kernels.GEMV_MAX_ROWS:  # what Fp8Linear runs for few rows: the FP8-weight GEMV
            from omni_fp8.runtime.triton_kernels import fp8_weight_gemv

            wq = (torch.randn(n, k, device="cuda") / math.sqrt(k) * 8).to(FP8_DTYPE)
            wscale = torch.ones((), device="cuda")
            row["gemv"] = median_ms(lambda: fp8_weight_gemv(x, wq, wscale, None, None), 5, repeat, inner=20)
            row["fp8_tensor_gemm"], row["fp8_tensor"] = row["fp8_tensor"], min(row["fp8_tensor"], row["gemv"])
            row["fp8_block_gemm"], row["fp8_block"] = row["fp8_block"], min(row["fp8_block"], row["gemv"])
        rows[f"{m}x{n}x{k}"] = row
    return rows


def launch_costs(k: int = 3072, calls: int = 2000) -> dict:
    """Host time per call of each piece of an FP8 Linear, on problems too small to keep the GPU
    busy (64 rows: quantize + GEMM; 1 row: the GEMV), so the rate is the launch cost: eager mode
    pays it for every Linear."""
    from omni_fp8 import Fp8Linear
    from omni_fp8.runtime import kernels, triton_kernels
    from omni_fp8.runtime.triton_kernels import quantize_activation_cuda

    x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    x1 = x[:1].clone()
    linear = nn.Linear(k, k).cuda().bfloat16()
    layer = Fp8Linear.from_linear(linear).cuda()
    rows = Fp8Linear.from_linear(linear, per_channel=True).cuda()
    xq, xs = quantize_activation_cuda(x, 0)
    weight_t = layer.weight.t()

    def general():
        kernels.forget_shared_activation()
        return kernels.fp8_linear(x, layer.weight, layer.scale, layer.bias, None, layer._gemm_fn, layer.gemm_scale)

    def shortcut():
        kernels.forget_shared_activation()
        return layer(x)

    pieces = {
        "nn.Linear (bf16)": lambda: linear(x),
        "Fp8Linear": shortcut,
        "Fp8Linear._eager (no module call)": lambda: (kernels.forget_shared_activation(), layer._eager(x)),
        "fp8_linear, the general path": general,
        "Fp8Linear, 1 row (GEMV)": lambda: layer(x1),
        "Fp8Linear per-channel": lambda: (kernels.forget_shared_activation(), rows(x)),
        "Fp8Linear per-channel, 1 row (GEMV)": lambda: rows(x1),
        "nn.Linear, 1 row": lambda: linear(x1),
        "triton quantize": lambda: quantize_activation_cuda(x, 0),
        "triton quantize, Triton's own launch": lambda: _launch_through_triton(x),
        "torch._scaled_mm": lambda: torch._scaled_mm(xq, weight_t, scale_a=xs, scale_b=layer.gemm_scale,
                                                     bias=layer.bias, out_dtype=torch.bfloat16),
        "torch.empty": lambda: torch.empty(16, k, device="cuda"),
        "x.reshape + view": lambda: x.reshape(-1, k).view(64, k),
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
    launcher = triton_kernels._QUANTIZE
    print(f"Direct Triton launches: {launcher.direct} ({launcher.why_not}), patterns kept: {len(launcher.compiled)}")
    print("Host time per call (us): " + ", ".join(f"{n} {c:.1f}" for n, c in costs.items()))
    return costs


def _launch_through_triton(x: torch.Tensor) -> None:
    from omni_fp8.converter.numerics import FP8_MAX, MIN_SCALE
    from omni_fp8.runtime import triton_kernels

    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block, warps = triton_kernels._launch_shape(k)
    triton_kernels._quantize_rows[(m, 1)](x, q, s, m, k, k, k, k, 1, 0, BLOCK=block, FP8_LIMIT=FP8_MAX,
                                          MIN_SCALE=MIN_SCALE, num_warps=warps)


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


PEERS = ("torchao-row", "torchao-tensor", "diffusers-fp8r")


def quantized(name: str, variant: str, a) -> nn.Module:
    """The model in ``variant``: one of ours (``tensor``, ``block``, ``channel``, ``tensor-fast``)
    or a peer's, on the same seeded weights, quantizing the same Linears (``--preset``);
    ``fused-<bf16 or one of ours>``: that model with ``fuse_blocks_`` applied."""
    from omni_fp8 import Fp8Config, Fp8Linear, fuse_blocks_, quantize_
    from omni_fp8.converter.plan import decide_linears

    if variant.startswith("fused-"):
        base = variant.removeprefix("fused-")
        return fuse_blocks_(build(name, a.blocks) if base == "bf16" else quantized(name, base, a))
    model = build(name, a.blocks)
    static = variant.endswith("-static")
    variant = variant.removesuffix("-static")
    scales = None
    if static:
        from omni_fp8 import calibrate

        args_, kwargs = inputs(name, model, a.height, a.width, a.txt)
        if args_:  # Z-Image's forward(x, t, cap_feats): calibrate takes keyword arguments
            kwargs = {"x": args_[0], "t": args_[1], "cap_feats": args_[2], **kwargs}
        scales = calibrate(model, [kwargs], progress=False)
    config = Fp8Config(preset=a.preset, weight_block_size=SCHEMES.get(variant),
                       weight_strategy="channel" if variant == "channel" else None,
                       **({"activation_scheme": "static", "calibration": scales} if static else {}))
    if variant in ("tensor", "block", "tensor-fast", "channel"):
        quantize_(model, config)
        if variant == "tensor-fast":  # cuBLASLt's fast accumulation, as diffusers' fp8r layer uses
            for layer in model.modules():
                if isinstance(layer, Fp8Linear):
                    layer.fast_accum = True
        return model
    chosen = [n for n, d in decide_linears(model, config).decisions.items() if d.quantized]
    with torch.no_grad():
        if variant == "diffusers-fp8r":  # diffusers' own layer for BFL fp8r checkpoints
            from diffusers.quantizers.bfl.utils import BFLFP8RLinear
            from omni_fp8.converter.numerics import quantize_per_channel

            for n in chosen:
                linear = model.get_submodule(n)
                layer = BFLFP8RLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                      compute_dtype=torch.bfloat16, device="cuda")
                q, scale = quantize_per_channel(linear.weight)
                layer.weight.data = q
                layer.weight_scale.copy_(scale.reshape(-1))
                if linear.bias is not None:
                    layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
                model.set_submodule(n, layer)
        elif variant.startswith("torchao-"):  # diffusers + torchao float8 dynamic activations and weights
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor
            from torchao.quantization import quantize_ as torchao_quantize

            granularity = PerRow() if variant == "torchao-row" else PerTensor()
            wanted = set(chosen)
            torchao_quantize(model, Float8DynamicActivationFloat8WeightConfig(granularity=granularity),
                             filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in wanted)
        else:
            raise SystemExit(f"unknown variant {variant!r}")
    return model


def run_model(name: str, a) -> dict:
    torch.cuda.empty_cache()
    result: dict = {"model": name, "blocks": a.blocks or MODELS[name]["config"][MODELS[name]["depth_key"]],
                    "preset": a.preset, "process": process_facts()}
    if PROFILE or a.launch_costs:
        result["launch_us"] = launch_costs()
    model = build(name, a.blocks)
    args_, kwargs = inputs(name, model, a.height, a.width, a.txt)
    result["bf16_weight_bytes"] = weight_bytes(model)
    t_lin = None
    if a.linears:
        shapes = linear_shapes(model, args_, kwargs)
        result["linears"] = time_linears(shapes, a.repeat * 4)
        lin = result["linears"]
        t_lin = {s: sum(r["count"] * r[s] for r in lin.values()) for s in ("bf16", "fp8_tensor", "fp8_block")}
        result["linear_ms"] = t_lin
    timings: dict = {}
    host: dict = {}
    for mode in a.modes:
        ms, cs, out = time_model(model, args_, kwargs, mode, a.warmup, a.repeat)
        timings[("bf16", mode)] = {"ms": ms, "compile_s": cs}
        if mode == "eager":
            reference = out
        print(f"  {name} bf16 {mode}: {ms:.1f} ms", flush=True)
    if a.host:
        host["bf16"] = host_ms(model, name)
        print(f"  {name} bf16 host per forward: {host['bf16']:.1f} ms", flush=True)
    del model
    torch.cuda.empty_cache()
    errors, memory, eager_out, vs_unfused = {}, {}, {"bf16": reference} if "eager" in a.modes else {}, {}
    for variant in a.variants:
        try:
            model = quantized(name, variant, a)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            print(f"  {name} {variant}: could not build ({type(e).__name__}: {e})", flush=True)
            continue
        memory[variant] = weight_bytes(model)
        for mode in a.modes:
            if mode == "graphs" and variant in PEERS:
                continue
            try:
                ms, cs, out = time_model(model, args_, kwargs, mode, a.warmup, a.repeat)
            except Exception as e:  # noqa: BLE001
                print(f"  {name} {variant} {mode}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                continue
            timings[(variant, mode)] = {"ms": ms, "compile_s": cs}
            if mode == "eager":
                errors[variant] = ((out - reference).norm() / reference.norm()).item()
                eager_out[variant] = out
                unfused = eager_out.get(variant.removeprefix("fused-")) if variant.startswith("fused-") else None
                if unfused is not None:  # what fusing alone changed
                    vs_unfused[variant] = ((out - unfused).norm() / unfused.norm()).item()
            print(f"  {name} {variant} {mode}: {ms:.1f} ms (first call {cs:.1f} s)", flush=True)
        if a.host:
            host[variant] = host_ms(model, name)
            print(f"  {name} {variant} host per forward: {host[variant]:.1f} ms", flush=True)
        del model
        torch.cuda.empty_cache()
    result["timings"] = {f"{k[0]}/{k[1]}": v for k, v in timings.items()}
    result["host_ms"] = host
    result["rel_l2_vs_bf16"] = errors
    result["rel_l2_fused_vs_unfused"] = vs_unfused
    result["fp8_weight_bytes"] = memory
    if not a.quiet_table:
        print_table(result, a, t_lin, timings, memory, errors)
    return result


def process_facts() -> dict:
    """What differs between processes on a shared machine: CPUs allowed, their clock, the GPU's."""
    import os

    facts: dict = {"pid": os.getpid(), "cpus": len(os.sched_getaffinity(0))}
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
        facts["cpu_mhz_median"] = statistics.median(mhz) if mhz else None
    except OSError:
        pass
    return facts


def print_table(result, a, t_lin, timings, memory, errors) -> None:
    name = result["model"]
    print(f"\n{name}: {result['blocks']} blocks, {a.height}x{a.width}, {a.txt} text tokens, preset {a.preset}, "
          f"{torch.cuda.get_device_name()}")
    if t_lin:
        print(f"Linears alone: BF16 {t_lin['bf16']:.1f} ms, FP8 per-tensor {t_lin['fp8_tensor']:.1f} ms, "
              f"FP8 block {t_lin['fp8_block']:.1f} ms (GEMM only)")
    header = (f"{'variant':<16} {'mode':<26} {'ms':>8} {'vs bf16':>8} {'ceiling':>8} {'of saving':>10} "
              f"{'first call':>10} {'weights':>9} {'rel L2':>8}")
    print(header)
    for mode in a.modes:
        base = timings[("bf16", mode)]["ms"]
        print(f"{'bf16':<16} {mode:<26} {base:>8.1f} {1:>7.2f}x {'':>8} {'':>10} "
              f"{timings[('bf16', mode)]['compile_s']:>9.1f}s {result['bf16_weight_bytes'] / 2**30:>5.1f} GiB {'':>8}")
        for variant in a.variants:
            if (variant, mode) not in timings:
                continue
            ms = timings[(variant, mode)]["ms"]
            key = "fp8_block" if variant.removeprefix("fused-").startswith("block") else "fp8_tensor"
            if t_lin and variant != "fused-bf16":
                saving = t_lin["bf16"] - t_lin[key]
                ceiling = f"{base / (base - saving):>7.2f}x" if base > saving else f"{'inf':>8}"
                reached = f"{100 * (base - ms) / saving:>9.0f}%" if saving > 0 else f"{'':>10}"
            else:
                ceiling, reached = f"{'':>8}", f"{'':>10}"
            print(f"{variant:<16} {mode:<26} {ms:>8.1f} {base / ms:>7.2f}x {ceiling} {reached} "
                  f"{timings[(variant, mode)]['compile_s']:>9.1f}s {memory[variant] / 2**30:>5.1f} GiB "
                  f"{_error_text(errors.get(variant)):>8}")
    fused = result.get("rel_l2_fused_vs_unfused")
    if fused:
        print("Fused attention vs the same model unfused, eager, rel. L2: "
              + ", ".join(f"{v} {e:.4f}" for v, e in fused.items()))
    if t_lin:
        print(f"{'Linear MxNxK':<20} {'count':>5} {'bf16 us':>8} {'fp8 us':>8} {'block us':>9} {'quant us':>9} {'gemv us':>8}")
        for shape, v in result["linears"].items():
            gemm, block = v.get("fp8_tensor_gemm", v["fp8_tensor"]), v.get("fp8_block_gemm", v["fp8_block"])
            gemv = f"{v['gemv'] * 1e3:>8.0f}" if "gemv" in v else f"{'':>8}"
            print(f"{shape:<20} {v['count']:>5} {v['bf16'] * 1e3:>8.0f} {gemm * 1e3:>8.0f} "
                  f"{block * 1e3:>9.0f} {v['quant'] * 1e3:>9.0f} {gemv}")


def processes(a, argv: list[str]) -> None:
    """Run the same measurement in ``a.processes`` fresh processes; report min / median / max of
    each time and of each ratio against BF16 taken within its own process."""
    import os
    import subprocess
    import tempfile

    runs: list[list[dict]] = []
    child_argv = []
    skip = False
    for arg in argv:  # drop --processes N and --json PATH: the children write their own
        if skip:
            skip = False
            continue
        if arg in ("--processes", "--json"):
            skip = True
            continue
        if arg.startswith(("--processes=", "--json=")):
            continue
        child_argv.append(arg)
    for i in range(a.processes):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, __file__, *child_argv, "--quiet-table", "--json", path]
        print(f"process {i + 1}/{a.processes}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode == 0:
            runs.append(json.loads(Path(path).read_text()))
        os.unlink(path)
        if a.json:  # after each process, so a run cut short keeps what it measured
            a.json.write_text(json.dumps({"processes": runs}, indent=2))
    summary = []
    for m_index, name in enumerate(a.model):
        per = [r[m_index] for r in runs if len(r) > m_index]
        print(f"\n{name}: {len(per)} fresh processes, {per[0]['blocks'] if per else '?'} blocks, preset {a.preset}")
        print(f"{'variant':<16} {'mode':<8} {'ms min/median/max':>26} {'vs bf16 min/median/max':>26} "
              f"{'host ms/forward':>16}")
        keys = sorted({k for r in per for k in r["timings"]}, key=lambda k: (k.split("/")[1], k != f"bf16/{k.split('/')[1]}"))
        for key in keys:
            variant, mode = key.split("/")
            ms = [r["timings"][key]["ms"] for r in per if key in r["timings"]]
            ratios = [r["timings"][f"bf16/{mode}"]["ms"] / r["timings"][key]["ms"] for r in per
                      if key in r["timings"] and f"bf16/{mode}" in r["timings"]]
            hosts = [r["host_ms"][variant] for r in per if variant in r.get("host_ms", {})]
            row = {"model": name, "variant": variant, "mode": mode, "ms": ms, "vs_bf16": ratios, "host_ms": hosts}
            summary.append(row)
            host = f"{statistics.median(hosts):>16.1f}" if hosts and mode == "eager" else f"{'':>16}"
            print(f"{variant:<16} {mode:<8} {_spread(ms, '{:.1f}'):>26} {_spread(ratios, '{:.2f}x'):>26} {host}")
    if a.json:
        a.json.write_text(json.dumps({"processes": runs, "summary": summary}, indent=2))


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def _error_text(error: float | None) -> str:
    return "-" if error is None else f"{error:.4f}"  # needs the eager mode, which gives the reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=list(MODELS))
    parser.add_argument("--blocks", type=int, help="fewer blocks for a quick run (default: full depth)")
    ours = [*SCHEMES, "channel", "tensor-fast"]
    parser.add_argument("--scheme", dest="schemes", action="append",
                        choices=[f"{f}{s}{t}" for f in ("", "fused-") for s in ours for t in ("", "-static")]
                        + ["fused-bf16"],
                        help="ours: tensor, block, channel (row-wise weight scales), tensor-fast (fast accumulation); "
                             "X-static: the same with calibrated static activation scales; fused-X: with fuse_blocks_")
    parser.add_argument("--peer", dest="peers", action="append", default=[], choices=list(PEERS),
                        help="a peer's FP8 on the same weights: torchao-row, torchao-tensor, diffusers-fp8r")
    parser.add_argument("--mode", dest="modes", action="append",
                        help="eager, graphs, default, max-autotune-no-cudagraphs, compiled-graphs (default: eager and default)")
    parser.add_argument("--preset", default="none", help="'none' quantizes every aligned Linear")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--txt", type=int, default=256)
    parser.add_argument("--no-text-mask", dest="text_mask", action="store_false",
                        help="Qwen-Image: no encoder_hidden_states_mask (the joint attention then runs unmasked)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--processes", type=int, default=0,
                        help="run everything in N fresh processes and report min / median / max")
    parser.add_argument("--fused", action="store_true",
                        help="also each scheme and BF16 with fuse_blocks_ (variants fused-bf16, fused-<scheme>)")
    parser.add_argument("--launch-costs", action="store_true", help="host time per call of an FP8 Linear's pieces")
    parser.add_argument("--host", action="store_true", help="also measure each variant's host time per forward")
    parser.add_argument("--no-linears", dest="linears", action="store_false",
                        help="skip timing each Linear shape alone (the ceiling)")
    parser.add_argument("--static-scalar-gemm", action="store_true",
                        help="static per-tensor layers: the scalar-scaled GEMM at every shape (not row-wise where N >= K)")
    parser.add_argument("--qk-inductor", action="store_true",
                        help="fused blocks under torch.compile: QK-norm and RoPE by Inductor, not the Triton kernel")
    parser.add_argument("--quiet-table", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", action="store_true", help="print each mode's top GPU kernels")
    a = parser.parse_args()
    global PROFILE, TEXT_MASK
    PROFILE = a.profile
    TEXT_MASK = a.text_mask
    if a.static_scalar_gemm:
        from omni_fp8.runtime import kernels

        kernels.STATIC_ROWWISE_UNLESS_K_ABOVE_N = False
    if a.qk_inductor:
        from omni_fp8.runtime import fused_blocks

        fused_blocks._COMPILED_QK_KERNEL = False
    a.model = a.model or list(MODELS)
    a.schemes = a.schemes or ["tensor", "block"]
    a.variants = [*a.schemes, *a.peers]
    if a.fused:  # right after its unfused form, so the fused-vs-unfused error has its reference
        a.variants = ["fused-bf16"] + [v for s in a.schemes for v in (s, f"fused-{s}")] + a.peers
    a.modes = a.modes or ["eager", "default"]
    if a.processes:
        processes(a, sys.argv[1:])
        return
    results = []
    for name in a.model:
        results.append(run_model(name, a))
        if a.json:
            a.json.write_text(json.dumps(results, indent=2))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
