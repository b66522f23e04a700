"""What makes a diffusers model an FP8 model, however it was made, and how it is saved.

``load_transformer``, ``quantize_`` and diffusers' own ``from_pretrained`` (through
``Fp8Quantizer``) all end in ``mark_fp8``: the model is marked the way diffusers marks the models
its quantizers load (``is_quantized``, ``hf_quantizer``, the checkpoint's ``quantization_config``
in ``model.config``), so diffusers' own code treats it as quantized: ``save_pretrained`` writes
the FP8 tensors *with* their ``quantization_config`` (a folder that plain diffusers refuses
loudly instead of loading raw FP8 codes as weights), ``dequantize()`` works, ``.to(dtype)`` is
refused as for every quantized model.

``save_pretrained`` of a marked model also writes ``fp8_manifest.json`` after diffusers has
written the files, so ``omni-convert verify`` checks a saved folder as it checks a converted one.
"""

from __future__ import annotations

import collections
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_fp8.converter.errors import ConfigError, CorruptCheckpointError, OutputExistsError, SourceNotFoundError
from omni_fp8.converter.numerics import FP8_DTYPE
from omni_fp8.converter.options import Fp8Config, QuantMethod

from .fp8_linear import Fp8Linear

__all__ = ["Fp8Provenance", "mark_fp8", "unmark_fp8", "is_fp8_model"]


@dataclass
class Fp8Provenance:
    """How an FP8 model came to be, for the manifest its ``save_pretrained`` writes.

    Attributes:
        options: The resolved options (the manifest's ``options``).
        reasons: Kept Linear module -> why it stayed high precision (``ignored:img_mlp``, ...).
        source_dtypes: FP8 weight name -> the safetensors dtype it was quantized from.
        origin: Where the weights came from (the manifest's ``source``).
    """

    options: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)
    source_dtypes: dict[str, str] = field(default_factory=dict)
    origin: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: Any) -> Fp8Provenance:
        """A model quantized while loading, by the converter's plan (``load_transformer``, diffusers)."""
        return cls(
            options=plan.options(),
            reasons={name: d.reason for name, d in plan.linears.items() if not d.quantized},
            source_dtypes={t.name: t.source.dtype for t in plan.tensors if t.scheme != "kept"},
            origin=dict(plan.source.origin),
        )


def is_fp8_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_omni_fp8", None), Fp8Provenance)


def mark_fp8(
    model: nn.Module,
    *,
    quantization_config: Mapping[str, Any],
    provenance: Fp8Provenance,
    compute_dtype: torch.dtype | None = None,
    quantizer: Any = None,
) -> None:
    """Mark ``model`` (its ``Fp8Linear`` layers in place) as an FP8 model diffusers understands.

    ``quantization_config`` is the checkpoint form (vLLM's ``quant_method: "fp8"`` dict) that
    ``config.json`` gets on save. A model that is not a diffusers model only gets the provenance.
    """
    _set_compute_dtype(model, compute_dtype)
    model._omni_fp8 = provenance
    if not (hasattr(model, "register_to_config") and hasattr(type(model), "save_pretrained")):
        return
    model.register_to_config(quantization_config=dict(quantization_config))
    model.is_quantized = True
    model.quantization_method = QuantMethod.FP8
    if quantizer is None:
        from .diffusers_quantizer import Fp8Quantizer

        quantizer = Fp8Quantizer(Fp8Config.from_dict(quantization_config), pre_quantized=True)
    model.hf_quantizer = quantizer
    model.save_pretrained = types.MethodType(_save_pretrained, model)


def unmark_fp8(model: nn.Module) -> None:
    """Undo ``mark_fp8`` after the layers were dequantized (``model.dequantize()``)."""
    model.__dict__.pop("save_pretrained", None)
    model.__dict__.pop("_omni_fp8", None)
    config = getattr(model, "_internal_dict", None)
    if config is not None and "quantization_config" in config:
        model._internal_dict = type(config)({k: v for k, v in config.items() if k != "quantization_config"})
    model.is_quantized = False


