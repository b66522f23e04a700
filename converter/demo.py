"""Tiny random-weight transformers of the supported families, and the no-download demo.

The models are the real diffusers classes at toy sizes, every Linear width a multiple of 16 so
FP8 GEMMs accept them. ``omni-convert demo`` saves one as a sharded BF16 checkpoint and converts
it; the test suite builds its fixtures with the same functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import OmniFp8Error

__all__ = ["tiny_qwen_image", "tiny_z_image", "save_checkpoint", "run_demo"]

TINY_QWEN_IMAGE: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (8, 12, 12),
}
TINY_Z_IMAGE: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 96,  # 3 heads x 32: FFN and projection widths stay multiples of 16
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 3,
    "n_kv_heads": 3,
    "cap_feat_dim": 32,
    "axes_dims": [8, 12, 12],
    "axes_lens": [64, 32, 32],
}


def tiny_qwen_image(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ``QwenImageTransformer2DModel`` with two blocks of width 64, random weights."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**TINY_QWEN_IMAGE, **overrides}).eval()


def tiny_z_image(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ``ZImageTransformer2DModel`` with width 96 (3 heads), random weights."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**{**TINY_Z_IMAGE, **overrides}).eval()
    with torch.no_grad():  # the pad tokens start at zero; make them count like trained ones
        for name, p in model.named_parameters():
            if name.endswith("pad_token"):
                p.normal_()
    return model


def save_checkpoint(
    model: torch.nn.Module, folder: str | Path, *, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "200KB"
) -> Path:
    """Save as diffusers does (config.json, sharded safetensors, index) in ``dtype``."""
    import diffusers

    folder = Path(folder)
    previous = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()  # .to(dtype) on a diffusers model warns about fp32 modules
    try:
        model.to(dtype).save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    finally:
        diffusers.logging.set_verbosity(previous)
    return folder


def run_demo(out: str | Path, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build a tiny Qwen-Image transformer, save it as BF16 shards and convert it to FP8.

    Returns paths, the conversion result and the relative L2 error of every dequantized FP8
    weight against its BF16 source (the worst and the mean).
    """
    from safetensors import safe_open

    from .convert import convert
    from .errors import OutputExistsError
    from .numerics import dequantize_weight
    from .writer import hash_file, write_json

    out = Path(out)
    src, dst = out / "qwen-image-tiny-bf16", out / "qwen-image-tiny-fp8"
    if out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise OutputExistsError(f"{out}: already exists; pass --force to replace it.", path=out)
        _check_earlier_demo(out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(tiny_qwen_image(), src)
    record = {"files": {f"{src.name}/{p.name}": hash_file(p).to_dict() for p in sorted(src.iterdir())}}
    write_json(out / _DEMO_RECORD, record)
    result = convert(src, dst, progress=progress)

    errors = []
    source_tensors = _load_folder(src)
    for entry in result.manifest["tensors"]:
        if entry["scheme"] not in ("fp8_tensor", "fp8_block"):
            continue
        with safe_open(dst / entry["shard"], "pt") as f:
            q = f.get_tensor(entry["name"])
            scale = f.get_tensor(entry["scale"])
        block = result.manifest["quantization_config"]["weight_block_size"]
        w = source_tensors[entry["name"]].float()
        deq = dequantize_weight(q, scale, tuple(block) if block else None)
        errors.append(((deq - w).norm() / w.norm()).item())
    return {
        "source": str(src),
        "output": str(dst),
        "result": result,
        "weight_rel_l2_max": max(errors),
        "weight_rel_l2_mean": sum(errors) / len(errors),
    }


_DEMO_RECORD = ".omni-fp8-demo.json"


def _check_earlier_demo(out: Path) -> None:
    """``--force`` deletes ``out`` only if the demo wrote every file in it (its record says which)."""
    from .errors import OutputExistsError
    from .manifest import read_manifest
    from .output import unlisted_files
    from .source import read_json

    def refuse(why: str) -> OutputExistsError:
        return OutputExistsError(
            f"{out}: exists and is not an earlier demo output ({why}); nothing was deleted. Choose another folder.",
            path=out,
        )

    if out.is_symlink() or not out.is_dir() or not (out / _DEMO_RECORD).is_file():
        raise refuse(f"it has no {_DEMO_RECORD}")
    try:
        listed = dict(read_json(out / _DEMO_RECORD, "the demo record")["files"])
        fp8 = out / "qwen-image-tiny-fp8"
        if fp8.exists():
            listed.update({f"{fp8.name}/{rel}": None for rel in read_manifest(fp8)["files"]})
            listed[f"{fp8.name}/fp8_manifest.json"] = None
    except (OmniFp8Error, KeyError, TypeError, ValueError) as e:
        raise refuse("its records are damaged") from e
    extra = [rel for rel in unlisted_files(out, listed) if rel != _DEMO_RECORD]
    if extra:
        raise refuse(f"it holds files the demo did not write: {', '.join(extra[:3])}")


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors
