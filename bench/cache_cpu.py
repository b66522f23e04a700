"""What a CPU can say about the caches: steps skipped and image change against the threshold.

On the tiny pipelines (``make_tiny_pipeline.py``: random weights, real diffusers classes), FP8
transformer, 64x64 images, seed 0: for each TeaCache threshold and for diffusers' caches at their
defaults, the steps whose every transformer call was skipped, the transformer calls skipped, the
image's PSNR against the same pipeline without a cache (8-bit pixels), and the denoising time
relative to no cache (one thread; the blocks are a small part of a tiny model's step, so the time
saved is well below the share of calls skipped). Random weights do not change the way a trained
model's do: the skip counts show the mechanism (and the rescale polynomial's effect), not what a
real model skips at a given threshold.

    python bench/cache_cpu.py                       # both families, ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_speed import psnr  # noqa: E402

THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
SAMPLING = {
    "qwen-image": {"num_inference_steps": 20, "negative_prompt": " ", "true_cfg_scale": 4.0},
    "z-image": {"num_inference_steps": 20, "guidance_scale": 3.0},
}
DIFFUSERS_CACHES = {"qwen-image": ("first_block_cache", "mag_cache", "taylorseer_cache"), "z-image": ()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="Write the rows as JSON here.")
    args = parser.parse_args()
    from omni_fp8 import Omni, OmniDiffusionSamplingParams
    from omni_fp8.converter.demo import save_tiny_pipeline

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, sampling in SAMPLING.items():
            folder = save_tiny_pipeline(Path(tmp) / arch, arch=arch)
            params = OmniDiffusionSamplingParams(**sampling, height=64, width=64, seed=0)
            prompt = "A cat sitting on a windowsill"

            def run(**cache):
                omni = Omni(folder, quantization="fp8", dtype="fp32", progress=False, **cache)
                omni.generate(prompt, params)  # warm-up
                return omni.generate(prompt, params)[0]

            base = run()
            runs = [("none", "", base)]
            runs += [("tea_cache", f"rel_l1_thresh={t}", run(cache_backend="tea_cache",
                                                             cache_config={"rel_l1_thresh": t})) for t in THRESHOLDS]
            runs += [(b, "defaults", run(cache_backend=b)) for b in DIFFUSERS_CACHES[arch]]
            for backend, setting, out in runs:
                t = out.timings
                rows.append({"model": arch, "cache": backend, "setting": setting, "steps": t.steps,
                             "steps_skipped": t.steps_skipped or 0, "calls": t.transformer_calls,
                             "calls_skipped": t.transformer_calls_skipped or 0,
                             "psnr_db": psnr(np.asarray(out.images[0]), np.asarray(base.images[0])),
                             "time_vs_none": t.denoise_s / base.timings.denoise_s})
    print("| model | cache | setting | steps skipped | calls skipped | PSNR vs no cache | denoise time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['cache']} | {r['setting']} | {r['steps_skipped']}/{r['steps']} | "
              f"{r['calls_skipped']}/{r['calls']} | {r['psnr_db']:.1f} dB | {r['time_vs_none']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