def _set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Bias-less FP8 layers take the model's compute dtype (peft creates LoRA adapters in it)."""
    if dtype is None:
        counts = collections.Counter(
            p.dtype for m in model.modules() if not isinstance(m, Fp8Linear)
            for p in m.parameters(recurse=False) if p.is_floating_point() and p.dtype != FP8_DTYPE
        )
        dtype = counts.most_common(1)[0][0] if counts else None
    if dtype is None:
        return
    for module in model.modules():
        if isinstance(module, Fp8Linear) and module.bias is None:
            module.compute_dtype = dtype


def _save_pretrained(self: nn.Module, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
    """diffusers' ``save_pretrained``, then the manifest; safetensors only, no variants.

    The manifest is written last, from the files as written, so a folder with one describes
    exactly what is on disk. ``push_to_hub`` uploads after the manifest is written.
    """
    from omni_fp8.converter.manifest import read_manifest, saved_manifest
    from omni_fp8.converter.source import MANIFEST_NAME
    from omni_fp8.converter.writer import write_json

    fused = next((name for name, m in self.named_modules() if hasattr(m, "omni_fused_parts")), None)
    if fused is not None:  # its files would hold to_qkv where every loader expects to_q, to_k, to_v
        raise ConfigError(
            f"save_pretrained: {fused} is a fused projection (fuse_blocks_); call omni_fp8.unfuse_blocks_(model) "
            "before saving, so that the files keep diffusers' layer names."
        )
    if kwargs.get("safe_serialization", True) is False or kwargs.get("variant"):
        raise ConfigError(
            "save_pretrained of an FP8 model writes safetensors without a variant (the files omni-fp8 and vLLM-style "
            "loaders read); drop safe_serialization=False / variant."
        )
    push = kwargs.pop("push_to_hub", False)
    hub = {k: kwargs.pop(k) for k in ("commit_message", "private", "create_pr", "token", "repo_id") if k in kwargs}
    folder = Path(save_directory)
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.exists():
        try:
            previous = read_manifest(folder)
        except (CorruptCheckpointError, SourceNotFoundError) as e:
            raise OutputExistsError(
                f"{manifest_path}: exists and is not an omni-fp8 manifest; it was left as it is. Save into another "
                "folder.", path=manifest_path) from e
        # An earlier save's files: ours (the manifest lists them), and about to be stale. diffusers
        # would leave an old shard index next to a new single file; a half-written save must not
        # look verified either, so the manifest goes first.
        manifest_path.unlink()
        for rel in previous["files"]:
            (folder / rel).unlink(missing_ok=True)
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    repo_id = _write_card(folder, hub) if push else None
    provenance: Fp8Provenance = self._omni_fp8
    manifest = saved_manifest(
        folder,
        class_name=type(self).__name__,
        options=provenance.options,
        quantization_config=dict(self.config["quantization_config"]),
        reasons=provenance.reasons,
        source_dtypes=provenance.source_dtypes,
        origin={"type": "saved", "from": provenance.origin},
        extra_files=("README.md",) if push else (),
    )
    write_json(manifest_path, manifest)
    if repo_id is not None:
        self._upload_folder(folder, repo_id, token=hub.get("token"), commit_message=hub.get("commit_message"),
                            create_pr=hub.get("create_pr", False))


def _write_card(folder: Path, hub: dict[str, Any]) -> str:
    """``save_pretrained(push_to_hub=True)``'s repo and card, as diffusers makes them."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
    from huggingface_hub import create_repo

    token = hub.get("token")
    repo_id = create_repo(hub.get("repo_id", folder.name), exist_ok=True, private=hub.get("private"),
                          token=token).repo_id
    populate_model_card(load_or_create_model_card(repo_id, token=token)).save((folder / "README.md").as_posix())
    return repo_id
