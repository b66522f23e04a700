"""What each engine's loader needs from a conversion: layers it keeps, Linears it fuses.

The plan decides every Linear for omni-fp8's own loader first (patterns, presets, alignment);
a target then adjusts those decisions to what another engine reads correctly:

* ``vllm-omni`` (0.30.0; ``vllm_omni/diffusion/models/{qwen_image,z_image}/*_transformer.py``)
  builds some Linears with ``quant_config=None`` whatever the checkpoint says, and copies an FP8
  weight found there into its BF16 parameter without the scale (Qwen-Image skips the scale
  silently; Z-Image fails on it). Those Linears are kept. It fuses ``to_q/to_k/to_v`` into
  ``to_qkv`` (and ``add_*_proj`` into ``add_kv_proj``, Z-Image ``w1/w3`` into ``w13``): vLLM
  refuses a fused layer whose parts differ in precision (``is_layer_skipped``), and with
  per-tensor scales it requantizes the parts to their largest scale
  (``requantize_with_max_scale``), so the parts share one scale and no bit changes. With block
  scales it loads each part's grid rows as they are, which needs every part but the last to span
  whole blocks of rows (``validate_fp8_block_shape``).
* ``comfyui`` (v0.8.0, ``comfy/ldm/lumina/model.py``) runs Z-Image as Lumina's ``NextDiT`` with
  one ``attention.qkv`` Linear and one scalar scale for it: q/k/v share a scale. Qwen-Image's
  ComfyUI modules are diffusers' own, unfused.
* ``diffusers`` (the BFL ``fp8r`` layout) keeps diffusers' modules as they are.

Only the plan stage imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .options import DEFAULT_TARGET

__all__ = ["FusedGroup", "TargetRules", "rules_for", "fused_groups", "KEPT_BY_TARGET", "FUSED_GROUP", "FUSED_BLOCK_SHAPE"]

# Reasons a target adds to the manifest's ``kept`` entries.
KEPT_BY_TARGET = "target"  # written as "target:<name>"
FUSED_GROUP = "fused-group"  # a sibling in the engine's fused Linear stays high precision
FUSED_BLOCK_SHAPE = "fused-block-shape"  # the fused parts do not span whole blocks of rows

QWEN_IMAGE = "QwenImageTransformer2DModel"
Z_IMAGE = "ZImageTransformer2DModel"


@dataclass(frozen=True)
class FusedGroup:
    """Sibling Linears an engine loads as one: ``name`` replaces the last name component of each part."""

    name: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class TargetRules:
    """One engine's needs for one model class.

    Attributes:
        keeps: Patterns (plan syntax) of Linears the engine never quantizes.
        fused: The engine's fused Linears; decided together, and sharing one per-tensor scale.
        fused_block_rows: With block scales, every part but the last must span whole row blocks.
        encoder: A pipeline component the engine applies the checkpoint's FP8 config to as well,
            whose Linears must be listed in ``ignored_layers``.
    """

    keeps: tuple[str, ...] = ()
    fused: tuple[FusedGroup, ...] = ()
    fused_block_rows: bool = False
    encoder: str | None = None


_QKV = FusedGroup("to_qkv", ("to_q", "to_k", "to_v"))
_RULES: Mapping[str, Mapping[str, TargetRules]] = {
    "vllm-omni": {
        QWEN_IMAGE: TargetRules(
            keeps=("img_mod", "txt_mod", "img_in", "txt_in", "time_text_embed", "norm_out.linear", "proj_out"),
            fused=(_QKV, FusedGroup("add_kv_proj", ("add_q_proj", "add_k_proj", "add_v_proj"))),
            fused_block_rows=True,
        ),
        Z_IMAGE: TargetRules(
            keeps=("adaLN_modulation", "t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer"),
            fused=(_QKV, FusedGroup("w13", ("w1", "w3"))),
            fused_block_rows=True,
            encoder="text_encoder",
        ),
    },
    "comfyui": {
        Z_IMAGE: TargetRules(fused=(FusedGroup("qkv", ("to_q", "to_k", "to_v")),)),
        QWEN_IMAGE: TargetRules(),
    },
    "diffusers": {},
}


def rules_for(target: str, class_name: str) -> TargetRules:
    """The rules of ``target`` for ``class_name`` (none for omni-fp8 or a class the engine leaves alone)."""
    if target == DEFAULT_TARGET:
        return TargetRules()
    return _RULES.get(target, {}).get(class_name, TargetRules())


def fused_groups(rules: TargetRules, linears: Mapping[str, object]) -> dict[str, tuple[str, ...]]:
    """Fused module name -> its parts' module names, for every fused Linear present in ``linears``."""
    groups: dict[str, tuple[str, ...]] = {}
    for group in rules.fused:
        first = group.parts[0]
        for name in linears:
            parent, _, last = name.rpartition(".")
            if last != first:
                continue
            prefix = f"{parent}." if parent else ""
            parts = tuple(prefix + p for p in group.parts)
            if all(p in linears for p in parts):
                groups[prefix + group.name] = parts
    return groups
