"""Write the compressed-tensors fixtures of ``tests/test_foreign.py`` with llm-compressor itself.

Two steps, two environments (llm-compressor is not a dependency): this project's Python writes
the tiny BF16 / FP32 checkpoints the test fixtures use (``conftest.qwen_src``, ``zimage_src``),
then llm-compressor's ``model_free_ptq`` quantizes them with its ``FP8_DYNAMIC`` scheme (FP8
weights with one scale per output channel, dynamic per-token activations), norms, embedders and
the timestep embedder left alone, as its own documentation does for DiTs.

    python bench/interop/make_compressed_tensors_fixtures.py --write-sources /tmp/ct-src
    .bench/llmc-venv/bin/python bench/interop/make_compressed_tensors_fixtures.py --quantize /tmp/ct-src tests/fixtures/foreign

(.bench/llmc-venv: ``pip install torch==2.13.0 llmcompressor==0.14.0.1``.)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SOURCES = {"qwen": ("tiny_qwen_image", 1, "bfloat16"), "zimage": ("tiny_z_image", 2, "float32")}
IGNORE = ["re:.*norm.*", "re:.*embed.*", "re:.*pad_token.*", "re:.*proj_out.*", "re:.*final_layer.*",
          "re:.*img_in.*", "re:.*txt_in.*"]


def write_sources(out: Path) -> None:
    import torch

    from omni_fp8.converter import demo

    for name, (builder, seed, dtype) in SOURCES.items():
        # Sharded, with an index: model_free_ptq finds a diffusers folder's shards through its index.
        demo.save_checkpoint(getattr(demo, builder)(seed=seed), out / name, dtype=getattr(torch, dtype),
                             max_shard_size="400KB")


def quantize(src: Path, out: Path) -> None:
    from llmcompressor import model_free_ptq

    for name in SOURCES:
        dst = out / f"{name}-fp8-dynamic"
        if dst.exists():
            shutil.rmtree(dst)
        model_free_ptq(str(src / name), str(dst), scheme="FP8_DYNAMIC", ignore=IGNORE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-sources", type=Path, metavar="OUT")
    parser.add_argument("--quantize", nargs=2, type=Path, metavar=("SRC", "OUT"))
    args = parser.parse_args()
    if args.write_sources:
        write_sources(args.write_sources)
    if args.quantize:
        quantize(*args.quantize)


if __name__ == "__main__":
    main()
