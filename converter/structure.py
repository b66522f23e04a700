"""A model's structure (every tensor's shape, every Linear) and the cache that spares importing diffusers.

The plan needs the model only as a structure: the state dict's names and shapes, the ``nn.Linear``
modules, and the Linears whose weight dtype the forward reads. Building it on the meta device takes
milliseconds; importing diffusers to build it takes seconds, whichever module the class is imported
from (``diffusers.utils`` imports ``torch._dynamo``, the model base classes import transformers,
peft and accelerate when installed: 3-4 s on 2 CPU cores, where ``import torch`` takes 1.4 s).
That is most of what converting, inspecting or checking a small model costs.

The structure is a function of the class, the config and the code that builds it, so the first
build of a config is written to the cache and later runs read it instead of importing diffusers.
An entry is used only when its inputs are exactly these: the same class name, the same config,
the same diffusers and torch (version and install location), and every source file of the
model's module classes unchanged (size and modification time, as Python checks its bytecode
caches), so an upgraded, switched or edited diffusers builds again. Anything wrong with an entry (unreadable, malformed, stale) is a miss, and
a cache that cannot be written is skipped: it never changes a result, only how soon it comes.

``OMNI_FP8_CACHE`` names the folder (default ``$XDG_CACHE_HOME/omni-fp8``, else
``~/.cache/omni-fp8``); ``OMNI_FP8_CACHE=off`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["ModelStructure", "cache_folder", "load_cached", "store"]

FORMAT = 1
_OFF = {"off", "0", "false", "no", "none"}
_memo: dict[str, ModelStructure] = {}  # this process: a convert checks its own output with the same structure


@dataclass(frozen=True)
class ModelStructure:
    """What the plan reads from a model: tensor shapes, Linear shapes, dtype-read Linears, in model order."""

    class_name: str
    tensors: Mapping[str, tuple[int, ...]]  # state-dict name -> shape
    linears: Mapping[str, tuple[int, int]]  # module name -> (out_features, in_features)
    dtype_read: frozenset[str]

    def to_json(self) -> dict[str, Any]:
        return {"class_name": self.class_name, "tensors": {n: list(s) for n, s in self.tensors.items()},
                "linears": {n: list(s) for n, s in self.linears.items()}, "dtype_read": sorted(self.dtype_read)}

    @classmethod
    def from_json(cls, data: Any) -> ModelStructure:
        """Raises ``ValueError`` for anything but a well-formed structure."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        tensors = {n: _shape(s) for n, s in _mapping(data.get("tensors")).items()}
        linears = {n: _shape(s) for n, s in _mapping(data.get("linears")).items()}
        dtype_read = data.get("dtype_read")
        class_name = data.get("class_name")
        if any(len(s) != 2 for s in linears.values()) or not isinstance(class_name, str):
            raise ValueError("malformed linears or class name")
        if not isinstance(dtype_read, list) or not all(isinstance(n, str) and n in linears for n in dtype_read):
            raise ValueError("malformed dtype_read")
        return cls(class_name, tensors, linears, frozenset(dtype_read))  # type: ignore[arg-type]


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise ValueError(f"bad shape {value!r:.40}")
    return tuple(value)


def cache_folder() -> Path | None:
    """Where structures are kept, or ``None`` when ``OMNI_FP8_CACHE=off``."""
    chosen = os.environ.get("OMNI_FP8_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in _OFF or not chosen.strip() else Path(chosen) / "structures"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "omni-fp8" / "structures"


def _inputs(class_name: str, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The entry's key and everything it was built from; ``None`` when they cannot be pinned down."""
    try:
        versions = {name: metadata.version(name) for name in ("diffusers", "torch")}
        where = {name: _location(name) for name in ("diffusers", "torch")}  # which install, when several
        inputs = {"format": FORMAT, "class_name": class_name, "versions": versions, "packages": where,
                  "config": dict(config)}
        text = json.dumps(inputs, sort_keys=True, allow_nan=False)
    except (metadata.PackageNotFoundError, TypeError, ValueError):
        return None  # a source-tree diffusers without metadata, or a config that is not plain JSON
    return hashlib.sha256(text.encode()).hexdigest()[:32], json.loads(text)


def _location(package: str) -> str:
    """The file a package would be imported from, without importing it (``sys.modules`` first)."""
    module = sys.modules.get(package)
    spec = getattr(module, "__spec__", None) if module is not None else importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"{package} cannot be located")
    return spec.origin


def load_cached(class_name: str, config: Mapping[str, Any]) -> ModelStructure | None:
    """The structure built before from exactly these inputs, or ``None``."""
    inputs = _inputs(class_name, config)
    if inputs is None:
        return None
    key, expected = inputs
    if key in _memo:
        return _memo[key]
    folder = cache_folder()
    if folder is None:
        return None
    try:
        entry = json.loads((folder / f"{key}.json").read_text())
        if entry.get("inputs") != expected or not _unchanged(entry["files"]):
            return None
        structure = ModelStructure.from_json(entry["structure"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    _memo[key] = structure
    return structure


def _unchanged(files: Any) -> bool:
    if not isinstance(files, dict) or not files:
        return False
    for path, stamp in files.items():
        try:
            st = os.stat(path)
        except OSError:
            return False
        if stamp != [st.st_mtime_ns, st.st_size]:
            return False
    return True


def store(class_name: str, config: Mapping[str, Any], structure: ModelStructure, classes: Iterable[type]) -> None:
    """Remember ``structure``, built from ``config`` by ``classes`` (every module class of the model)."""
    inputs = _inputs(class_name, config)
    if inputs is None:
        return
    key, recorded = inputs
    _memo[key] = structure
    folder = cache_folder()
    files = _source_files(classes)
    if folder is None or files is None:
        return
    entry = {"inputs": recorded, "files": files, "structure": structure.to_json()}
    tmp = folder / f".{key}.{uuid.uuid4().hex}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entry) + "\n")
        os.replace(tmp, folder / f"{key}.json")
    except OSError:  # a read-only or full cache: the next run builds again
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _source_files(classes: Iterable[type]) -> dict[str, list[int]] | None:
    """Size and mtime of every file defining one of ``classes`` or a base class: what the build ran."""
    files: dict[str, list[int]] = {}
    for cls in classes:
        for base in cls.__mro__:
            module = sys.modules.get(base.__module__)
            path = getattr(module, "__file__", None)
            if path is None or path in files:
                continue
            try:
                st = os.stat(path)
            except OSError:
                return None
            files[path] = [st.st_mtime_ns, st.st_size]
    return files
