"""FP8 checkpoints as omni-fp8 and other tools write them, read as one thing: a ``Layout``.

A layout says which Linears of the model hold FP8 weights and with which scales (``schemes``:
``fp8_tensor``, ``fp8_channel``, ``fp8_block`` or ``kept``), and turns each stored tensor into
the model's own tensors (``translate``: renames, scale shapes, a fused q/k/v split back into its
parts, markers dropped). The loader streams every layout the same way, with the same checks.

Layouts read (each recognised from its own markers, never guessed from values):

* ``fp8``: vLLM's convention, which omni-fp8 writes: ``quantization_config.quant_method == "fp8"``,
  ``weight`` float8_e4m3fn with ``weight_scale`` (a scalar, or ``[N]``/``[N, 1]`` per row) or
  ``weight_scale_inv`` (a block grid).
* ``compressed-tensors``: llm-compressor's ``float-quantized`` checkpoints
  (``quant_method == "compressed-tensors"``): ``weight_scale`` ``[1]`` (tensor strategy) or
  ``[N, 1]`` (channel strategy); dynamic per-token activations, or static ones (``input_scale``
  ``[1]``, tensor strategy).
* ``modelopt``: NVIDIA ModelOpt FP8 (``quant_method == "modelopt"``, ``quant_algo == "FP8"``):
  ``weight_scale`` per tensor or per row; its calibrated ``input_scale`` makes the layer static,
  as vLLM runs it.
* ``bfl-fp8r``: Black Forest Labs' single file, as diffusers reads it: ``weight_scale`` ``[N]``.
* ``comfyui``: ComfyUI's single files: per-layer ``.comfy_quant`` markers with a scalar
  ``weight_scale``, or the older ``scaled_fp8`` marker with ``scale_weight``; ComfyUI's module
  names (Z-Image as Lumina's ``NextDiT``, fused ``attention.qkv``), an optional
  ``model.diffusion_model.`` prefix.

Static activation scales: a layer with a float32 scalar ``input_scale`` beside its FP8 weight
quantizes its activations with it (``Layout.static``). In a vLLM ``fp8`` folder with
``activation_scheme: "static"`` every FP8 layer must have one, except those listed (by module
name) in ``static_ignored_layers``, which omni-fp8 writes for Linears it kept dynamic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelMismatchError, UnsupportedSourceError
from .numerics import block_scale_shape
from .options import parse_block_size
from .safetensors_format import TensorInfo
from .source import Source

__all__ = ["Layout", "read_layout", "FP8_SCHEMES"]

FP8_SCHEMES = ("fp8_tensor", "fp8_channel", "fp8_block")
KEPT = "kept"
_COMFY_PREFIX = "model.diffusion_model."
# ComfyUI's Lumina names -> diffusers' Z-Image names (export_comfyui writes the other way).
_Z_IMAGE_FROM_COMFY = (
    ("final_layer.", "all_final_layer.2-1."),
    ("x_embedder.", "all_x_embedder.2-1."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
)


@dataclass
class Layout:
    """One checkpoint's FP8 layout, resolved against the model it is for (see the module docstring).

    Attributes:
        name: Which layout (``fp8``, ``compressed-tensors``, ``modelopt``, ``bfl-fp8r``, ``comfyui``).
        schemes: Module name -> scheme, for every Linear of the model.
        block_size: The block of ``fp8_block`` layers, if any.
        splits: Stored weight or scale name -> the model's tensors it holds, as (name, first row,
            rows); a fused q/k/v weight holds its parts' rows, its one scalar scale serves each.
        renames: Stored name -> the model's name (ComfyUI's names, prefixes, legacy scale names).
        dropped: Stored tensors that are not the model's (markers, unused input scales).
        notes: What the user should know about reading this layout (one line each).
        static: FP8 Linears with a stored ``input_scale`` (static activations).
    """

    name: str
    schemes: dict[str, str]
    block_size: tuple[int, int] | None = None
    splits: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    static: set[str] = field(default_factory=set)

    def translate(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's tensors a stored one becomes (none for markers)."""
        if name in self.dropped:
            return
        if name in self.splits:
            for target, start, rows in self.splits[name]:
                yield target, self._shaped(target, tensor if rows == 0 else tensor[start : start + rows])
            return
        target = self.renames.get(name, name)
        yield target, self._shaped(target, tensor)

    def _shaped(self, target: str, tensor: torch.Tensor) -> torch.Tensor:
        """Scales as the model holds them: a scalar, or ``[N, 1]`` per row (files store ``[1]``, ``[N]``)."""
        module, _, attr = target.rpartition(".")
        scheme = self.schemes.get(module)
        if attr in ("weight_scale", "weight_scale_inv", "input_scale") and scheme != KEPT:
            tensor = tensor.to(torch.float32)  # exact from BF16 / FP16 scales
        if attr == "input_scale":
            return tensor.reshape(())
        if attr == "weight_scale" and scheme == "fp8_tensor":
            return tensor.reshape(())
        if attr == "weight_scale" and scheme == "fp8_channel":
            return tensor.reshape(-1, 1)
        return tensor

    def checkpoint_config(self) -> dict[str, Any]:
        """The ``quantization_config`` a save of the loaded model writes (omni-fp8's own layout)."""
        kept = [name for name, scheme in self.schemes.items() if scheme == KEPT]
        out = {"quant_method": "fp8", "activation_scheme": "static" if self.static else "dynamic",
               "weight_block_size": list(self.block_size) if self.block_size else None,
               "ignored_layers": kept, "is_checkpoint_fp8_serialized": True}
        if "fp8_channel" in self.schemes.values():
            out["weight_strategy"] = "channel"
        dynamic = [name for name, scheme in self.schemes.items() if scheme != KEPT and name not in self.static]
        if self.static and dynamic:
            out["static_ignored_layers"] = dynamic
        return out


