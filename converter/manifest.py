"""``fp8_manifest.json``: what a converted folder holds, how it was made, and how to check it.

The manifest sits at the output root and is written last: its presence means the conversion
finished. It records the tool and format versions, the source, the resolved options, every
output tensor (shard, source dtype, shape, scheme, and for kept tensors the reason), the size
and SHA-256 of every output file, and the byte totals. ``verify`` re-hashes the files against it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpointError, SourceNotFoundError
from .options import parse_path
from .plan import KEPT, Plan
from .safetensors_format import DTYPES, dtype_name
from .source import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, read_json
from .writer import FileRecord, hash_file

__all__ = [
    "MANIFEST_FORMAT", "MANIFEST_VERSION", "build_manifest", "saved_manifest", "read_manifest", "verify", "VerifyReport",
    "build_file_record", "read_file_record", "FILE_RECORD_KEY",
]

MANIFEST_FORMAT = "omni-fp8-manifest"
MANIFEST_VERSION = 1


def tool_version() -> str:
    try:
        return metadata.version("omni-fp8")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_manifest(
    plan: Plan,
    *,
    component: str,
    weight_map: Mapping[str, str],
    files: Mapping[str, FileRecord],
    carried: Mapping[str, str],
    seconds: float,
) -> dict[str, Any]:
    """Assemble the manifest of a finished conversion.

    Args:
        component: The transformer folder relative to the output root (``""`` or ``"transformer"``).
        weight_map: Output tensor name -> shard file name (inside ``component``).
        files: Every output file but the manifest, relative to the root, with size and SHA-256.
        carried: Files carried over from the source, and whether they were linked or copied.
    """
    prefix = f"{component}/" if component else ""
    tensors: list[dict[str, Any]] = []
    for t in plan.tensors:
        outputs = t.outputs
        entry: dict[str, Any] = {
            "name": t.name,
            "shard": prefix + weight_map[t.name],
            "source_dtype": t.source.dtype,
            "dtype": dtype_name(outputs[0].dtype),
            "shape": list(t.source.shape),
            "scheme": t.scheme,
        }
        if t.scheme == KEPT:
            entry["reason"] = t.reason
        else:
            entry["scale"] = t.scale_name
            if t.input_scale_name is not None:
                entry["input_scale"] = t.input_scale_name
        tensors.append(entry)
        for scale in outputs[1:]:
            tensors.append(
                {
                    "name": scale.name,
                    "shard": prefix + weight_map[scale.name],
                    "source_dtype": None,
                    "dtype": dtype_name(scale.dtype),
                    "shape": list(scale.shape),
                    "scheme": "scale",
                    "scale_of": t.name,
                }
            )
    totals = {
        "source_bytes": plan.source_bytes,
        "output_bytes": plan.output_bytes,
        "tensors": len(tensors),
        "linears": len(plan.linears),
        "linears_quantized": sum(d.quantized for d in plan.linears.values()),
        "seconds": round(seconds, 3),
    }
    return _assemble(_origin(plan), component, plan.options(), plan.quantization_config(), totals, carried, files,
                     tensors)


def _assemble(
    source: Mapping[str, Any],
    component: str,
    options: Mapping[str, Any],
    quantization_config: Mapping[str, Any],
    totals: Mapping[str, Any],
    carried: Mapping[str, str],
    files: Mapping[str, FileRecord],
    tensors: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        **_header(source, MANIFEST_FORMAT),
        "component": component,
        "options": dict(options),
        "quantization_config": dict(quantization_config),
        "totals": dict(totals),
        "carried_over": dict(sorted(carried.items())),
        "files": {name: rec.to_dict() for name, rec in sorted(files.items())},
        "tensors": tensors,
    }


def saved_manifest(
    folder: Path,
    *,
    class_name: str,
    options: Mapping[str, Any],
    quantization_config: Mapping[str, Any],
    reasons: Mapping[str, str],
    source_dtypes: Mapping[str, str],
    origin: Mapping[str, Any],
    extra_files: Iterable[str] = (),
) -> dict[str, Any]:
    """The manifest of a folder an FP8 model in memory was saved into (``save_pretrained``).

    Read back from the files just written (their headers and hashes), so it describes exactly
    what is on disk. ``reasons`` gives why each kept Linear stayed high precision (module name ->
    reason), ``source_dtypes`` the dtype each FP8 weight was quantized from, where known.
    """
    from .source import open_source

    source = open_source(folder, allow_quantized=True)
    weight_map = {t.name: t.file.name for t in source.tensors}
    infos = {t.name: t for t in source.tensors}
    tensors: list[dict[str, Any]] = []
    source_bytes = linears = quantized = 0
    for info in source.tensors:
        entry: dict[str, Any] = {"name": info.name, "shard": weight_map[info.name], "dtype": info.dtype,
                                 "shape": list(info.shape)}
        base = info.name.rsplit(".", 1)[0]
        scale = next((f"{base}.{n}" for n in ("weight_scale", "weight_scale_inv") if f"{base}.{n}" in infos), None)
        if info.name.endswith((".weight_scale", ".weight_scale_inv", ".input_scale")):
            entry.update(source_dtype=None, scheme="scale", scale_of=f"{base}.weight")
        elif info.dtype == "F8_E4M3" and info.name.endswith(".weight") and scale is not None:
            known = source_dtypes.get(info.name)
            per_row = scale.endswith("weight_scale") and infos[scale].shape[:1] == info.shape[:1] and info.shape[0] > 1
            scheme = "fp8_block" if scale.endswith("_inv") else "fp8_channel" if per_row else "fp8_tensor"
            entry.update(source_dtype=known, scale=scale, scheme=scheme)
            if f"{base}.input_scale" in infos:
                entry["input_scale"] = f"{base}.input_scale"
            source_bytes += info.nbytes * (DTYPES[known].itemsize if known else 1)
            linears += 1
            quantized += 1
        else:
            reason = reasons.get(base) if info.name.endswith(".weight") else None
            entry.update(source_dtype=info.dtype, scheme=KEPT, reason=reason or "not-linear")
            source_bytes += info.nbytes
            linears += reason is not None
        tensors.append(entry)
    names = sorted({*weight_map.values(), *([INDEX_NAME] if (folder / INDEX_NAME).is_file() else []), CONFIG_NAME,
                    *extra_files})
    files = {name: hash_file(folder / name) for name in names}
    output_bytes = sum(t.nbytes for t in source.tensors)
    totals = {"source_bytes": source_bytes, "output_bytes": output_bytes, "tensors": len(tensors),
              "linears": linears, "linears_quantized": quantized, "seconds": 0.0}
    origin = {**origin, "kind": "transformer", "component": "", "class_name": class_name}
    return _assemble(origin, "", options, quantization_config, totals, {}, files, tensors)


def _header(origin: Mapping[str, Any], format_name: str) -> dict[str, Any]:
    """What every record omni-fp8 writes starts with: format, tool, time, and the source."""
    return {
        "format": format_name,
        "format_version": MANIFEST_VERSION,
        "tool": {"name": "omni-fp8", "version": tool_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": dict(origin),
    }


def _origin(plan: Plan) -> dict[str, Any]:
    source = plan.source
    return {**source.origin, "kind": source.kind, "component": source.subfolder, "class_name": source.class_name}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load and check a folder's manifest; raise a one-line error if it is missing, foreign or malformed.

    Every field that ``verify``, ``inspect``, the loader and ``--force`` rely on is checked here,
    so a damaged manifest is one clear error rather than a crash somewhere downstream.
    """
    path = parse_path(folder, what="the folder") / MANIFEST_NAME
    if not path.is_file():
        raise SourceNotFoundError(
            f"{path}: no manifest; this is not a finished omni-fp8 output (an interrupted run leaves "
            "none). Convert again.",
            path=path,
        )
    manifest = read_json(path, "the manifest")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CorruptCheckpointError(f"{path}: not an omni-fp8 manifest.", path=path)
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise CorruptCheckpointError(
            f"{path}: manifest format_version {manifest.get('format_version')!r} is not "
            f"{MANIFEST_VERSION}; upgrade omni-fp8 to read it.",
            path=path,
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise CorruptCheckpointError(
            f"{path}: damaged manifest: {problem}; convert again (or restore the file).", path=path
        )
    return manifest


_SCHEMES = {"fp8_tensor", "fp8_channel", "fp8_block", "kept", "scale"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _manifest_problem(m: Mapping[str, Any]) -> str | None:
    """What is wrong with a manifest's structure, or ``None``."""
    for key, kind in (("tool", dict), ("created", str), ("source", dict), ("component", str), ("options", dict),
                      ("quantization_config", dict), ("totals", dict), ("carried_over", dict), ("files", dict),
                      ("tensors", list)):
        if not isinstance(m.get(key), kind):
            return f"{key!r} is missing or not a {'JSON object' if kind is dict else kind.__name__}"
    for key in ("source_bytes", "output_bytes", "tensors", "linears", "linears_quantized"):
        if not _is_count(m["totals"].get(key)):
            return f"totals.{key} is missing or not a count"
    for key in ("kind", "class_name"):
        if not isinstance(m["source"].get(key), str):
            return f"source.{key} is missing"
    if not isinstance(m["tool"].get("version"), str):
        return "tool.version is missing"
    card = m.get("model_card")
    if card is not None and not (isinstance(card, dict) and card.get("path") in m["files"]
                                 and card.get("written_by") in ("omni-fp8", "user")):
        return "model_card does not name a listed file and who wrote it"
    options = m["options"]
    if not isinstance(options.get("ignored_layers"), list) or not isinstance(options.get("activation_scheme"), str):
        return "options.ignored_layers or options.activation_scheme is missing"
    block = m["quantization_config"].get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2 and all(_is_count(b) and b for b in block)):
        return f"quantization_config.weight_block_size {block!r} is not two positive integers"
    for rel, record in m["files"].items():
        if not _is_relative_path(rel):
            return f"file name {rel!r} is not a path inside the folder"
        if not isinstance(record, dict) or not _is_count(record.get("size")):
            return f"files[{rel!r}] has no size"
        if not isinstance(record.get("sha256"), str) or not _SHA256.fullmatch(record["sha256"]):
            return f"files[{rel!r}] has no SHA-256"
    for i, t in enumerate(m["tensors"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            return f"tensors[{i}] has no name"
        if t.get("shard") not in m["files"]:
            return f"tensor {t['name']!r} names a shard that is not in 'files'"
        if t.get("scheme") not in _SCHEMES or t.get("dtype") not in DTYPES:
            return f"tensor {t['name']!r} has an unknown scheme or dtype"
        if not isinstance(t.get("shape"), list) or not all(_is_count(d) for d in t["shape"]):
            return f"tensor {t['name']!r} has a malformed shape"
        if t.get("source_dtype") is not None and t["source_dtype"] not in DTYPES:
            return f"tensor {t['name']!r} has an unknown source_dtype"
        if t["scheme"] == "kept" and t.get("source_dtype") is None:
            return f"kept tensor {t['name']!r} has no source_dtype"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_relative_path(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


@dataclass
class VerifyReport:
    folder: Path
    checked: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "ok": self.ok, "files_checked": self.checked,
                "bytes": self.bytes, "problems": self.problems}


def verify(
    folder: str | Path, *, on_bytes: Callable[[int], None] | None = None, ignore: Collection[str] = ()
) -> VerifyReport:
    """Re-hash every file the manifest lists; report missing, changed and unlisted files.

    ``ignore`` names files (relative to ``folder``) to leave out either way: ``push`` settles the
    model card itself before it uploads.
    """
    folder = parse_path(folder, what="the folder")
    manifest = read_manifest(folder)
    report = VerifyReport(folder)
    listed = manifest.get("files", {})
    for rel, expected in listed.items():
        if rel in ignore:
            continue
        path = folder / rel
        if path.is_symlink():
            report.problems.append(f"{rel}: a symbolic link, not the file that was written")
            continue
        if not path.is_file():
            report.problems.append(f"{rel}: missing")
            continue
        record = hash_file(path)
        report.checked += 1
        report.bytes += record.size
        if on_bytes is not None:
            on_bytes(record.size)
        if record.size != expected["size"]:
            report.problems.append(f"{rel}: size {record.size} != {expected['size']} in the manifest")
        elif record.sha256 != expected["sha256"]:
            report.problems.append(f"{rel}: SHA-256 differs from the manifest (the file was changed)")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in (MANIFEST_NAME, *ignore) and rel not in listed and not any(
            part.startswith(".") for part in path.parts[len(folder.parts):]
        ):
            report.problems.append(f"{rel}: not in the manifest")
    return report


def manifest_total_bytes(manifest: Mapping[str, Any]) -> int:
    return sum(f["size"] for f in manifest.get("files", {}).values())


# A single-file output carries its record in the safetensors header's ``__metadata__`` under this
# key: the file cannot list its own hash, but it can say it is ours and what it holds.
FILE_RECORD_KEY = "omni-fp8"
FILE_RECORD_FORMAT = "omni-fp8-file"


def build_file_record(plan: Plan, tensors: Mapping[str, list[str]], *, seconds: float) -> dict[str, Any]:
    """What a single-file output embeds: tool, source, options, totals, and each tensor's sources.

    Args:
        tensors: Output tensor name -> the source tensors it was made from, in order.
    """
    return {
        **_header(_origin(plan), FILE_RECORD_FORMAT),
        "target": plan.target,
        "options": plan.options(),
        "totals": {
            "source_bytes": plan.source_bytes,
            "linears": len(plan.linears),
            "linears_quantized": sum(d.quantized for d in plan.linears.values()),
            "seconds": round(seconds, 3),
        },
        "kept": {t.name: t.reason for t in plan.tensors if t.scheme == KEPT and t.reason != "not-linear"},
        "tensors": dict(tensors),
    }


def read_file_record(metadata: Mapping[str, str], tensor_names: set[str]) -> dict[str, Any] | None:
    """The embedded record of a single-file output, or ``None`` if the file is not one of ours.

    Ours means: the record parses, has our format, and lists exactly the tensors the file holds
    (a file edited or assembled by something else does not qualify).
    """
    import json

    raw = metadata.get(FILE_RECORD_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("format") != FILE_RECORD_FORMAT:
        return None
    if record.get("format_version") != MANIFEST_VERSION or not isinstance(record.get("tensors"), dict):
        return None
    return record if set(record["tensors"]) == tensor_names else None
