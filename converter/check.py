"""Would another engine load a converted output as it is written? ``omni-convert check PATH --target T``.

Each rule restates what that engine's loader does (the modules named in ``targets.py``,
``export_comfyui.py`` and ``export_diffusers.py``) and reports, one line per layer, what would
fail, what would be *cast*: an FP8 weight taken as plain numbers without its scale, or a high-
precision weight forced into FP8 without one, both silently wrong, and notes that change no
numbers. Only headers and the few scale tensors are read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, OmniFp8Error
from .export_comfyui import Z_IMAGE_RENAMES
from .options import SINGLE_FILE_TARGETS, TARGETS, parse_path
from .plan import compile_patterns, encoder_linears, model_structure
from .safetensors_format import TensorInfo, read_header, read_tensor
from .source import Source, open_source
from .targets import QWEN_IMAGE, Z_IMAGE, fused_groups, rules_for

__all__ = ["check", "CheckReport", "VLLM_FP8_CONFIG_KEYS"]

# vLLM's ``Fp8Config.__init__`` parameters (vllm 0.30.0, model_executor/layers/quantization/fp8.py);
# vllm-omni builds it as ``Fp8Config(**quantization_config)`` less ``quant_method``
# (vllm_omni/quantization/factory.py, ``_build_single``), so any other key is a TypeError.
VLLM_FP8_CONFIG_KEYS = frozenset(
    {"quant_method", "is_checkpoint_fp8_serialized", "activation_scheme", "ignored_layers", "weight_block_size",
     "store_dtype"}
)
_FP8 = "F8_E4M3"


@dataclass
class CheckReport:
    """Problems (each one line, exit 1 on any) and notes (no numbers change) for one target."""

    path: Path
    target: str
    layers: dict[str, int] = field(default_factory=dict)  # "fp8", "high-precision": what would load as written
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "target": self.target, "ok": self.ok, "layers": self.layers,
                "problems": self.problems, "notes": self.notes}


def check(path: str | Path, target: str) -> CheckReport:
    """Check a converted folder (``omni-fp8``, ``vllm-omni``) or file (``comfyui``, ``diffusers``) against ``target``."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}.")
    path = parse_path(path, what="the path")
    report = CheckReport(path, target)
    if target in SINGLE_FILE_TARGETS:
        if not path.is_file():
            raise ConfigError(f"{path}: --target {target} outputs are one .safetensors file; give that file.")
        header = read_header(path)
        (_check_comfyui if target == "comfyui" else _check_diffusers)(header.tensors, path, report)
        return report
    if path.is_file():
        raise ConfigError(f"{path}: --target {target} outputs are folders; give the folder.")
    source = open_source(path, allow_quantized=True)
    _check_folder(source, target, report)
    return report


# ----------------------------------------------------------------------------- folders


def _check_folder(source: Source, target: str, report: CheckReport) -> None:
    infos = {t.name: t for t in source.tensors}
    qc = source.config.get("quantization_config")
    fp8 = {n.removesuffix(".weight") for n, t in infos.items() if t.dtype == _FP8 and n.endswith(".weight")}
    if qc is None:
        if fp8:
            report.problems.append(
                f"config.json has no quantization_config but {len(fp8)} FP8 weights: they load as plain numbers "
                "without their scales (cast)")
        else:
            report.notes.append("not quantized: loads in high precision")
        return
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "fp8":
        report.problems.append(f"quantization_config is not an fp8 one ({qc!r:.80}); these rules do not apply")
        return
    block = qc.get("weight_block_size")
    shapes = model_structure(source.class_name, source.config).linears
    for name in shapes:
        if name in fp8:
            scale = infos.get(f"{name}.weight_scale_inv" if block else f"{name}.weight_scale")
            if scale is None:
                report.problems.append(f"{name}: FP8 weight without its {'weight_scale_inv' if block else 'weight_scale'} "
                                       "(fails to load)")
    report.layers = {"fp8": len(fp8 & set(shapes)), "high-precision": len(set(shapes) - fp8)}
    if target == "vllm-omni":
        _check_vllm_omni(source, qc, shapes, fp8, infos, report)