def read_layout(source: Source, shapes: Mapping[str, tuple[int, int]]) -> Layout | None:
    """The FP8 layout of ``source`` for a model whose Linears have ``shapes``; ``None`` if not FP8."""
    infos = {t.name: t for t in source.tensors}
    config = source.config.get("quantization_config")
    where = source.shards[0].path if source.kind == "file" else source.model_dir / "config.json"
    has_fp8 = any(t.dtype.startswith("F8_") for t in infos.values())
    if isinstance(config, Mapping):
        method = config.get("quant_method")
        if method == "fp8":
            return _vllm_fp8(config, infos, shapes, where)
        if method == "compressed-tensors":
            return _compressed_tensors(config, infos, shapes, where)
        if method == "modelopt":
            return _modelopt(config, infos, shapes, where)
        raise UnsupportedSourceError(
            f"{where}: quantized with {method!r}, not an FP8 layout omni-fp8 reads (fp8, compressed-tensors, "
            "modelopt, and BFL fp8r / ComfyUI single files).", path=where)
    if not has_fp8:
        return None
    if any(n.endswith(".comfy_quant") or n == "scaled_fp8" or n.endswith(".scaled_fp8") for n in infos):
        return _comfyui(infos, shapes, where, source)
    if source.kind == "file":
        return _bfl_fp8r(infos, shapes, where)
    return None  # FP8 tensors without a config: the loader refuses that with its own message


