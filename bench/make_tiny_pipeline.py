"""Write a complete tiny diffusers pipeline folder, random weights, no download.

A real ``QwenImagePipeline`` (default) or ``ZImagePipeline`` at toy sizes: the transformer of
``omni-convert demo``, a tiny text encoder built from a ``transformers`` config (Qwen2.5-VL or
Qwen3), a byte-level tokenizer, a tiny VAE and the scheduler, saved by diffusers'
``save_pretrained`` in BF16 (the transformer in small shards with an index). ``Omni``,
``omni-fp8 text-to-image`` and ``omni-convert`` take the folder as they take a downloaded one:

    python bench/make_tiny_pipeline.py /tmp/tiny-qwen
    python bench/make_tiny_pipeline.py /tmp/tiny-z --arch z-image
    omni-fp8 text-to-image --model /tmp/tiny-qwen --quantization fp8 --prompt "a cat" --height 64 --width 64 \\
        --num-inference-steps 8 --output cat.png
    omni-convert convert /tmp/tiny-qwen /tmp/tiny-qwen-fp8

The images are noise-like (random weights); what the folder is for is running every code path.
"""

from __future__ import annotations

import argparse
import sys

from omni_fp8.converter.demo import PIPELINE_ARCHES, save_tiny_pipeline
from omni_fp8.converter.errors import OmniFp8Error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="New (or empty) folder to write the pipeline into.")
    parser.add_argument("--arch", choices=PIPELINE_ARCHES, default="qwen-image")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args()
    try:
        folder = save_tiny_pipeline(args.out, arch=args.arch, seed=args.seed)
    except OmniFp8Error as e:
        sys.exit(f"error: {e}")
    print(f"wrote a tiny {args.arch} pipeline to {folder}")


if __name__ == "__main__":
    main()