def _check_vllm_omni(
    source: Source, qc: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]], fp8: set[str],
    infos: Mapping[str, TensorInfo], report: CheckReport,
) -> None:
    extra = sorted(set(qc) - VLLM_FP8_CONFIG_KEYS)
    if extra:
        report.problems.append(
            f"quantization_config has {', '.join(map(repr, extra))}, which vLLM's Fp8Config does not take: vllm-omni "
            "fails to build its quantization config (TypeError)")
    if not qc.get("is_checkpoint_fp8_serialized"):
        report.problems.append(
            "quantization_config lacks is_checkpoint_fp8_serialized: true, so vLLM quantizes the FP8 weights again "
            "as if they were high precision (cast)")
    per_row = [n for n in sorted(fp8) if math.prod(getattr(infos.get(f"{n}.weight_scale"), "shape", ()) or (1,)) > 1]
    if per_row:
        report.problems.append(
            f"{per_row[0]} (and {len(per_row) - 1} more): one weight_scale per output row; vLLM's fp8 Linears hold one "
            "scale per weight, so vllm-omni fails to load it (convert with --weight-strategy tensor)")
    ignored = set(qc.get("ignored_layers") or [])
    rules = rules_for("vllm-omni", source.class_name)
    if not rules.keeps and not rules.fused:
        report.notes.append(f"vllm-omni rules are known for {QWEN_IMAGE} and {Z_IMAGE}; {source.class_name}'s "
                            "layers were not checked")
        return
    keeps = compile_patterns(rules.keeps)
    fused = fused_groups(rules, shapes)
    part_of = {p: f for f, parts in fused.items() for p in parts}
    for name in shapes:
        if any(p.matches(name) for p in keeps):
            if name in fp8:
                how = ("fails to load: Z-Image's load_weights has no parameter for its weight_scale (KeyError)"
                       if source.class_name == Z_IMAGE else
                       "cast: vllm-omni builds it in BF16 and copies the FP8 codes in as numbers, skipping "
                       "weight_scale without an error")
                report.problems.append(f"{name}: FP8 in the file, but vllm-omni never quantizes it; {how}")
            continue
        group = part_of.get(name)
        if group is None:
            skipped = name in ignored
        elif group in ignored:
            skipped = True
        else:
            flags = {p in ignored for p in fused[group]}
            if len(flags) > 1:
                if name == fused[group][0]:
                    report.problems.append(
                        f"{group}: ignored_layers lists some but not all of {', '.join(fused[group])}; vLLM refuses "
                        "a fused Linear whose parts differ in precision (fails to load)")
                continue
            skipped = flags.pop()
        if skipped and name in fp8:
            report.problems.append(f"{name}: in ignored_layers but FP8 in the file; loaded into a BF16 parameter "
                                   "without its scale (cast)")
        elif not skipped and name not in fp8:
            report.problems.append(f"{name}: high precision in the file but not in ignored_layers; vLLM makes it "
                                   "FP8 and copies the weight in without a scale (cast)")
    block = qc.get("weight_block_size")
    for group, parts in fused.items():
        kinds = {p in fp8 for p in parts}
        if len(kinds) > 1:
            report.problems.append(f"{group}: parts {', '.join(parts)} differ in precision in the file; vLLM refuses "
                                   "that fused Linear (fails to load)")
            continue
        if not kinds.pop():
            continue
        if block:
            bad = [p for p in parts[:-1] if shapes[p][0] % block[0]]
            if bad:
                report.problems.append(f"{group}: {bad[0]} has {shapes[bad[0]][0]} rows, not a multiple of the "
                                       f"block's {block[0]}; vLLM refuses the fused block-scaled Linear (fails)")
        elif not per_row:
            scales = [_scale_value(infos[f"{p}.weight_scale"]) for p in parts]
            if len(set(scales)) > 1:
                report.notes.append(f"{group}: parts have different scales; vLLM requantizes them to the largest, "
                                    "changing bits (convert with --target vllm-omni for one shared scale)")
    if rules.encoder:
        _check_encoder(source, rules.encoder, ignored, report)


def _check_encoder(source: Source, component: str, ignored: set[str], report: CheckReport) -> None:
    folder = source.root / component
    if source.kind != "pipeline" or not (folder / "config.json").is_file():
        report.problems.append(
            f"vllm-omni applies this FP8 config to the pipeline's {component} as well; no {component}/ here to "
            "check that its Linears are in ignored_layers (convert the pipeline folder with --target vllm-omni)")
        return
    try:
        linears = encoder_linears(folder)
    except OmniFp8Error as e:
        report.problems.append(f"{component}: could not list its Linears ({e})")
        return
    missing = [n for n in linears if n not in ignored]
    if missing:
        report.problems.append(
            f"{component}: {len(missing)} of its {len(linears)} Linears ({', '.join(missing[:2])}, ...) are not in "
            "ignored_layers; vllm-omni makes them FP8 and copies the BF16 weights in without scales (cast)")


def _scale_value(info: TensorInfo) -> float:
    with open(info.file, "rb") as f:
        return float(read_tensor(f, info).reshape(-1)[0])


# ----------------------------------------------------------------------------- single files