def _schemes(infos: Mapping[str, TensorInfo], shapes: Mapping[str, tuple[int, int]], where: Path,
             block: tuple[int, int] | None, *,
             block_scale: str = "weight_scale_inv", scale_dtypes: tuple[str, ...] = ("F32",)) -> dict[str, str]:
    """Each Linear's scheme from its stored weight and scale (by the model's names)."""
    schemes = {}
    for module, (n, k) in shapes.items():
        weight = infos.get(f"{module}.weight")
        if weight is None or weight.dtype != "F8_E4M3":
            schemes[module] = KEPT
            continue
        if block is not None:
            name, want = f"{module}.{block_scale}", (block_scale_shape((n, k), block),)
        else:
            name, want = f"{module}.weight_scale", ((), (1,), (n,), (n, 1))
        scale = infos.get(name)
        if scale is None:
            other = f"{module}.weight_scale_inv" if name.endswith("weight_scale") else f"{module}.weight_scale"
            hint = (f" (it has {other.rsplit('.', 1)[1]}: config.json's weight_block_size does not match the shards)"
                    if other in infos else "")
            raise ModelMismatchError(
                f"{where}: {module}.weight is FP8 but {name} is missing{hint}; the checkpoint is incomplete or damaged, "
                "convert it again.", path=where)
        if scale.dtype not in scale_dtypes or tuple(scale.shape) not in want:
            raise ModelMismatchError(
                f"{scale.file}: {name} is {scale.dtype}{list(scale.shape)}, expected {'/'.join(scale_dtypes)} "
                f"{' or '.join(str(list(w)) for w in want)} for a [{n}, {k}] weight; the checkpoint is damaged or was "
                "written with other block sizes.", path=scale.file)
        if block is not None:
            schemes[module] = "fp8_block"
        else:
            schemes[module] = "fp8_channel" if tuple(scale.shape) in ((n,), (n, 1)) and n > 1 else "fp8_tensor"
    return schemes


def _static_layers(infos: Mapping[str, TensorInfo], schemes: Mapping[str, str], where: Path, *,
                   required: bool, dynamic: Iterable[str] = (), scale_dtypes: tuple[str, ...] = ("F32",)) -> set[str]:
    """The FP8 Linears with an ``input_scale`` (one value, float32 or as ``scale_dtypes`` allow).

    With ``required``, every FP8 Linear not named in ``dynamic`` must have one: a static
    checkpoint missing a scale is damaged, and quantizing that layer per token instead would
    silently differ from what the checkpoint was made for.
    """
    dynamic = set(dynamic)
    static = set()
    for module, scheme in schemes.items():
        info = infos.get(f"{module}.input_scale")
        if scheme == KEPT:
            continue
        if info is None:
            if required and module not in dynamic:
                raise ModelMismatchError(
                    f"{where}: activation_scheme is static but {module}.input_scale is missing (and {module} is not in "
                    "static_ignored_layers); the checkpoint is incomplete or damaged, convert it again.", path=where)
            continue
        if info.dtype not in scale_dtypes or tuple(info.shape) not in ((), (1,)):
            raise ModelMismatchError(
                f"{info.file}: {module}.input_scale is {info.dtype}{list(info.shape)}, expected one "
                f"{'/'.join(scale_dtypes)} value; the checkpoint is damaged.", path=info.file)
        static.add(module)
    return static


def _vllm_fp8(config: Mapping[str, Any], infos: Mapping[str, TensorInfo], shapes: Mapping[str, tuple[int, int]],
              where: Path) -> Layout:
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise UnsupportedSourceError(
            f"{where}: activation_scheme {scheme!r} is not one omni-fp8 reads ('dynamic' or 'static'); the "
            "config is damaged or from a newer tool.", path=where)
    dynamic = config.get("static_ignored_layers") or []
    if not isinstance(dynamic, list) or not all(isinstance(n, str) for n in dynamic):
        raise UnsupportedSourceError(
            f"{where}: static_ignored_layers must be a list of Linear names; the config is damaged.", path=where)
    raw_block = config.get("weight_block_size")
    block = parse_block_size(raw_block) if raw_block else None
    schemes = _schemes(infos, shapes, where, block)
    static = _static_layers(infos, schemes, where, required=scheme == "static", dynamic=dynamic)
    if scheme == "dynamic" and static:
        raise ModelMismatchError(
            f"{where}: activation_scheme is dynamic but {sorted(static)[0]} has an input_scale; config.json does not "
            "match the shards (restore it from the conversion).", path=where)
    return Layout("fp8", schemes, block, static=static)


