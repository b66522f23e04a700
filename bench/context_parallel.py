"""Context parallelism on several GPUs: the same images as one GPU, and the step time, BF16 and FP8.

Launch one process per GPU:

    torchrun --nproc-per-node 2 bench/context_parallel.py --model qwen-image
    torchrun --nproc-per-node 2 bench/context_parallel.py --model z-image
    torchrun --nproc-per-node 2 bench/context_parallel.py --model qwen-image --ring    # ring attention

1. **Images** (``Omni``, a real-width pipeline of ``--image-blocks`` blocks, ``real_pipeline.py``):
   for BF16, FP8 and FP8 + TeaCache 0.2, rank 0 generates alone on its GPU, then every rank
   generates with ``parallel={"ulysses_degree": N}``; same seed, same prompt. Checked: the
   cache skipped the same steps, and the images agree within PSNR >= 30 dB (8-bit pixels). The
   parallel run splits every Linear's rows across the ranks, and a GEMM over fewer rows may sum
   in another order; FP8 rounding of the activations turns some of those last-bit differences
   into one-code differences, and 20 denoising steps carry them on, so the images are close,
   not bit-identical. 30 dB is a first bound, to be replaced by what H200s measure.
2. **Step time** at ``--size`` (2048x2048: 16384 image tokens, 256 text tokens), full depth:
   one transformer forward on one GPU, then the same weights split over N GPUs
   (``enable_parallelism``), median of ``--repeat`` after ``--warmup``, BF16 and FP8 (every
   aligned Linear, as ``step_speed.py`` measures). Also checked: the parallel forward's output is
   within relative L2 0.02 of the single-GPU one.

Writes ``--out`` (JSON) from rank 0 and prints a table; exit status 1 if a check fails.
``--tiny --device cpu`` runs the same code on the tiny random models over Gloo, as a smoke test
(the CPU counts as every rank's one accelerator, as in ``tests/parallel_worker.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_speed import DEFAULTS, PROMPT, psnr  # noqa: E402
from real_pipeline import DEPTH, save_real_width_pipeline  # noqa: E402
from step_speed import build, inputs, median_ms, output  # noqa: E402

IMAGE_PSNR_BOUND = 30.0  # dB, images of 1 vs N GPUs
# One transformer forward, 1 vs N GPUs. Measured on 2 H200s (ring, 30 real-width blocks, random
# weights, 2048x2048): BF16 0.0098 (attention's summation order), FP8 0.048: an FP8 rounding that
# flips on such a difference amplifies it block after block; still half of FP8's own distance
# from BF16 at full depth (0.09, bench/RESULTS.md).
OUTPUT_REL_L2_BOUND = {"bf16": 0.02, "fp8": 0.07}
VARIANTS = {
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "fp8+tea_cache": {"quantization": "fp8", "cache_backend": "tea_cache", "cache_config": {"rel_l1_thresh": 0.2}},
}


def log(*parts: object) -> None:
    if dist.get_rank() == 0:
        print(*parts, file=sys.stderr, flush=True)


def images(args: argparse.Namespace, parallel: dict) -> list[dict]:
    from omni_fp8 import Omni, OmniDiffusionSamplingParams
    from omni_fp8.converter.demo import save_tiny_pipeline

    folder = args.folder or Path(f"/tmp/omni-fp8-{args.model}-{'tiny' if args.tiny else f'{args.image_blocks}b'}")
    if dist.get_rank() == 0 and not (folder / "model_index.json").is_file():
        if args.tiny:
            save_tiny_pipeline(folder, arch=args.model)
        else:
            save_real_width_pipeline(folder, args.model, args.image_blocks)
    dist.barrier()
    sampling = OmniDiffusionSamplingParams(**{**DEFAULTS[args.model], "num_inference_steps": args.image_steps,
                                              "height": args.image_size, "width": args.image_size, "seed": 0})
    rows = []
    for name, options in VARIANTS.items():
        single = None
        if dist.get_rank() == 0:
            device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else args.device
            omni = Omni(folder, device=device, progress=False, **options)
            single = omni.generate(PROMPT, sampling)[0]
            del omni
            gc.collect()
            torch.cuda.empty_cache()
        dist.barrier()
        omni = Omni(folder, parallel=parallel, progress=False, **options)
        split = omni.generate(PROMPT, sampling)[0]
        del omni
        gc.collect()
        torch.cuda.empty_cache()
        if dist.get_rank() == 0:
            a, b = np.asarray(single.images[0]), np.asarray(split.images[0])
            diff = np.abs(a.astype(int) - b.astype(int))
            rows.append({"variant": name, "psnr_db": psnr(a, b), "max_diff": int(diff.max()),
                         "mean_diff": float(diff.mean()), "steps_skipped_1": single.timings.steps_skipped,
                         "steps_skipped_n": split.timings.steps_skipped,
                         "denoise_s_1": single.timings.denoise_s, "denoise_s_n": split.timings.denoise_s,
                         "ok": psnr(a, b) >= IMAGE_PSNR_BOUND
                         and single.timings.steps_skipped == split.timings.steps_skipped})
            log(f"  images {name}: PSNR {rows[-1]['psnr_db']:.1f} dB")
        dist.barrier()
    return rows


def step_times(args: argparse.Namespace, parallel: dict) -> list[dict]:
    rows = []
    for scheme in ("bf16", "fp8"):
        row = _step_time(args, parallel, scheme)  # the model is freed when this returns
        gc.collect()
        torch.cuda.empty_cache()
        if row is not None:
            rows.append(row)
            log(f"  step {scheme}: {row['ms_1']:.1f} ms on 1 GPU, {row['ms_n']:.1f} ms split")
        dist.barrier()
    return rows


def _step_time(args: argparse.Namespace, parallel: dict, scheme: str) -> dict | None:
    """One scheme: rank 0 alone, then every rank on its share of the tokens; rank 0 gets the row."""
    from diffusers import ContextParallelConfig
    from omni_fp8 import quantize_
    from omni_fp8.runtime.parallel import attention_backend, cp_plan, parse_parallel

    if args.tiny:
        from omni_fp8.converter.demo import tiny_qwen_image, tiny_z_image

        model = (tiny_qwen_image() if args.model == "qwen-image" else tiny_z_image()).to(torch.bfloat16)
    else:
        model = build(args.model, args.step_blocks)
    if scheme == "fp8":
        quantize_(model, {"preset": "none"})
    args_, kwargs = inputs(args.model, model, args.size, args.size, 256 if not args.tiny else 16, device=args.device)
    if kwargs.get("encoder_hidden_states_mask") is not None and bool(kwargs["encoder_hidden_states_mask"].all()):
        kwargs["encoder_hidden_states_mask"] = None  # all ones: the same attention, and ring attention takes no mask
    timer = median_ms if args.device == "cuda" else _median_ms_host
    single_ms = single_out = None
    with torch.no_grad():
        if dist.get_rank() == 0:
            single_ms = timer(lambda: model(*args_, **kwargs), args.warmup, args.repeat)
            single_out = output(model(*args_, **kwargs)).float()
        dist.barrier()
        backend = attention_backend(parse_parallel(parallel), torch.device(args.device))
        if backend is not None:  # ring attention merges by log-sum-exp, which the default does not return
            model.set_attention_backend(backend)
        model.enable_parallelism(config=ContextParallelConfig(**parallel), cp_plan=cp_plan(model))
        split_ms = timer(lambda: model(*args_, **kwargs), args.warmup, args.repeat)
        split_out = output(model(*args_, **kwargs)).float()
    if dist.get_rank() != 0:
        return None
    error = ((split_out - single_out).norm() / single_out.norm()).item()
    return {"scheme": scheme, "ms_1": single_ms, "ms_n": split_ms, "speedup": single_ms / split_ms,
            "rel_l2": error, "ok": error <= OUTPUT_REL_L2_BOUND[scheme]}


def _median_ms_host(fn, warmup: int, repeat: int) -> float:
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DEPTH), default="qwen-image")
    parser.add_argument("--ring", action="store_true", help="Ring attention instead of Ulysses.")
    parser.add_argument("--image-blocks", type=int, default=8, help="Blocks of the image check's pipeline.")
    parser.add_argument("--image-steps", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--step-blocks", type=int, help="Blocks for the step time (default: full depth).")
    parser.add_argument("--size", type=int, default=2048, help="Height and width for the step time.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--folder", type=Path, help="Pipeline folder for the images (default: under /tmp).")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="Tiny random models instead: a smoke run.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    args.step_blocks = args.step_blocks or DEPTH[args.model]
    import diffusers

    diffusers.logging.set_verbosity_error()  # dtype casts of the random models, the parallelism's notice
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        torch.accelerator.device_count = lambda: 1
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    parallel = {"ring_degree": world} if args.ring else {"ulysses_degree": world}
    image_rows = [] if args.skip_images else images(args, parallel)
    step_parallel = ({"ring_degree": world, "ring_anything": True} if args.ring
                     else {"ulysses_degree": world, "ulysses_anything": True})
    step_rows = step_times(args, step_parallel)
    ok = all(r["ok"] for r in image_rows + step_rows)
    if dist.get_rank() == 0:
        kind = f"{'ring' if args.ring else 'ulysses'}_degree {world}"
        device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
        print(f"\n{args.model}, {kind}, {device}")
        blocks = "tiny" if args.tiny else f"{args.image_blocks} blocks"
        if image_rows:
            print(f"\nImages, {args.image_size}x{args.image_size}, {args.image_steps} steps, {blocks} "
                  f"(check: PSNR >= {IMAGE_PSNR_BOUND} dB, same skipped steps)")
            print("| variant | PSNR 1 vs N GPUs | max / mean diff | steps skipped 1 / N | denoise 1 / N GPUs | ok |")
            print("|---|---|---|---|---|---|")
            for r in image_rows:
                print(f"| {r['variant']} | {r['psnr_db']:.1f} dB | {r['max_diff']} / {r['mean_diff']:.2f} | "
                      f"{r['steps_skipped_1']} / {r['steps_skipped_n']} | {r['denoise_s_1']:.2f} / "
                      f"{r['denoise_s_n']:.2f} s | {'yes' if r['ok'] else 'NO'} |")
        blocks = "tiny" if args.tiny else f"{args.step_blocks} blocks"
        print(f"\nOne step, {args.size}x{args.size}, {blocks} (check: rel. L2 <= {OUTPUT_REL_L2_BOUND['bf16']} BF16, "
              f"{OUTPUT_REL_L2_BOUND['fp8']} FP8)")
        print("| scheme | 1 GPU | N GPUs | speed-up | rel. L2 1 vs N | ok |")
        print("|---|---|---|---|---|---|")
        for r in step_rows:
            print(f"| {r['scheme']} | {r['ms_1']:.1f} ms | {r['ms_n']:.1f} ms | {r['speedup']:.2f}x | "
                  f"{r['rel_l2']:.4f} | {'yes' if r['ok'] else 'NO'} |")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"model": args.model, "parallel": parallel, "world": world,
                                            "device": device, "images": image_rows,
                                            "steps": step_rows}, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