def _check_comfyui(tensors: Mapping[str, TensorInfo], path: Path, report: CheckReport) -> None:
    names = set(tensors)
    if "txt_norm.weight" in names and "img_in.weight" in names:
        report.notes.append("detected as Qwen-Image")
    elif "cap_embedder.1.weight" in names:
        width = tensors["cap_embedder.1.weight"].shape[0]
        if width == 3840:
            report.notes.append("detected as Z-Image (Lumina 2 with width 3840)")
        else:
            report.notes.append(f"detected as Lumina 2 of width {width}; ComfyUI v0.8.0 sets Z-Image's heads and "
                                "rope only for width 3840 (2304 is Lumina 2)")
        diffusers_names = [n for n in names if ".attention.to_q." in n or n.startswith("all_x_embedder.")]
        if diffusers_names:
            report.problems.append(
                f"{diffusers_names[0]}: a diffusers Z-Image name; ComfyUI does not rename them and needs "
                f"{', '.join(new.strip('.') for _, new in Z_IMAGE_RENAMES[:3])}, fused attention.qkv (fails to load)")
    else:
        report.problems.append("ComfyUI detects no known architecture from these keys (fails to load)")
    markers = {n.removesuffix(".comfy_quant") for n in names if n.endswith(".comfy_quant")}
    fp8 = {n.removesuffix(".weight") for n, t in tensors.items() if t.dtype == _FP8 and n.endswith(".weight")}
    for layer in sorted(fp8 - markers):
        report.problems.append(f"{layer}: FP8 weight without a comfy_quant marker; ComfyUI loads the codes as "
                               "numbers and ignores weight_scale (cast)")
    with open(path, "rb") as f:
        for layer in sorted(markers):
            try:
                conf = json.loads(read_tensor(f, tensors[f"{layer}.comfy_quant"]).numpy().tobytes())
            except (ValueError, RecursionError):
                report.problems.append(f"{layer}.comfy_quant: not JSON (fails to load)")
                continue
            fmt = conf.get("format") if isinstance(conf, dict) else None
            if fmt not in ("float8_e4m3fn", "float8_e5m2", "nvfp4"):
                report.problems.append(f"{layer}: comfy_quant format {fmt!r} is not one ComfyUI knows (fails to load)")
                continue
            weight, scale = tensors.get(f"{layer}.weight"), tensors.get(f"{layer}.weight_scale")
            if fmt == "float8_e4m3fn":
                if weight is None or weight.dtype != _FP8:
                    report.problems.append(f"{layer}: marked float8_e4m3fn but its weight is not (cast)")
                if scale is None or scale.dtype != "F32" or math.prod(scale.shape) != 1:
                    report.problems.append(f"{layer}: needs one float32 weight_scale per tensor (fails or casts)")
            if f"{layer}.weight_scale_inv" in names:
                report.problems.append(f"{layer}: block scales (weight_scale_inv) are not read by ComfyUI (cast)")
            if not conf.get("full_precision_matrix_mult") and f"{layer}.input_scale" not in names:
                report.notes.append(f"{layer}: no input_scale and no full_precision_matrix_mult; on FP8 GPUs ComfyUI "
                                    "quantizes its activations with scale 1.0")
    report.layers = {"fp8": len(markers), "fp8-unmarked": len(fp8 - markers)}


def _check_diffusers(tensors: Mapping[str, TensorInfo], path: Path, report: CheckReport) -> None:
    names = set(tensors)
    fp8 = {n.removesuffix(".weight") for n, t in tensors.items() if t.dtype == _FP8 and n.endswith(".weight")}
    scaled = {n.removesuffix(".weight_scale") for n in names if n.endswith(".weight_scale")}
    if not scaled:
        report.problems.append("no weight_scale tensors: BFLQuantizationConfig refuses the file (fails to load)")
    for layer in sorted(fp8 - scaled):
        report.problems.append(f"{layer}: FP8 weight without weight_scale; loaded as plain numbers (cast)")
    for layer in sorted(scaled):
        weight, scale = tensors.get(f"{layer}.weight"), tensors[f"{layer}.weight_scale"]
        if f"{layer}.weight_scale_2" in names:
            continue  # nvfp4, not ours to judge
        if weight is None or weight.dtype != _FP8 or len(weight.shape) != 2:
            report.problems.append(f"{layer}: weight_scale without an FP8 [N, K] weight (fails to load)")
        elif scale.dtype != "F32" or tuple(scale.shape) != (weight.shape[0],):
            report.problems.append(f"{layer}: weight_scale is {scale.dtype}{list(scale.shape)}; fp8r needs float32 "
                                   f"[{weight.shape[0]}], one per row (fails to load)")
    for layer in sorted(n.removesuffix(".weight_scale_inv") for n in names if n.endswith(".weight_scale_inv")):
        report.problems.append(f"{layer}: block scales (weight_scale_inv) are not read by diffusers (cast)")
    report.layers = {"fp8": len(fp8 & scaled)}
    report.notes.append("load with from_single_file(path, config=<the model's diffusers config>, "
                        "quantization_config=BFLQuantizationConfig()); accelerate must be installed")