def _compressed_tensors(config: Mapping[str, Any], infos: Mapping[str, TensorInfo],
                        shapes: Mapping[str, tuple[int, int]], where: Path) -> Layout:
    groups = config.get("config_groups") or {}
    if config.get("format") not in ("float-quantized", None) or not groups:
        raise UnsupportedSourceError(
            f"{where}: compressed-tensors format {config.get('format')!r}; omni-fp8 reads float-quantized FP8 "
            "(llm-compressor's FP8 schemes).", path=where)
    block, static_inputs = None, False
    for group in groups.values():
        weights, inputs = group.get("weights") or {}, group.get("input_activations")
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise UnsupportedSourceError(
                f"{where}: compressed-tensors weights {weights.get('type')}{weights.get('num_bits')}; only FP8 weights "
                "are read.", path=where)
        if weights.get("strategy") == "block":
            block = parse_block_size(weights.get("block_structure"))
        elif weights.get("strategy") not in ("tensor", "channel"):
            raise UnsupportedSourceError(
                f"{where}: compressed-tensors weight strategy {weights.get('strategy')!r}; tensor, channel and block "
                "are read.", path=where)
        if inputs and not inputs.get("dynamic", False):
            if inputs.get("type") != "float" or inputs.get("num_bits") != 8 or inputs.get("strategy") != "tensor" \
                    or not inputs.get("symmetric", True):
                raise UnsupportedSourceError(
                    f"{where}: compressed-tensors static input activations {inputs.get('type')}{inputs.get('num_bits')} "
                    f"strategy {inputs.get('strategy')!r}; omni-fp8 reads symmetric FP8 per-tensor static ones (or "
                    "dynamic).", path=where)
            static_inputs = True
    dropped = {n for n in infos if n.endswith((".weight_zero_point", ".input_zero_point"))}
    # llm-compressor stores scales in the model's dtype unless told otherwise (scale_dtype): BF16
    # and FP16 scales widen to float32 exactly.
    schemes = _schemes(infos, shapes, where, block, block_scale="weight_scale", scale_dtypes=("F32", "BF16", "F16"))
    # Its block scales are named weight_scale; the model's block layers hold weight_scale_inv.
    renames = {f"{m}.weight_scale": f"{m}.weight_scale_inv" for m, sc in schemes.items() if sc == "fp8_block"}
    static = _static_layers(infos, schemes, where, required=static_inputs, scale_dtypes=("F32", "BF16", "F16"))
    if not static_inputs:
        static = set()
    dropped |= {n for n in infos if n.endswith(".input_scale") and n.removesuffix(".input_scale") not in static}
    return Layout("compressed-tensors", schemes, block, renames=renames, dropped=dropped, static=static)


def _modelopt(config: Mapping[str, Any], infos: Mapping[str, TensorInfo], shapes: Mapping[str, tuple[int, int]],
              where: Path) -> Layout:
    algo = str(config.get("quant_algo") or config.get("quant_type") or "").upper()
    if algo != "FP8":
        raise UnsupportedSourceError(f"{where}: ModelOpt quant_algo {algo!r}; only FP8 is read.", path=where)
    dropped = {n for n in infos if n.endswith(("._amax", ".amax"))}
    schemes = _schemes(infos, shapes, where, None)
    # ModelOpt's FP8 is static: vLLM quantizes activations with its calibrated input_scale.
    static = _static_layers(infos, schemes, where, required=False, scale_dtypes=("F32", "BF16", "F16"))
    dropped |= {n for n in infos if n.endswith(".input_scale") and n.removesuffix(".input_scale") not in static}
    return Layout("modelopt", schemes, None, dropped=dropped, static=static)


