"""Attention alone on a GPU at the real models' shapes: BF16 SDPA backends against FP8 attention.

Per shape (batch 1, head_dim 128; Qwen-Image's joint text|image attention, Z-Image's
image|caption attention with a key-padding mask over the caption's padding):

* BF16 SDPA as PyTorch picks it, and forced to each backend it has (cuDNN, flash,
  memory-efficient; ``torch.nn.attention.sdpa_kernel``), the baseline being the fastest;
* ``fp8_attention`` with the Triton kernel (per-head scales): the whole call, its preparation
  alone (per-head amax and E4M3 codes of Q, K, V) and the attention kernel alone on prepared codes;
* ``fp8_attention`` with cuDNN's FP8 SDPA (per-tensor scales, ``nvidia-cudnn-frontend``): the
  whole call, including its quantization.

Reports ms (CUDA events, warm-up first, median of ``--repeat`` timings of ``--inner`` calls each),
TFLOP/s (4 B H Lq Lk D / t: the masked keys counted too), the ratio against the fastest BF16 SDPA
and each output's relative L2 error against float32 attention on the same BF16 inputs (BF16 SDPA's
own error shown for scale). A backend that fails prints its error and the run goes on.

    python bench/attention_speed.py                       # the three shapes
    python bench/attention_speed.py --shape qwen-image-1024 --repeat 50 --json bench/results/attention_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

# name: (B, image tokens, text/caption tokens, padded caption tokens masked, heads, head_dim)
SHAPES = {
    "qwen-image-1024": (1, 4096, 256, 0, 24, 128),
    "qwen-image-1328": (1, 6889, 256, 0, 24, 128),  # 1328 / 16 = 83 patches a side
    "z-image-1024": (1, 4096, 128, 24, 30, 128),  # the caption padded to 128, its last 24 tokens masked
}


def make_inputs(shape: tuple, device: str = "cuda", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[B, L, H, D]`` in BF16 (unit-variance q and k, as after the models' QK RMSNorm
    with unit weights) and the boolean key mask (None when nothing is masked)."""
    b, img, txt, pad, h, d = shape
    n = img + txt
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, device=device, generator=g).bfloat16() for _ in range(3))
    mask = None
    if pad:
        mask = torch.ones(b, n, dtype=torch.bool, device=device)
        mask[:, n - pad:] = False
    return q, k, v, mask


