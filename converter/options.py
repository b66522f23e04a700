"""The one definition of what an FP8 conversion may be asked to do.

``Fp8Config`` is shared by ``omni-convert``, ``convert()`` and the runtime loader, so an option
means the same thing and fails the same way wherever it is given. Field names follow the
vLLM / vllm-omni ``quantization_config`` keys, so a dict written for those works here.

    >>> Fp8Config(ignored_layers=["img_mlp"], weight_block_size=[128, 128])
    Fp8Config(method='fp8', ignored_layers=('img_mlp',), activation_scheme='dynamic', weight_block_size=(128, 128), preset=None)
    >>> Fp8Config.from_dict({"method": "fp8", "ignored_layers": "img_mlp,txt_mlp"}).ignored_layers
    ('img_mlp', 'txt_mlp')
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["Fp8Config", "split_patterns", "parse_block_size", "parse_size", "DEFAULT_MAX_ERROR"]

# ``suggest``'s default bound on the mean relative output error: between the lab DiT's error with
# every Linear in FP8 (0.049; its images pass the quality gate) and with the gate's failing
# controls (0.088 for 4-bit weights, 0.096 for E5M2 W8A8), their geometric mean
# (bench/RESULTS.md, "Quality lab").
DEFAULT_MAX_ERROR = 0.065

# The alignment FP8 GEMMs need on both weight dims (and the unit block sizes are counted in).
ALIGNMENT = 16
_ACTIVATION_SCHEMES = ("dynamic", "static")
_METHOD_KEYS = ("method", "quant_method")


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
        activation_scheme: ``"dynamic"`` (per-token scales computed at run time, no calibration).
            ``"static"`` needs calibration data, which is not supported yet and is refused.
        weight_block_size: ``None`` for one scale per weight, or ``(bn, bk)`` for one scale per
            ``bn x bk`` block (stored as ``weight_scale_inv``), which keeps outlier rows and
            columns from flattening the rest of the matrix.
        preset: A named recipe from ``manifests/`` (``"qwen-image"``, ``"z-image-turbo"``) whose
            ``ignored_layers`` are added to these. ``None`` picks the preset registered for the
            model's class, ``"none"`` uses none.
    """

    method: str = "fp8"
    ignored_layers: tuple[str, ...] = ()
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] | None = None
    preset: str | None = None

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
        if self.activation_scheme == "static":
            raise ConfigError(
                "activation_scheme 'static' needs calibration data, which omni-fp8 does not support "
                "yet; use 'dynamic' (no calibration, the default)."
            )
        if self.weight_block_size is not None:
            object.__setattr__(self, "weight_block_size", parse_block_size(self.weight_block_size))
        if self.preset is not None and (not isinstance(self.preset, str) or not self.preset):
            raise ConfigError(f"preset must be a preset name or 'none', got {self.preset!r}.")

    @property
    def scheme(self) -> str:
        """The manifest's name for how eligible weights are stored."""
        return "fp8_tensor" if self.weight_block_size is None else "fp8_block"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Fp8Config:
        """Build from a ``quantization_config``-style dict, refusing keys we do not know."""
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"quantization_config must be a dict or Fp8Config, got {type(values).__name__}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known and k not in _METHOD_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown quantization_config key(s) {', '.join(map(repr, unknown))}; "
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

    def with_ignored(self, patterns: Iterable[str]) -> Fp8Config:
        """A copy with ``patterns`` appended (a preset's, say), keeping order and dropping repeats."""
        merged = tuple(dict.fromkeys((*self.ignored_layers, *patterns)))
        return dataclasses.replace(self, ignored_layers=merged)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "ignored_layers": list(self.ignored_layers),
            "activation_scheme": self.activation_scheme,
            "weight_block_size": list(self.weight_block_size) if self.weight_block_size else None,
            "preset": self.preset,
        }


def split_patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise ``ignored_layers``: a list, a comma-separated string, or both mixed.

    A ``re:`` pattern is never split, since a regex may contain commas (``re:a{1,2}``).
    """
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"ignored_layers entries must be strings, got {item!r}.")
        parts = [item] if item.strip().startswith("re:") else item.split(",")
        for part in parts:
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return tuple(out)


def parse_block_size(value: Any) -> tuple[int, int]:
    """``"128,128"``, ``[128, 128]`` or ``(128, 128)`` -> ``(128, 128)``; anything else is refused."""
    parts = re.split(r"[,x]", value) if isinstance(value, str) else value
    try:
        dims = tuple(_whole_number(v) for v in parts)
    except TypeError:
        dims = ()
    if len(dims) != 2 or any(d is None or d <= 0 or d % ALIGNMENT or d > 65536 for d in dims):
        raise ConfigError(
            f"bad weight_block_size {value!r}: give two positive multiples of {ALIGNMENT} "
            "(rows, columns), e.g. 128,128."
        )
    return dims  # type: ignore[return-value]


def _whole_number(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
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
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"bad size {value!r}: use a number of bytes or e.g. 500MB, 5GB, 2GiB.")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