def _bfl_fp8r(infos: Mapping[str, TensorInfo], shapes: Mapping[str, tuple[int, int]], where: Path) -> Layout:
    if any(n.endswith(".weight_scale_2") for n in infos):
        raise UnsupportedSourceError(
            f"{where}: a BFL NVFP4 file (weight_scale_2); omni-fp8 reads FP8 (fp8r) files.", path=where)
    schemes = _schemes(infos, shapes, where, None)
    return Layout("bfl-fp8r", schemes, None, dropped={n for n in infos if n.endswith(".input_scale")})


def _comfyui(infos: Mapping[str, TensorInfo], shapes: Mapping[str, tuple[int, int]], where: Path,
             source: Source) -> Layout:
    """ComfyUI's names mapped to diffusers', legacy scale names renamed, fused q/k/v split."""
    dropped = {n for n in infos if n.endswith((".comfy_quant", ".scale_input", ".input_scale"))
               or n in ("scaled_fp8",) or n.endswith(".scaled_fp8")}
    z_image = source.class_name == "ZImageTransformer2DModel"
    renames: dict[str, str] = {}
    for name in infos:
        if name in dropped:
            continue
        ours = name.removeprefix(_COMFY_PREFIX)
        if ours.endswith(".scale_weight"):  # the older scaled_fp8 form
            ours = ours.removesuffix(".scale_weight") + ".weight_scale"
        if z_image:
            ours = _z_image_name(ours)
        if ours != name:
            renames[name] = ours
    splits: dict[str, list[tuple[str, int, int]]] = {}
    if z_image:  # attention.qkv -> to_q, to_k, to_v (the scale, per tensor, serves all three)
        for stored, ours in list(renames.items()) + [(n, n) for n in infos if n not in renames]:
            module, _, attr = ours.rpartition(".")
            if not module.endswith(".attention.qkv") or attr not in ("weight", "weight_scale", "bias"):
                continue
            prefix = module.removesuffix("qkv")
            start, parts = 0, []
            for part in ("to_q", "to_k", "to_v"):
                rows = shapes[f"{prefix}{part}"][0]
                parts.append((f"{prefix}{part}.{attr}", start, 0 if attr == "weight_scale" else rows))
                start += rows
            splits[stored] = parts
    # The schemes, by the model's names: a split weight's parts share its scheme.
    model_infos: dict[str, TensorInfo] = {}
    for stored, info in infos.items():
        if stored in dropped:
            continue
        targets = [t for t, _, _ in splits.get(stored, [])] or [renames.get(stored, stored)]
        for target in targets:
            model_infos[target] = info if stored not in splits else _part_info(info, target, shapes)
    schemes = _schemes(model_infos, shapes, where, None)
    marker = next((infos[n] for n in infos if n.endswith(".comfy_quant")), None)
    notes = []
    if marker is not None and marker.nbytes < 4096:
        notes.append(f"ComfyUI FP8 layers ({_marker_format(marker)}); activations are quantized per token")
    return Layout("comfyui", schemes, None, splits=splits, renames=renames, dropped=dropped, notes=notes)


def _part_info(info: TensorInfo, target: str, shapes: Mapping[str, tuple[int, int]]) -> TensorInfo:
    """The header entry of one part of a fused tensor (its rows), for checking shapes and dtypes."""
    module, _, attr = target.rpartition(".")
    rows = shapes[module][0]
    shape = info.shape if attr == "weight_scale" else (rows, *info.shape[1:])
    return TensorInfo(name=target, file=info.file, dtype=info.dtype, shape=tuple(shape), begin=0, end=0)


def _z_image_name(name: str) -> str:
    for comfy, ours in _Z_IMAGE_FROM_COMFY:
        if comfy.startswith("."):
            name = name.replace(comfy, ours)
        elif name.startswith(comfy):
            name = ours + name[len(comfy):]
    return name


def _marker_format(marker: TensorInfo) -> str:
    with open(marker.file, "rb") as f:
        f.seek(marker.begin)
        raw = f.read(marker.nbytes)
    try:
        return str(json.loads(raw.decode("utf-8")).get("format", "?"))
    except (ValueError, AttributeError):
        return "unreadable marker"
