"""Where one transformer pass spends its GPU time, by kind of kernel: BF16 against FP8, eager and compiled.

For each variant (``bf16``; FP8 ``tensor``, ``block``, ``channel`` as in step_speed.py; any of
them with ``fused-`` in front: ``fuse_blocks_`` applied) and mode (``eager``, ``graphs``, a
torch.compile mode of the repeated blocks), one pass of the real-width model with ``--blocks``
blocks is profiled (torch.profiler) and its kernel time is grouped into:

    gemm          cuBLAS / cuBLASLt / CUTLASS / nvjet kernels, torch._scaled_mm
    fp8 gemv      the few-row FP8-weight GEMV (the AdaLN modulation Linears)
    fp8 quant     the activation quantization: our Triton kernel in eager mode; under
                  torch.compile the Inductor kernel it is fused into (its producer included:
                  the amax reduction, or with static scales the clamp feeding ``_scaled_mm``)
    attention     the SDPA kernels (which backend ran is printed from the aten op's name)
    norm          LayerNorm / RMSNorm (QK-norm), alone or with what Inductor fused into them
                  (the RoPE and the attention's layout too; ``fuse_blocks_``' QK-norm/RoPE kernel)
    rope          rotary embedding (complex multiplication, or its real form)
    modulation    AdaLN modulate and gates, GELU/SiLU, residual adds: the other elementwise work
                  (``fused-`` FP8 variants: the modulation kernel that also writes the FP8 codes)
    copies        cat / contiguous / dtype casts that only move data
    other         the rest

In eager mode the kernels are attributed by where they were launched (the RoPE function, the
norm modules, ``_modulate``, the attention call), else by kernel name; compiled kernels by their
Inductor names, which list the fused operations. The pass is profiled with the blocks and again
without the main blocks; each category is scaled to the model's full depth as
``outside + (with - outside) * depth / blocks``, and so is the wall time of one pass.

    python bench/profile_step.py --model qwen-image --blocks 4 --variant bf16 --variant tensor \\
        --variant fused-tensor --mode eager --mode default --json bench/results/profile_step_qwen_h200.json
    python bench/profile_step.py --tiny --device cpu        # smoke run: CPU op time instead of kernels
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_speed  # noqa: E402  (the same models, inputs and variants)

CATEGORIES = ("gemm", "fp8 gemv", "fp8 quant", "attention", "norm", "rope", "modulation", "copies", "other")
MAIN_BLOCKS = {"qwen-image": "transformer_blocks", "z-image": "layers"}
LABELS = ("attention", "rope", "norm", "modulation", "linear")


def build_variant(name: str, variant: str, a) -> nn.Module:
    """The model in ``variant`` on ``a.device``: step_speed's seeded real-width models on a GPU,
    the tiny test models on the CPU (``--tiny``)."""
    fused = variant.startswith("fused-")
    scheme = variant.removeprefix("fused-")
    if a.tiny:
        from omni_fp8 import Fp8Config, quantize_
        from omni_fp8.converter.demo import tiny_qwen_image, tiny_z_image

        depth_key = step_speed.MODELS[name]["depth_key"]
        maker = tiny_qwen_image if name == "qwen-image" else tiny_z_image
        model = maker(seed=0, **{depth_key: a.blocks}).to(device=a.device, dtype=torch.bfloat16)
        if scheme != "bf16":
            block = step_speed.SCHEMES.get(scheme)
            quantize_(model, Fp8Config(preset=a.preset, weight_block_size=(32, 32) if block else None))
    elif scheme == "bf16":
        model = step_speed.build(name, a.blocks)
    else:
        model = step_speed.quantized(name, scheme, a)
    if fused:
        from omni_fp8 import fuse_blocks_

        fuse_blocks_(model)
    return model


@contextlib.contextmanager
def labels(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Profiler ranges around the pieces a kernel name does not identify in eager mode (RoPE,
    the norms, AdaLN modulate, the attention call, each Linear). Off under torch.compile: the
    hooks would sit inside the compiled blocks."""
    if not enabled:
        yield
        return
    from diffusers.models import attention_dispatch
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers import transformer_qwenimage as qwen

    from omni_fp8 import Fp8Linear
    from omni_fp8.runtime import fused_blocks

    def ranged(label, fn):
        def run(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return run

    patches = [(attention_dispatch, "dispatch_attention_fn", "attention"), (qwen, "dispatch_attention_fn", "attention"),
               (qwen, "apply_rotary_emb_qwen", "rope"), (fused_blocks, "_rope", "rope"),
               (qwen.QwenImageTransformerBlock, "_modulate", "modulation")]
    try:
        from diffusers.models.transformers import transformer_z_image as zimage

        patches.append((zimage, "dispatch_attention_fn", "attention"))
    except ImportError:
        pass
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    for owner, attr, label in patches:
        setattr(owner, attr, ranged(label, getattr(owner, attr)))
    handles = []
    kinds = {nn.LayerNorm: "norm", RMSNorm: "norm", nn.Linear: "linear", Fp8Linear: "linear"}
    for module in model.modules():
        label = next((lbl for cls, lbl in kinds.items() if isinstance(module, cls)), None)
        if label is None:
            continue
        stack: list = []

        def enter(_m, _args, label=label, stack=stack):
            r = torch.profiler.record_function(label)
            r.__enter__()
            stack.append(r)

        def leave(_m, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


_GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|cublas|scaled_mm|wgmma|splitk|aten::(mm|addmm|bmm|matmul|linear)$", re.I)
_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|mha", re.I)


def classify(kernel: str, label: str | None) -> str:
    """The category of one kernel (or, on the CPU, one op) from its name and launch range."""
    name = kernel.lower()
    if "_quantize_rows" in name or ("amax" in name and "triton" in name):
        return "fp8 quant"
    if "fp8_weight_gemv" in name:
        return "fp8 gemv"
    if "_modulate_rows" in name:  # fuse_blocks_: AdaLN modulate, with the FP8 quantization when FP8
        return "modulation"
    if "_qk_norm_rope" in name:  # fuse_blocks_: QK-RMSNorm and RoPE, writing the attention's layout
        return "norm"
    inductor = name.startswith("triton_")  # its name lists the fused aten ops, the ops it feeds too
    if inductor and "clamp" in name and "scaled_mm" in name:  # static FP8: the producer writes the codes
        return "fp8 quant"
    if not inductor and (label == "attention" or _ATTENTION.search(name)):
        return "attention"
    if not inductor and _GEMM.search(name):
        return "gemm"
    if label in ("rope", "norm", "modulation"):
        return label
    if "triton" in name:  # an Inductor kernel
        if "rsqrt" in name or "layer_norm" in name or ("mean" in name and "pow" in name):
            return "norm"
        if "complex" in name or ("stack" in name and "sub" in name):
            return "rope"
        ops = set(re.sub(r"^triton_(poi|red|per)_fused_?", "", name).split("_")) - {"", "0", "1", "2", "3", "4"}
        if ops and ops <= {"cat", "clone", "to", "copy", "view", "slice", "unsqueeze", "expand", "permute", "transpose"}:
            return "copies"
        return "modulation"
    if "complex" in name or "view_as_real" in name or "view_as_complex" in name:
        return "rope"
    if "norm" in name:
        return "norm"
    if re.search(r"copy|cat(arraybatched)?|clone|contiguous|aten::(cat|_to_copy|copy_|clone)", name):
        return "copies"
    if label == "linear":  # bias adds and casts around a GEMM
        return "modulation"
    if re.search(r"elementwise|mul|add|gelu|silu|tanh|sigmoid|where|aten::", name):
        return "modulation"
    return "other"


def _label_of(event) -> str | None:
    while event is not None:
        if event.name in LABELS:
            return event.name
        event = event.cpu_parent
    return None


def profile_pass(fn, device: str, repeat: int) -> tuple[dict, list, dict]:
    """Kernel time per category of one call of ``fn`` (mean of ``repeat``), the top kernels, and
    the SDPA aten ops that ran (their names say which backend)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with torch_profile(activities=activities) as prof:
        for _ in range(repeat):
            fn()
        _sync(device)
    events = prof.events()
    per_kernel: Counter = Counter()
    labeled: dict[str, Counter] = defaultdict(Counter)
    sdpa: Counter = Counter()
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        if "scaled_dot_product" in e.name or "attention_forward" in e.name:
            sdpa[e.name] += 1
        if cuda:
            label = _label_of(e)
            for k in getattr(e, "kernels", []) or []:
                if label is not None:
                    labeled[k.name][label] += k.duration
        elif e.name not in LABELS:  # CPU: an op's own time stands for a kernel
            per_kernel[e.name] += e.self_cpu_time_total
            parent = _label_of(e.cpu_parent)
            if parent is not None:
                labeled[e.name][parent] += e.self_cpu_time_total
    if cuda:
        for e in prof.key_averages():
            # Our own ranges are mirrored onto the GPU timeline as annotations that span the
            # kernels they launched: counting them would count those kernels twice.
            if e.device_type == torch.autograd.DeviceType.CUDA and e.key not in LABELS:
                per_kernel[e.key] += e.self_device_time_total
    categories: Counter = Counter()
    for kernel, total in per_kernel.items():
        rest = total
        for label, us in labeled.get(kernel, {}).items():
            share = min(us, rest)
            categories[classify(kernel, label)] += share
            rest -= share
        categories[classify(kernel, None)] += rest
    ms = {c: categories[c] / 1e3 / repeat for c in CATEGORIES}
    top = [{"kernel": k[:120], "ms": v / 1e3 / repeat, "category": classify(k, None)}
           for k, v in per_kernel.most_common(25)]
    return ms, top, dict(sdpa), (timeline(events, repeat) if cuda else None)


GAP_BINS = ((0.0, 5.0), (5.0, 20.0), (20.0, 100.0), (100.0, float("inf")))  # microseconds


def timeline(events, repeat: int) -> dict:
    """The GPU's busy and idle time over the profiled passes, per pass: how many kernels ran, how
    long the GPU had none running, that idle time split by gap length (short gaps are kernel
    boundaries; long ones the host not keeping up, or a wait), how much of it was spent waiting for
    a kernel the host had not launched yet (``late_ms``: the launch call began after the GPU ran
    dry, so the host set the pace there), the host's synchronising calls, and the kernel pairs
    around the longest gaps in total."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    launched = {e.id: e.time_range.start for e in events if e.device_type == cpu and _LAUNCH.search(e.name)}
    syncs: Counter = Counter()
    for e in events:
        if e.device_type == cpu and "Synchronize" in e.name:
            syncs[e.name] += 1
    spans = sorted((e.time_range.start, e.time_range.end, e.name, e.id) for e in events
                   if e.device_type == cuda and e.name not in LABELS
                   and not getattr(e, "is_user_annotation", False) and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    busy = idle = late = 0.0
    bins = [[0, 0.0] for _ in GAP_BINS]
    pairs: Counter = Counter()
    end, last = spans[0][0], spans[0][2]
    for start, stop, name, cid in spans:
        if start > end:
            gap = start - end
            idle += gap
            i = next(i for i, (lo, hi) in enumerate(GAP_BINS) if lo <= gap < hi)
            bins[i][0] += 1
            bins[i][1] += gap
            pairs[(last[:60], name[:60])] += gap
            if launched.get(cid, -1.0) > end:
                late += gap  # launched only after the GPU had run dry
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, last = stop, name
    return {
        "kernels": len(spans) / repeat,
        "busy_ms": busy / 1e3 / repeat,
        "idle_ms": idle / 1e3 / repeat,
        "late_ms": late / 1e3 / repeat,
        "syncs": {k: v / repeat for k, v in syncs.items()},
        "gaps": {f"{lo:g}-{hi:g} us": {"count": n / repeat, "ms": t / 1e3 / repeat}
                 for (lo, hi), (n, t) in zip(GAP_BINS, bins)},
        "idle_after": [{"before": a, "after": b, "ms": t / 1e3 / repeat} for (a, b), t in pairs.most_common(8)],
    }


_LAUNCH = re.compile(r"^(cuda|cu)(LaunchKernel|LaunchKernelEx|LaunchKernelExC|MemcpyAsync|MemsetAsync|GraphLaunch)", re.I)


def wall_ms(fn, device: str, repeat: int) -> float:
    if device == "cuda":
        return step_speed.median_ms(fn, 2, repeat)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prepare(model: nn.Module, mode: str, device: str) -> None:
    """Back to eager, then into ``mode``. Without its main blocks Qwen-Image has no repeated
    block left: that part runs eagerly in every mode, as it does around compiled blocks."""
    from omni_fp8.converter.errors import ConfigError
    from omni_fp8.runtime.cuda_graphs import disable_cuda_graphs, enable_cuda_graphs, repeated_blocks

    torch._dynamo.reset()
    try:
        blocks = repeated_blocks(model, "profile_step")
    except ConfigError:
        return
    disable_cuda_graphs(model)
    for block in blocks:
        block._compiled_call_impl = None
    if mode == "graphs":
        enable_cuda_graphs(model)
    elif mode != "eager":
        model.compile_repeated_blocks(fullgraph=True, mode=None if mode == "default" else mode)


def measure(name: str, model: nn.Module, args_, kwargs, mode: str, a) -> dict:
    """One (variant, mode): the pass with the blocks and without the main ones, scaled to full depth."""
    depth = step_speed.MODELS[name]["config"][step_speed.MODELS[name]["depth_key"]]
    blocks_attr = MAIN_BLOCKS[name]
    blocks = getattr(model, blocks_attr)
    parts: dict = {}

    def call():
        return model(*args_, **kwargs)

    # Both wall times before either profile: a process may launch more slowly after the profiler
    # has run (seen once: the second variant's compiled pass 136 ms, the first one's 92.8), so the
    # profiles come last; for wall times to compare, give each variant a process of its own (one
    # --variant per call).
    for step in ("wall", "profile"):
        for part, kept in (("with", blocks), ("outside", nn.ModuleList())):
            setattr(model, blocks_attr, kept)
            try:
                prepare(model, mode, a.device)
                with torch.no_grad():
                    for _ in range(2):  # compile / capture, warm-up
                        call()
                    if step == "wall":
                        parts[part] = {"wall_ms": wall_ms(call, a.device, a.repeat)}
                        continue
                    with labels(model, mode == "eager"):
                        cats, top, sdpa, gpu = profile_pass(call, a.device, a.profile_repeat)
                parts[part].update({"categories": cats, "top": top, "sdpa_ops": sdpa, "timeline": gpu})
            finally:
                setattr(model, blocks_attr, blocks)
    n = len(blocks)

    def scale(w: float, o: float) -> float:
        return o + (w - o) * depth / n

    full = {c: scale(parts["with"]["categories"][c], parts["outside"]["categories"][c]) for c in CATEGORIES}
    gpu = {}
    if parts["with"]["timeline"] and parts["outside"]["timeline"]:
        w, o = parts["with"]["timeline"], parts["outside"]["timeline"]
        gpu = {key: scale(w[key], o[key]) for key in ("kernels", "busy_ms", "idle_ms", "late_ms")}
        gpu["gaps"] = {b: {f: scale(w["gaps"][b][f], o["gaps"][b][f]) for f in ("count", "ms")} for b in w["gaps"]}
    return {"mode": mode, "blocks": n, "depth": depth,
            "wall_ms": scale(parts["with"]["wall_ms"], parts["outside"]["wall_ms"]),
            "kernel_ms": sum(full.values()), "categories": full, "measured": parts,
            "sdpa_ops": parts["with"]["sdpa_ops"], "timeline": gpu}


def print_table(name: str, runs: list[dict], a) -> None:
    where = torch.cuda.get_device_name() if a.device == "cuda" else "CPU (op time, not kernels)"
    depth = runs[0]["depth"] if runs else "?"
    print(f"\n{name}: {a.blocks} blocks profiled, scaled to {depth}; {a.height}x{a.width}, {a.txt} text tokens; {where}")
    columns = [f"{r['variant']}/{r['mode']}" for r in runs]
    width = max(16, *(len(c) + 2 for c in columns))
    print(f"{'ms per pass':<14}" + "".join(f"{c:>{width}}" for c in columns))
    for c in CATEGORIES:
        cells = "".join(f"{r['categories'][c]:>{width - 8}.1f} ({100 * r['categories'][c] / max(r['kernel_ms'], 1e-9):>3.0f}%)"
                        for r in runs)
        print(f"{c:<14}{cells}")
    print(f"{'kernels':<14}" + "".join(f"{r['kernel_ms']:>{width - 8}.1f}{'':>8}" for r in runs))
    print(f"{'wall':<14}" + "".join(f"{r['wall_ms']:>{width - 8}.1f}{'':>8}" for r in runs))
    for r in runs:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(r["sdpa_ops"].items())) or "none seen"
        print(f"{r['variant']}/{r['mode']}: SDPA ops: {ops}")
        for k in r["measured"]["with"]["top"][: a.top]:
            print(f"    {k['ms']:8.3f} ms  {k['category']:<11} {k['kernel'][:100]}")
        gpu = r.get("timeline")
        if gpu:
            gaps = ", ".join(f"{b}: {g['count']:.0f} gaps {g['ms']:.1f} ms" for b, g in gpu["gaps"].items())
            print(f"    GPU timeline per pass (profiled, so gaps are wider than unprofiled): {gpu['kernels']:.0f} kernels, "
                  f"busy {gpu['busy_ms']:.1f} ms, idle {gpu['idle_ms']:.1f} ms, of it waiting for the host's "
                  f"launch {gpu['late_ms']:.1f} ms ({gaps}); synchronising calls in the profiled blocks: "
                  f"{r['measured']['with']['timeline']['syncs'] or 'none'}")
            for g in r["measured"]["with"]["timeline"]["idle_after"][:4]:
                print(f"      {g['ms']:6.2f} ms idle ({r['blocks']} blocks) between {g['before']} -> {g['after']}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=list(step_speed.MODELS))
    parser.add_argument("--blocks", type=int, default=4, help="main blocks profiled (scaled to full depth)")
    parser.add_argument("--variant", dest="variants", action="append",
                        help="bf16, tensor, block, channel, tensor-fast (fast accumulation), X-static (calibrated "
                             "activation scales), or fused-<one of them> (default: bf16, tensor)")
    parser.add_argument("--mode", dest="modes", action="append",
                        help="eager, graphs, default, max-autotune-no-cudagraphs (default: eager, default)")
    parser.add_argument("--preset", default="none", help="'none' quantizes every aligned Linear")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny test models (a smoke run, CPU included)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--txt", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=10, help="passes timed for the wall time (median)")
    parser.add_argument("--profile-repeat", type=int, default=3, help="passes profiled (mean)")
    parser.add_argument("--top", type=int, default=8, help="top kernels printed per run")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args(argv)
    a.model = a.model or ["qwen-image"]
    a.variants = a.variants or ["bf16", "tensor"]
    a.modes = a.modes or ["eager", "default"]
    plain = ("bf16", *step_speed.SCHEMES, "channel")
    for v in a.variants:
        scheme = v.removeprefix("fused-")
        if scheme not in plain and not (not a.tiny and scheme.removesuffix("-static") in (*plain[1:], "tensor-fast")):
            parser.error(f"unknown variant {v!r}: bf16, tensor, block, channel, on a GPU also tensor-fast and "
                         "X-static, or fused-<one of them>")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU (or --tiny --device cpu for a smoke run)")
    if a.tiny and (a.height, a.width, a.txt) == (1024, 1024, 256):
        a.height, a.width, a.txt = 64, 64, 16
    results = []
    for name in a.model:
        runs = []
        for variant in a.variants:
            model = build_variant(name, variant, a)
            args_, kwargs = step_speed.inputs(name, model, a.height, a.width, a.txt, device=a.device)
            for mode in a.modes:
                run = measure(name, model, args_, kwargs, mode, a)
                run["variant"] = variant
                runs.append(run)
                print(f"  {name} {variant} {mode}: kernels {run['kernel_ms']:.1f} ms, wall {run['wall_ms']:.1f} ms "
                      f"per {run['depth']}-block pass", flush=True)
            del model
            if a.device == "cuda":
                torch.cuda.empty_cache()
        print_table(name, runs, a)
        results.append({"model": name, "device": a.device, "tiny": a.tiny, "height": a.height, "width": a.width,
                        "txt": a.txt, "preset": a.preset, "runs": runs})
        if a.json:
            a.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
