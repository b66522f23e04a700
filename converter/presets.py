"""Named recipes shipped in ``manifests/``: which layers of a known model stay in high precision.

A preset is a small JSON file (``format_version``, ``name``, ``class_names``, ``ignored_layers``,
``why``). The preset registered for a model's class is picked automatically; ``preset="none"``
turns that off and an explicit name overrides it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .errors import ConfigError

__all__ = ["Preset", "available_presets", "load_preset", "resolve_preset"]

PRESET_FORMAT_VERSION = 1
NO_PRESET = "none"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    class_names: tuple[str, ...]
    ignored_layers: tuple[str, ...]
    models: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def _all_presets() -> dict[str, Preset]:
    presets = {}
    for entry in sorted(resources.files("omni_fp8.manifests").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text(encoding="utf-8"))
        if data.get("format_version") != PRESET_FORMAT_VERSION:
            raise ConfigError(f"preset {entry.name}: unsupported format_version {data.get('format_version')!r}.")
        presets[data["name"]] = Preset(
            name=data["name"],
            description=data["description"],
            class_names=tuple(data["class_names"]),
            ignored_layers=tuple(data["ignored_layers"]),
            models=tuple(data.get("models", ())),
        )
    return presets


def available_presets() -> list[str]:
    return list(_all_presets())


def load_preset(name: str) -> Preset:
    presets = _all_presets()
    if name not in presets:
        raise ConfigError(
            f"unknown preset {name!r}; available: {', '.join(presets)} (or 'none' for no preset)."
        )
    return presets[name]


def resolve_preset(name: str | None, class_name: str) -> Preset | None:
    """The preset to apply: ``name`` if given, else the one registered for ``class_name``."""
    if name == NO_PRESET:
        return None
    if name is not None:
        return load_preset(name)
    for preset in _all_presets().values():
        if class_name in preset.class_names:
            return preset
    return None
