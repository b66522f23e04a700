"""Real-width random checkpoints for the benchmarks (no download).

``write_qwen_image(folder, blocks=8)`` writes a ``QwenImageTransformer2DModel`` at the real layer
widths (3072 wide, 24 heads x 128, text width 3584) with ``blocks`` transformer blocks instead of
60, BF16, as diffusers lays it out: config.json, ``-0000k-of-0000N`` shards and an index, written
with the safetensors library itself. Weights are Gaussian with a few loud input channels, the
outliers trained DiTs grow. 8 blocks are about 5.5 GB.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

QWEN_IMAGE_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "_diffusers_version": "0.42.1",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}


def qwen_image_config(blocks: int) -> dict:
    return {**QWEN_IMAGE_CONFIG, "num_layers": blocks}


def param_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, from the diffusers class built on the meta device."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1 and "norm" in name:  # RMSNorm gains
        return torch.ones(shape, dtype=dtype)
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) == 2:
        t.mul_(1.0 / math.sqrt(shape[1]))
        loud = torch.randint(0, shape[1], (4,), generator=gen)
        t[:, loud] *= 20.0  # outlier input channels
    else:
        t.mul_(0.02)
    return t.to(dtype)


def write_qwen_image(folder: str | Path, *, blocks: int = 8, shard_bytes: int = 2 * 10**9, seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the checkpoint unless ``folder`` already holds this exact one; return ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = qwen_image_config(blocks)
    stamp = {"blocks": blocks, "shard_bytes": shard_bytes, "seed": seed, "dtype": str(dtype)}
    marker = folder / ".bench-checkpoint.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    shapes = param_shapes(config)
    gen = torch.Generator().manual_seed(seed)

    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    total = 0
    for i, names in enumerate(groups, 1):
        filename = f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], gen, dtype) for n in names}
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    marker.write_text(json.dumps(stamp))
    return folder
