"""Shallow real-width Qwen-Image and Z-Image files for ``comfyui_load.py`` (random weights, no download).

    python bench/interop/make_comfyui_files.py OUT

ComfyUI recognises these models by their real widths, so each has the real width and one block
(Z-Image: and the two refiner blocks ComfyUI builds). For each it writes the ``--target comfyui``
FP8 file and the same model unquantized in ComfyUI's names, as the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from omni_fp8 import convert
from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image, tiny_z_image

QWEN_IMAGE = {"in_channels": 64, "out_channels": 16, "num_layers": 1, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56)}
Z_IMAGE = {"dim": 3840, "n_heads": 30, "n_kv_heads": 30, "n_layers": 1, "n_refiner_layers": 2, "cap_feat_dim": 2560,
           "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, model in (("qwen-image", tiny_qwen_image(seed=1, **QWEN_IMAGE)), ("z-image", tiny_z_image(seed=2, **Z_IMAGE))):
        src = save_checkpoint(model, out / f"{name}-bf16", max_shard_size="2GB")
        del model
        print(convert(src, out / f"{name}-fp8.safetensors", target="comfyui", force=True, progress=False).summary_line())
        convert(src, out / f"{name}-bf16.safetensors", target="comfyui", force=True, progress=False,
                config={"preset": "none", "ignored_layers": ["re:.*"]})


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(Path(sys.argv[1]))
