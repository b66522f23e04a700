"""ComfyUI's single-file layout: its module names, its fused Linears, its per-layer FP8 markers.

Read from ComfyUI v0.8.0 (upstream commit 3cd7b32f): ``comfy.sd.load_diffusion_model`` detects
the architecture from key names (``comfy/model_detection.py``), and ``detect_layer_quantization``
(``comfy/utils.py``) switches to ``MixedPrecisionOps`` when any key ends in ``.comfy_quant``. Each
quantized Linear then has ``weight`` (float8_e4m3fn), a scalar float32 ``weight_scale`` (the
dequantization multiplier) and ``comfy_quant``, a uint8 tensor of JSON bytes naming the format
(``comfy/ops.py``, ``_load_from_state_dict``).

``full_precision_matrix_mult`` is written true: without an ``input_scale`` ComfyUI would quantize
activations with scale 1.0 (no per-token scaling, values past 448 clipped), while these weights
were made for dynamic activation scales; with it, ComfyUI dequantizes the weight and multiplies
in the compute dtype, which is omni-fp8's weight-only arithmetic.

Qwen-Image's ComfyUI modules are diffusers' (``comfy/ldm/qwen_image/model.py``). Z-Image runs as
Lumina's ``NextDiT`` (``comfy/ldm/lumina/model.py``): fused ``attention.qkv``, ``attention.out``,
``x_embedder``, ``final_layer``, ``q_norm``/``k_norm``; ComfyUI does not rename diffusers' Z-Image
keys when loading, so they are renamed here (the inverse of diffusers'
``convert_z_image_transformer_checkpoint_to_diffusers``).
"""

from __future__ import annotations

import json

import torch

from .errors import UnsupportedSourceError
from .numerics import FP8_DTYPE
from .plan import KEPT, Plan, TensorPlan
from .targets import QWEN_IMAGE, Z_IMAGE
from .writer import FileTensor

__all__ = ["comfyui_layout", "comfy_quant_marker", "COMFY_QUANT_CONFIG", "Z_IMAGE_RENAMES"]

COMFY_QUANT_CONFIG = {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}

# diffusers name fragment -> ComfyUI's, for Z-Image (patch size 2, frame patch 1: the one ComfyUI runs).
Z_IMAGE_RENAMES = (
    ("all_final_layer.2-1.", "final_layer."),
    ("all_x_embedder.2-1.", "x_embedder."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)


def comfy_quant_marker(config: dict[str, object] = COMFY_QUANT_CONFIG) -> torch.Tensor:
    """The ``<layer>.comfy_quant`` tensor: the layer's quantization config as uint8 JSON bytes."""
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


def comfyui_layout(plan: Plan) -> list[FileTensor]:
    """Every tensor of the ComfyUI file, in the source's order, fused groups where their first part was."""
    class_name = plan.source.class_name
    if class_name == QWEN_IMAGE:
        rename = _same
    elif class_name == Z_IMAGE:
        _check_z_image_patches(plan)
        rename = _z_image_name
    else:
        raise UnsupportedSourceError(
            f"--target comfyui knows ComfyUI's names for {QWEN_IMAGE} and {Z_IMAGE} only, not {class_name}; "
            "convert to a folder (the default target) instead."
        )
    by_name = {t.name: t for t in plan.tensors}
    fused_of = {f"{part}.weight": fused for fused, parts in plan.fused.items() for part in parts}
    out: list[FileTensor] = []
    done: set[str] = set()
    for t in plan.tensors:
        fused = fused_of.get(t.name)
        if fused is not None:
            if fused in done:
                continue
            done.add(fused)
            parts = tuple(by_name[f"{p}.weight"] for p in plan.fused[fused])
            out += _linear(f"{rename(fused)}.weight", parts)
        elif t.scheme != KEPT:
            out += _linear(rename(t.name), (t,))
        else:
            out.append(FileTensor(rename(t.name), t.outputs[0].dtype, t.source.shape, (t,)))
    return out


def _linear(weight_name: str, parts: tuple[TensorPlan, ...]) -> list[FileTensor]:
    rows = sum(p.source.shape[0] for p in parts)
    shape = (rows, *parts[0].source.shape[1:])
    if parts[0].scheme == KEPT:
        return [FileTensor(weight_name, parts[0].outputs[0].dtype, shape, parts)]
    layer = weight_name.removesuffix(".weight")
    marker = comfy_quant_marker()
    return [
        FileTensor(weight_name, FP8_DTYPE, shape, parts),
        FileTensor(f"{layer}.weight_scale", torch.float32, (), parts, role="scale"),
        FileTensor(f"{layer}.comfy_quant", torch.uint8, tuple(marker.shape), role="constant", constant=marker),
    ]


def _same(name: str) -> str:
    return name


def _z_image_name(name: str) -> str:
    for old, new in Z_IMAGE_RENAMES:
        if name.startswith(old) or old.startswith("."):
            name = name.replace(old, new)
    return name


def _check_z_image_patches(plan: Plan) -> None:
    other = sorted({t.name.split(".")[1] for t in plan.tensors
                    if t.name.startswith(("all_x_embedder.", "all_final_layer.")) and t.name.split(".")[1] != "2-1"})
    if other:
        raise UnsupportedSourceError(
            f"{plan.source.model_dir}: has patch embedders {', '.join(other)} besides 2-1; ComfyUI's Z-Image runs "
            "patch size 2 only. Convert to a folder (the default target) instead."
        )
