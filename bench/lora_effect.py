"""A LoRA on an FP8 transformer against the same LoRA on the BF16 one (tiny models, CPU).

For both families, with the default preset and with every Linear in FP8: a random LoRA (rank 4 on
the attention and MLP projections, effect about the output's norm) is loaded into the BF16 and the
FP8 model, and the relative L2 distances between their outputs are printed: without the LoRA,
with it, the LoRA's own effect (with minus without) on each base, and after ``fuse_lora``.

    python bench/lora_effect.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_lora import TARGETS, lora_state_dict, run  # noqa: E402
from test_runtime import rel_l2  # noqa: E402

from omni_fp8 import load_transformer  # noqa: E402
from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image, tiny_z_image  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp())
    sources = {"qwen": save_checkpoint(tiny_qwen_image(seed=1), work / "qwen"),
               "zimage": save_checkpoint(tiny_z_image(seed=2), work / "zimage", dtype=torch.float32,
                                         max_shard_size="100MB")}
    print(f"{'model':<8} {'preset':<8} {'no LoRA':>8} {'LoRA':>8} {'effect':>8} {'fused/unf':>10} {'fused/BF16':>10}")
    for family, src in sources.items():
        for preset in (None, "none"):
            bf16 = load_transformer(src, dtype=torch.bfloat16, progress=False)
            fp8 = load_transformer(src, quantization="fp8", quantization_config={"preset": preset},
                                   dtype=torch.bfloat16, progress=False)
            state = lora_state_dict(bf16, TARGETS[family], seed=1)
            b0, f0 = run(family, bf16), run(family, fp8)
            for model in (bf16, fp8):
                model.load_lora_adapter(state, prefix=None, adapter_name="a")
            b1, f1 = run(family, bf16), run(family, fp8)
            fp8.fuse_lora()
            fused = run(family, fp8)
            print(f"{family:<8} {preset or 'default':<8} {rel_l2(f0, b0):8.4f} {rel_l2(f1, b1):8.4f} "
                  f"{rel_l2(f1 - f0, b1 - b0):8.4f} {rel_l2(fused, f1):10.4f} {rel_l2(fused, b1):10.4f}   "
                  f"(LoRA effect {rel_l2(b1 - b0, b0):.2f}x the output)")


if __name__ == "__main__":
    main()
