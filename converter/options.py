"""The one definition of what an FP8 conversion may be asked to do.

``Fp8Config`` is shared by ``omni-convert``, ``convert()`` and the runtime loader, so an option
means the same thing and fails the same way wherever it is given. Field names follow the
vLLM / vllm-omni ``quantization_config`` keys, so a dict written for those works here.

    >>> Fp8Config(ignored_layers=["img_mlp"], weight_block_size=[128, 128])
    Fp8Config(method='fp8', ignored_layers=('img_mlp',), activation_scheme='dynamic', weight_block_size=(128, 128), preset=None, weight_strategy='block')
    >>> Fp8Config.from_dict({"method": "fp8", "ignored_layers": "img_mlp,txt_mlp"}).ignored_layers
    ('img_mlp', 'txt_mlp')
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "Fp8Config", "QuantMethod", "split_patterns", "parse_block_size", "parse_size", "parse_dtype", "parse_path",
    "parse_target", "refuse_unknown_keys", "WEIGHT_STRATEGIES", "DEFAULT_MAX_ERROR", "TARGETS", "DEFAULT_TARGET",
    "SINGLE_FILE_TARGETS",
]

# ``suggest``'s default bound on the mean relative output error: between the lab DiT's error with
# every Linear in FP8 (0.049; its images pass the quality gate) and with the gate's failing
# controls (0.088 for 4-bit weights, 0.096 for E5M2 W8A8), their geometric mean
# (bench/RESULTS.md, "Quality lab").
DEFAULT_MAX_ERROR = 0.065

# Which engine a conversion is laid out for. ``omni-fp8`` is this project's own folder (vLLM's fp8
# convention, read by ``load_transformer``); the others follow what those engines' loaders read.
TARGETS = ("omni-fp8", "vllm-omni", "comfyui", "diffusers")
DEFAULT_TARGET = "omni-fp8"
# Targets whose output is one .safetensors file rather than a folder.
SINGLE_FILE_TARGETS = ("comfyui", "diffusers")
_NO_BLOCK_SCALES = {
    "comfyui": "ComfyUI's FP8 Linears hold one scalar weight_scale per weight (comfy/ops.py, MixedPrecisionOps), "
               "so a block grid has nowhere to go",
    "diffusers": "diffusers' fp8r layout holds one scale per output row (quantizers/bfl), which a block grid "
                 "cannot be expressed in without requantizing",
}

# The alignment FP8 GEMMs need on both weight dims (and the unit block sizes are counted in).
ALIGNMENT = 16
# How eligible weights are scaled: compressed-tensors' names for the same three layouts.
WEIGHT_STRATEGIES = ("tensor", "channel", "block")
_NO_CHANNEL_SCALES = {
    "vllm-omni": "vllm-omni's diffusion loader reads vLLM's fp8 method, whose Linears hold one weight_scale per "
                 "weight or a block grid, never one per row",
    "comfyui": "ComfyUI's FP8 Linears hold one scalar weight_scale per weight (comfy/ops.py, MixedPrecisionOps)",
}
_ACTIVATION_SCHEMES = ("dynamic", "static")
_METHOD_KEYS = ("method", "quant_method")
# Keys a checkpoint's quantization_config carries about the file rather than about the options:
# accepted when such a dict is read back (diffusers does, on from_pretrained), and not kept.
_CHECKPOINT_KEYS = ("is_checkpoint_fp8_serialized",)


class QuantMethod(str, enum.Enum):
    """``quantization_config["quant_method"]`` of our checkpoints; a str, so it equals ``"fp8"``.

    diffusers reads ``config.quant_method.value``, so the attribute must be an enum member.
    """

    FP8 = "fp8"


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """How to quantize a diffusion transformer's Linear weights to FP8 (E4M3FN).

    Args:
        method: Always ``"fp8"``; present so dicts written for vllm-omni can be passed unchanged.
        ignored_layers: Patterns of Linear layers to keep in high precision. A plain pattern matches
            whole dot-separated name components anywhere (``img_mlp`` matches
            ``transformer_blocks.3.img_mlp.net.0.proj`` but not ``img_mlp2``); ``re:`` starts a
            Python regex searched in the module name; vllm-omni's fused names (``to_qkv``,
            ``add_kv_proj``, ``w13``) stand for the layers they fuse. A pattern that matches no
            Linear layer is an error, so a typo never silently quantizes what it meant to keep.
        activation_scheme: ``"dynamic"`` (per-token scales computed at run time, no calibration)
            or ``"static"`` (one calibrated ``input_scale`` per Linear, from ``calibration``).
            A static config without a calibration describes a checkpoint that already has its
            scales; quantizing with it (convert, load-time, ``quantize_``) needs one.
        weight_block_size: ``None`` for one scale per weight, or ``(bn, bk)`` for one scale per
            ``bn x bk`` block (stored as ``weight_scale_inv``), which keeps outlier rows and
            columns from flattening the rest of the matrix.
        preset: A named recipe from ``manifests/`` (``"qwen-image"``, ``"z-image-turbo"``) whose
            ``ignored_layers`` are added to these. ``None`` picks the preset registered for the
            model's class, ``"none"`` uses none.
        weight_strategy: ``"tensor"`` (one scale per weight), ``"channel"`` (one scale per output
            row, stored as ``weight_scale`` ``[N, 1]`` as compressed-tensors and ModelOpt do: an
            outlier row no longer flattens the others, and a row-wise FP8 GEMM applies the scales
            in its epilogue at no cost) or ``"block"`` (implied by ``weight_block_size``). ``None``
            means ``"block"`` when a block size is given, else ``"tensor"``.
        calibration: For ``"static"``: a ``Calibration`` (``omni_fp8.calibrate``) or the path of a
            calibration file (``omni-convert calibrate``), read and checked here.
        static_ignored_layers: For ``"static"``: patterns (as ``ignored_layers``) of FP8 Linears
            whose activations stay dynamic.
    """

    method: str = "fp8"
    ignored_layers: tuple[str, ...] = ()
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] | None = None
    preset: str | None = None
    weight_strategy: str | None = None
    calibration: Any = dataclasses.field(default=None, repr=False)
    static_ignored_layers: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.method != "fp8":
            raise ConfigError(
                f"quantization method {self.method!r} is not supported; omni-fp8 only does 'fp8'."
            )
        object.__setattr__(self, "ignored_layers", split_patterns(self.ignored_layers))
        if self.activation_scheme not in _ACTIVATION_SCHEMES:
            raise ConfigError(
                f"unknown activation_scheme {self.activation_scheme!r}; use 'dynamic' (or 'static')."
            )
        object.__setattr__(self, "static_ignored_layers", split_patterns(self.static_ignored_layers))
        if self.activation_scheme == "dynamic" and (self.calibration is not None or self.static_ignored_layers):
            given = "calibration" if self.calibration is not None else "static_ignored_layers"
            raise ConfigError(
                f"{given} is given but activation_scheme is 'dynamic'; add activation_scheme='static' "
                "(--activation-scheme static) or drop it."
            )
        if self.calibration is not None:
            from .calibration_file import Calibration

            object.__setattr__(self, "calibration", Calibration.coerce(self.calibration))
        if self.weight_block_size is not None:
            object.__setattr__(self, "weight_block_size", parse_block_size(self.weight_block_size))
        if self.preset is not None and (not isinstance(self.preset, str) or not self.preset):
            raise ConfigError(f"preset must be a preset name or 'none', got {self.preset!r}.")
        object.__setattr__(self, "weight_strategy", self._strategy())

    def _strategy(self) -> str:
        strategy, block = self.weight_strategy, self.weight_block_size
        if strategy is not None and strategy not in WEIGHT_STRATEGIES:
            raise ConfigError(
                f"unknown weight_strategy {strategy!r}; use 'tensor' (the default), 'channel' (one scale per output "
                "row) or 'block' (with weight_block_size)."
            )
        if block is not None and strategy not in (None, "block"):
            raise ConfigError(
                f"weight_strategy {strategy!r} and weight_block_size {list(block)} contradict each other; give "
                "weight_block_size for block scales, or drop it."
            )
        if block is None and strategy == "block":
            raise ConfigError("weight_strategy 'block' needs weight_block_size (e.g. 128,128).")
        return "block" if block is not None else strategy or "tensor"

    @property
    def quant_method(self) -> QuantMethod:
        """vLLM's and diffusers' name for ``method``."""
        return QuantMethod.FP8

    @property
    def scheme(self) -> str:
        """The manifest's name for how eligible weights are stored."""
        return {"tensor": "fp8_tensor", "channel": "fp8_channel", "block": "fp8_block"}[self.weight_strategy]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Fp8Config:
        """Build from a ``quantization_config``-style dict, refusing keys we do not know."""
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"quantization_config must be a dict or Fp8Config, got {type(values).__name__}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(repr(k) for k in values if k not in known and k not in (*_METHOD_KEYS, *_CHECKPOINT_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown quantization_config key(s) {', '.join(unknown)}; "
                f"supported: {', '.join(sorted(known))}."
            )
        kwargs = {k: v for k, v in values.items() if k in known}
        if "quant_method" in values:
            if "method" in values and values["method"] != values["quant_method"]:
                raise ConfigError(
                    f"quantization_config gives method={values['method']!r} and "
                    f"quant_method={values['quant_method']!r}; give one."
                )
            kwargs["method"] = values["quant_method"]
        return cls(**kwargs)

    @classmethod
    def coerce(cls, value: Fp8Config | Mapping[str, Any] | None) -> Fp8Config:
        """Accept what public entry points accept: an ``Fp8Config``, a dict, or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return cls.from_dict(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "ignored_layers": list(self.ignored_layers),
            "activation_scheme": self.activation_scheme,
            "weight_block_size": list(self.weight_block_size) if self.weight_block_size else None,
            "preset": self.preset,
            "weight_strategy": self.weight_strategy,
            **({"calibration": self.calibration.provenance() if self.calibration is not None else None,
                "static_ignored_layers": list(self.static_ignored_layers)}
               if self.activation_scheme == "static" else {}),
        }


def split_patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise ``ignored_layers``: a list, a comma-separated string, or both mixed.

    Commas separate patterns, except inside a regex: a ``re:`` entry runs to the end of its
    string, so ``"img_mlp,re:a{1,2}"`` is ``img_mlp`` and ``re:a{1,2}`` (give several regexes as
    separate entries).
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        items = list(value)
    else:
        raise ConfigError(
            f"ignored_layers must be a list of layer-name patterns or a comma-separated string, "
            f"got {type(value).__name__} {value!r}."
        )
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"ignored_layers entries must be strings, got {type(item).__name__} {item!r}.")
        for part in _split_commas(item):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return tuple(out)


def _split_commas(item: str) -> list[str]:
    parts: list[str] = []
    rest = item
    while rest:
        if rest.lstrip().startswith("re:"):
            parts.append(rest)  # a regex may hold commas: it takes the rest of the string
            break
        head, comma, rest = rest.partition(",")
        parts.append(head)
        if not comma:
            break
    return parts


def parse_block_size(value: Any) -> tuple[int, int]:
    """``"128,128"``, ``[128, 128]`` or ``(128, 128)`` -> ``(128, 128)``; anything else is refused."""
    if isinstance(value, str):
        parts: Any = re.split(r"[,x]", value)
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        parts = list(value)
    else:
        parts = ()
    dims = tuple(_whole_number(v) for v in parts)
    if len(dims) != 2 or any(d is None or d <= 0 or d % ALIGNMENT or d > 65536 for d in dims):
        raise ConfigError(
            f"bad weight_block_size {value!r}: give two positive multiples of {ALIGNMENT} "
            "(rows, columns), e.g. 128,128."
        )
    return dims  # type: ignore[return-value]


def _whole_number(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,6}\s*", value):  # ASCII digits only: not '²'
        return int(value)
    return None


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as diffusers uses; ``GiB`` for binary)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ConfigError(f"bad size {value!r}: use a number of bytes or e.g. 500MB, 5GB, 2GiB.")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ConfigError(f"bad size {value!r}: that is less than one byte; use e.g. 500MB, 5GB, 2GiB.")
    return size


# Names a user may give for the dtype of the tensors that stay high precision.
_DTYPE_NAMES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def parse_dtype(value: Any, *, what: str = "dtype") -> Any:
    """``None``/``"keep"`` -> ``None``; ``torch.bfloat16``/``"bf16"``/``"bfloat16"`` -> ``torch.bfloat16``.

    Only BF16, FP16 and FP32 are compute dtypes here: an integer or float8 dtype would silently
    cast biases and norms to garbage (a bias of 0.3 becomes 0 in int8).
    """
    import torch

    if value is None or value == "keep":
        return None
    if isinstance(value, str):
        name = _DTYPE_NAMES.get(value.strip().lower().removeprefix("torch."))
        if name is not None:
            return getattr(torch, name)
    elif isinstance(value, torch.dtype) and value in (torch.bfloat16, torch.float16, torch.float32):
        return value
    raise ConfigError(
        f"{what} {value!r} is not a compute dtype; use torch.bfloat16, torch.float16 or torch.float32 "
        "('bf16', 'fp16', 'fp32')."
    )


def parse_path(value: Any, *, what: str) -> Path:
    """A path argument (``str`` or ``os.PathLike``), ``~`` expanded; anything else is one clear error."""
    if isinstance(value, (str, os.PathLike)) and str(value) and "\0" not in str(value):
        return Path(value).expanduser()
    raise ConfigError(f"{what} must be a path (a str or os.PathLike), got {type(value).__name__} {value!r}.")


def refuse_unknown_keys(values: Mapping[str, Any], known: Iterable[str], *, what: str) -> None:
    """One line naming every key of ``values`` not in ``known``, and what is accepted instead."""
    known = sorted(known)
    unknown = sorted(repr(k) for k in values if k not in known)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {', '.join(unknown)}; use {', '.join(known)}.")


def parse_target(value: Any, *, weight_block_size: tuple[int, int] | None = None,
                 weight_strategy: str | None = None) -> str:
    """A target name, checked against the options it must work with (block or per-row scales)."""
    if value is None:
        return DEFAULT_TARGET
    if not isinstance(value, str) or value not in TARGETS:
        raise ConfigError(f"unknown target {value!r}; use one of {', '.join(TARGETS)}.")
    if weight_block_size is not None and value in _NO_BLOCK_SCALES:
        raise ConfigError(
            f"--target {value} takes per-tensor scales only: {_NO_BLOCK_SCALES[value]}; drop --weight-block-size."
        )
    if weight_strategy == "channel" and value in _NO_CHANNEL_SCALES:
        raise ConfigError(
            f"--target {value} cannot take per-channel scales: {_NO_CHANNEL_SCALES[value]}; drop --weight-strategy "
            "channel (per-tensor is that engine's layout)."
        )
    return value
