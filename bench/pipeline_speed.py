"""End-to-end generation on one GPU through ``Omni``: BF16, FP8, FP8 + TeaCache, in one run.

A pipeline at real widths (``real_pipeline.py``: real transformer configuration with ``--blocks``
blocks, real VAE, one-layer text encoder of the real width, random weights) is written once to
``--folder`` and loaded by ``Omni`` the way a downloaded one is. For each variant: one warm-up
generation, then ``--repeat`` timed ones (median), each reporting the denoising time (first
transformer call to the last step's end, the GPU synchronised there: text encoding and VAE
decoding excluded), the steps a cache skipped, peak GPU memory, and how far its image is from
the BF16 one (PSNR over the 8-bit pixels, and for TeaCache also from plain FP8).

Variants: ``bf16`` (no quantization), ``fp8`` (quantized while loading, the model's preset),
``fp8+tea_cache`` (``rel_l1_thresh`` 0.2); ``--compile`` adds compiled versions of each.

    python bench/pipeline_speed.py --model qwen-image --blocks 8     # 1024x1024, 50 steps, true CFG
    python bench/pipeline_speed.py --model z-image --blocks 6        # 1024x1024, 9 steps, no CFG (Turbo's)

Random weights: the images are noise, and a cache's skips follow this model's (random) dynamics,
not a trained model's; the times are what the real widths cost per block.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_pipeline import DEPTH, save_real_width_pipeline  # noqa: E402
from step_speed import counting_emulation  # noqa: E402

PROMPT = "A cat sitting on a windowsill, soft morning light"
DEFAULTS = {  # the models' usual sampling: Qwen-Image with true CFG, Z-Image-Turbo without CFG
    "qwen-image": {"num_inference_steps": 50, "negative_prompt": " ", "true_cfg_scale": 4.0},
    "z-image": {"num_inference_steps": 9, "guidance_scale": 0.0},
}
VARIANTS = {
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "fp8+tea_cache": {"quantization": "fp8", "cache_backend": "tea_cache", "cache_config": {"rel_l1_thresh": 0.2}},
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def run(folder: Path, name: str, options: dict, sampling: dict, repeat: int, compile_: bool, device: str) -> dict:
    from omni_fp8 import Omni, OmniDiffusionSamplingParams

    with counting_emulation() as emulated:
        cuda = device.startswith("cuda")
        base = 0
        if cuda:
            gc.collect()  # the previous variant's pipeline, before this one's peak is counted
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        omni = Omni(folder, device=device, compile=compile_, progress=False, **options)
        params = OmniDiffusionSamplingParams(**sampling)
        omni.generate(PROMPT, params)  # warm-up (and compilation)
        outputs = [omni.generate(PROMPT, params)[0] for _ in range(repeat)]
    timings = [o.timings for o in outputs]
    result = {
        "variant": name + (" compiled" if compile_ else ""),
        "denoise_s": statistics.median(t.denoise_s for t in timings),
        "step_s": statistics.median(t.step_s for t in timings),
        "steps": timings[0].steps,
        "steps_skipped": timings[0].steps_skipped,
        "transformer_calls": timings[0].transformer_calls,
        "transformer_calls_skipped": timings[0].transformer_calls_skipped,
        "total_s": statistics.median(t.total_s for t in timings),
        "load_s": omni.load_s,
        "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan"),
        "emulated_fp8_calls": emulated["n"],
        "image": np.asarray(outputs[0].images[0]),
    }
    del omni
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DEPTH), default="qwen-image")
    parser.add_argument("--blocks", type=int, default=8, help="Transformer blocks (the real models: 60 / 30).")
    parser.add_argument("--size", type=int, default=1024, help="Image height and width.")
    parser.add_argument("--steps", type=int, help="Denoising steps (default: 50 Qwen-Image, 9 Z-Image).")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="Also time every variant compiled.")
    parser.add_argument("--folder", type=Path, help="Pipeline folder (default: /tmp/omni-fp8-<model>-<blocks>b).")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    parser.add_argument("--tiny", action="store_true",
                        help="The tiny random pipeline instead (make_tiny_pipeline.py): a smoke run, CPU included.")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU (or --tiny --device cpu for a smoke run)")
    if args.tiny:
        from omni_fp8.converter.demo import save_tiny_pipeline

        folder = args.folder or Path(tempfile.mkdtemp(prefix="omni-fp8-tiny-")) / args.model
        if not (folder / "model_index.json").is_file():
            save_tiny_pipeline(folder, arch=args.model)
    else:
        folder = args.folder or Path(f"/tmp/omni-fp8-{args.model}-{args.blocks}b")
        save_real_width_pipeline(folder, args.model, args.blocks)
    sampling = {**DEFAULTS[args.model], "height": args.size, "width": args.size, "seed": 0}
    if args.steps:
        sampling["num_inference_steps"] = args.steps
    results = []
    for compile_ in (False, True) if args.compile else (False,):
        for name, options in VARIANTS.items():
            torch._dynamo.reset()
            results.append(run(folder, name, options, sampling, args.repeat, compile_, args.device))
            print(f"  {results[-1]['variant']}: {results[-1]['denoise_s']:.2f} s", file=sys.stderr, flush=True)
    reference = {r["variant"].split(" ")[0]: r["image"] for r in results if "compiled" not in r["variant"]}
    base = results[0]["denoise_s"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    depth = "tiny" if args.tiny else f"{args.blocks} of {DEPTH[args.model]} blocks"
    print(f"\n{args.model}, {depth}, {args.size}x{args.size}, {sampling['num_inference_steps']} steps, {device}")
    print("| variant | denoise | per step | vs BF16 | steps skipped | peak GiB | PSNR vs BF16 | PSNR vs FP8 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        vs_fp8 = f"{psnr(r['image'], reference['fp8']):.1f} dB" if "tea_cache" in r["variant"] else ""
        skipped = r["steps_skipped"] if r["steps_skipped"] is not None else ""
        print(f"| {r['variant']} | {r['denoise_s']:.2f} s | {r['step_s'] * 1000:.0f} ms | {base / r['denoise_s']:.2f}x "
              f"| {skipped} | {r['peak_gib']:.1f} | "
              f"{psnr(r['image'], reference['bf16']):.1f} dB | {vs_fp8} |")
    bad = [r["variant"] for r in results if r["variant"] != "bf16" and r["emulated_fp8_calls"]]
    if bad:
        print(f"WARNING: FP8 Linears ran the emulation instead of FP8 GEMMs in: {', '.join(bad)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = [{k: v for k, v in r.items() if k != "image"} for r in results]
        args.out.write_text(json.dumps({"model": args.model, "blocks": "tiny" if args.tiny else args.blocks,
                                        "size": args.size, "sampling": sampling, "device": device,
                                        "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