def reference(q, k, v, mask) -> torch.Tensor:
    """float32 attention of the BF16 inputs, head by head (TF32 off)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    scale = q.shape[-1] ** -0.5
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            s = (q[b, :, h].float() @ k[b, :, h].float().T) * scale
            if mask is not None:
                s = s.masked_fill(~mask[b][None, :], float("-inf"))
            out[b, :, h] = torch.softmax(s, dim=-1) @ v[b, :, h].float()
    return out


def sdpa(q, k, v, mask, backend=None):
    """BF16 SDPA on diffusers' layout (transposed views, as diffusers' native backend passes them)."""
    m = None if mask is None else mask[:, None, None, :]
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if backend is None:
        return F.scaled_dot_product_attention(*args, attn_mask=m).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(*args, attn_mask=m).transpose(1, 2)


def median_ms(fn, warmup: int, repeat: int, inner: int) -> tuple[float, float, float]:
    """min, median and max of ``step_speed.sample_ms``."""
    from step_speed import sample_ms  # bench/, beside this script

    times = sample_ms(fn, warmup, repeat, inner)
    return min(times), statistics.median(times), max(times)


def variants(q, k, v, mask) -> list[tuple[str, object, bool]]:
    """(name, zero-argument callable, returns the output) for each way to run this attention."""
    import fp8_attention as A
    from torch.nn.attention import SDPBackend

    out = [("sdpa-bf16 (default)", lambda: sdpa(q, k, v, mask), True)]
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is not None:
            out.append((f"sdpa-bf16 {name.split('_')[0].lower()}", lambda b=backend: sdpa(q, k, v, mask, b), True))
    out.append(("fp8 triton (total)", lambda: A.fp8_attention(q, k, v, mask, backend="triton"), True))
    if A.HAVE_TRITON:
        prepared = {}

        def prepare():
            prepared["codes"] = A.triton_prepare(q, k, v)

        def kernel():
            if "codes" not in prepared:
                prepare()
            qc, kc, vt, amax = prepared["codes"]
            o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            return A.triton_attention_prepared(qc, kc, vt, amax, k.shape[1], mask, o, q.shape[-1] ** -0.5)

        out.append(("  triton prep only", prepare, False))
        out.append(("  triton kernel only", kernel, True))
    out.append(("fp8 cudnn (total)", lambda: A.fp8_attention(q, k, v, mask, backend="cudnn"), True))
    out.append(("  cudnn quant only", lambda: A._quantize_per_tensor(q, k, v), False))
    return out


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def run_shape(name: str, a) -> dict:
    shape = SHAPES[name]
    b, img, txt, pad, h, d = shape
    q, k, v, mask = make_inputs(shape, "cuda" if torch.cuda.is_available() else "cpu")
    n = q.shape[1]
    flops = 4.0 * b * h * n * n * d
    exact = reference(q, k, v, mask)
    rows = {}
    print(f"\n{name}: B={b} L={n} ({img} image + {txt} text, {pad} masked) H={h} D={d}, "
          f"{device_name()}", flush=True)
    for label, fn, gives_output in variants(q, k, v, mask):
        try:
            lo, med, hi = median_ms(fn, a.warmup, a.repeat, a.inner)
            error = None
            if gives_output:
                result = fn()
                error = ((result.float() - exact).norm() / exact.norm()).item()
            rows[label] = {"ms": med, "min_ms": lo, "max_ms": hi, "tflops": flops / med / 1e9, "rel_l2": error}
            print(f"  {label}: {med:.3f} ms (min {lo:.3f}, max {hi:.3f})"
                  + (f", rel L2 {error:.4f}" if error is not None else ""), flush=True)
        except Exception as e:  # noqa: BLE001 - a backend this GPU or install lacks is reported, not fatal
            message = " ".join(str(e).split())[:300]
            rows[label] = {"error": f"{type(e).__name__}: {message}"}
            print(f"  {label}: failed ({type(e).__name__}: {message})", flush=True)
            if a.traceback:
                traceback.print_exc()
    bf16 = [r["ms"] for label, r in rows.items() if label.startswith("sdpa-bf16") and "ms" in r]
    best = min(bf16) if bf16 else None
    extra = {}
    import fp8_attention as A

    config = getattr(A._attn_fwd_tuned, "best_config", None) if A.HAVE_TRITON else None
    extra["triton_config"] = str(config) if config is not None else None
    print(f"{'variant':<24} {'ms':>8} {'TFLOP/s':>8} {'vs best bf16':>13} {'rel L2':>8}")
    for label, r in rows.items():
        if "ms" not in r:
            print(f"{label:<24} {'failed':>8}")
            continue
        ratio = f"{best / r['ms']:>12.2f}x" if best else f"{'':>13}"
        tflops = f"{r['tflops']:>8.0f}" if not label.strip().endswith("only") or "kernel" in label else f"{'':>8}"
        err = f"{r['rel_l2']:>8.4f}" if r.get("rel_l2") is not None else f"{'':>8}"
        print(f"{label:<24} {r['ms']:>8.3f} {tflops} {ratio} {err}")
    if extra.get("triton_config"):
        print(f"Triton autotune chose: {extra['triton_config']}")
    return {"shape": name, "B": b, "L": n, "masked": pad, "H": h, "D": d, "best_bf16_ms": best, "rows": rows,
            "device": device_name(), "torch": torch.__version__, **extra}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", dest="shapes", action="append", choices=list(SHAPES), help="default: all")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--inner", type=int, default=5, help="calls per timing")
    parser.add_argument("--traceback", action="store_true", help="print a failing backend's traceback")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attention_speed.py needs a CUDA GPU.")
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    for name in a.shapes or list(SHAPES):
        results.append(run_shape(name, a))
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
