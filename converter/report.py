"""Human- and machine-readable views of a plan and of a converted folder (``omni-convert inspect``).

Tensor names are grouped by collapsing block indices (``transformer_blocks.*.attn.to_q.weight``),
so a 60-block model reads as a page, not 2,000 lines; ``--json`` gives every tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .manifest import manifest_total_bytes
from .plan import KEPT, Plan
from .safetensors_format import DTYPES

__all__ = ["plan_text", "plan_json", "folder_text", "folder_json", "layout_text", "layout_json", "size_text",
           "source_label"]

_BLOCK_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")  # the first one is the block number


def plan_json(plan: Plan) -> dict[str, Any]:
    source = plan.source
    return {
        "source": {**source.origin, "kind": source.kind, "component": source.subfolder,
                   "class_name": source.class_name, "shards": len(source.shards)},
        "options": plan.options(),
        "quantization_config": plan.quantization_config(),
        "summary": plan.summary(),
        "tensors": [
            {"name": t.name, "shape": list(t.source.shape), "source_dtype": t.source.dtype,
             "scheme": t.scheme, **({"reason": t.reason} if t.reason else {}),
             "source_bytes": t.source.nbytes, "output_bytes": sum(o.nbytes for o in t.outputs)}
            for t in plan.tensors
        ],
    }


def plan_text(plan: Plan, *, table: bool = True) -> str:
    data = plan_json(plan)
    s = data["summary"]
    source = plan.source
    where = f"{source.kind}, {source.subfolder + ': ' if source.subfolder else ''}{source.class_name}"
    preset = plan.preset
    lines = [
        f"Source:   {source_label(source.origin, source.root)} ({where}, {len(source.shards)} "
        f"shard{'s' * (len(source.shards) != 1)})",
        f"Preset:   {preset.name}: {preset.description}" if preset else "Preset:   none",
        f"Scheme:   {_scheme_words(plan.config.weight_block_size, plan.config.weight_strategy)}, "
        f"{plan.config.activation_scheme} activations",
    ]
    if plan.target != "omni-fp8":
        lines.append(f"Target:   {plan.target}")
    if plan.ignored_layers:
        hits = ", ".join(f"{p} ({n} Linear{'s' * (n != 1)})" for p, n in plan.pattern_hits.items())
        lines.append(f"Ignored:  {hits}")
    kept = s["linears"] - s["linears_quantized"]
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(s["kept_reasons"].items()) if r != "not-linear")
    lines.append(f"Linears:  {s['linears_quantized']} of {s['linears']} to FP8"
                 + (f", {kept} kept ({reasons})" if kept else ""))
    if plan.dtype is not None:
        lines.append(f"Kept tensors cast to {plan.options()['dtype']}")
    if table:
        lines += ["", *_table(data["tensors"]), ""]
    lines.append(f"Size:     {size_text(s['source_bytes'])} -> {size_text(s['output_bytes'])} "
                 f"({100 * s['output_bytes'] / max(s['source_bytes'], 1):.1f}%)")
    return "\n".join(lines)


def source_label(origin: Mapping[str, Any], fallback: object = None) -> str:
    """How a source is named to a person: ``org/name@main (commit 0123abcd4567)`` for a Hub repo."""
    if origin.get("type") == "hub":
        sub = f", subfolder {origin['subfolder']}" if origin.get("subfolder") else ""
        return f"{origin['repo_id']}@{origin.get('revision') or 'main'} (commit {str(origin.get('commit'))[:12]}{sub})"
    return str(origin.get("path") or origin.get("repo_id") or origin.get("name") or origin.get("from")
               or fallback or origin.get("type"))


def folder_json(folder: Path | str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "folder": str(folder),
        "tool": manifest["tool"],
        "created": manifest["created"],
        "source": manifest["source"],
        "options": manifest["options"],
        "quantization_config": manifest["quantization_config"],
        "totals": manifest["totals"],
        "files": len(manifest["files"]),
        "file_bytes": manifest_total_bytes(manifest),
        "tensors": manifest["tensors"],
    }


def folder_text(folder: Path | str, manifest: Mapping[str, Any]) -> str:
    totals, options, source = manifest["totals"], manifest["options"], manifest["source"]
    rows = []
    by_name = {t["name"]: t for t in manifest["tensors"]}
    for t in manifest["tensors"]:
        if t["scheme"] == "scale":
            continue
        n = math.prod(t["shape"])
        out = n * DTYPES[t["dtype"]].itemsize
        if t.get("scale"):
            out += math.prod(by_name[t["scale"]]["shape"]) * 4
        rows.append({"name": t["name"], "shape": t["shape"], "scheme": t["scheme"], "reason": t.get("reason"),
                     "source_bytes": n * DTYPES[t["source_dtype"] or t["dtype"]].itemsize, "output_bytes": out})
    block = manifest["quantization_config"]["weight_block_size"]
    lines = [
        f"Folder:   {folder} (omni-fp8 {manifest['tool']['version']}, {manifest['created']})",
        f"Source:   {source_label(source)} ({source['kind']}, {source['class_name']})",
        f"Preset:   {options['preset']}; ignored_layers: {', '.join(options['ignored_layers']) or 'none'}",
        f"Scheme:   {_scheme_words(block, options.get('weight_strategy'))}, {options['activation_scheme']} activations",
        f"Linears:  {totals['linears_quantized']} of {totals['linears']} in FP8",
        "",
        *_table(rows),
        "",
        f"Size:     {size_text(totals['source_bytes'])} -> {size_text(totals['output_bytes'])} "
        f"({100 * totals['output_bytes'] / max(totals['source_bytes'], 1):.1f}%); "
        f"{len(manifest['files'])} files, {size_text(manifest_total_bytes(manifest))} on disk",
    ]
    return "\n".join(lines)


def _table(tensors: Iterable[Mapping[str, Any]]) -> list[str]:
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for t in tensors:
        key = (_BLOCK_INDEX.sub("*", t["name"], count=1), t["scheme"], t.get("reason") or "")
        g = groups.setdefault(key, {"n": 0, "shapes": set(), "src": 0, "out": 0})
        g["n"] += 1
        g["shapes"].add("x".join(map(str, t["shape"])) or "scalar")
        g["src"] += t["source_bytes"]
        g["out"] += t["output_bytes"]
    width = max((len(k[0]) for k in groups), default=6)
    lines = [f"  {'tensor':<{width}}  {'count':>5}  {'decision':<22}  {'shape':<14}  size"]
    for (name, scheme, reason), g in groups.items():
        decision = scheme if scheme != KEPT else f"kept ({reason})"
        shape = next(iter(g["shapes"])) if len(g["shapes"]) == 1 else "various"
        size = size_text(g["src"]) if g["src"] == g["out"] else f"{size_text(g['src'])} -> {size_text(g['out'])}"
        lines.append(f"  {name:<{width}}  {g['n']:>5}  {decision:<22}  {shape:<14}  {size}")
    return lines


def _scheme_words(block: Any, strategy: str | None = None) -> str:
    if block:
        return f"FP8 E4M3FN weights, one scale per {block[0]}x{block[1]} block"
    if strategy == "channel":
        return "FP8 E4M3FN weights, one scale per output row"
    return "FP8 E4M3FN weights, one scale per tensor"


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def layout_json(source: Any, layout: Any) -> dict[str, Any]:
    """Another tool's (or a manifest-less) FP8 checkpoint, as ``load_transformer`` reads it."""
    schemes: dict[str, int] = {}
    for scheme in layout.schemes.values():
        schemes[scheme] = schemes.get(scheme, 0) + 1
    by_dtype: dict[str, int] = {}
    for t in source.tensors:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    return {
        "path": str(source.shards[0].path if source.kind == "file" else source.model_dir),
        "class_name": source.class_name,
        "layout": layout.name,
        "weight_block_size": list(layout.block_size) if layout.block_size else None,
        "schemes": schemes,
        "kept_linears": [n for n, s in layout.schemes.items() if s == KEPT],
        "bytes_by_dtype": by_dtype,
        "notes": list(layout.notes),
    }


def layout_text(source: Any, layout: Any) -> str:
    data = layout_json(source, layout)
    fp8 = sum(n for s, n in data["schemes"].items() if s != KEPT)
    lines = [
        f"Path:     {data['path']} ({data['class_name']})",
        f"Layout:   {layout.name}" + (f", blocks {data['weight_block_size']}" if data["weight_block_size"] else ""),
        f"Linears:  {fp8} of {len(layout.schemes)} in FP8 ("
        + ", ".join(f"{s} {n}" for s, n in sorted(data["schemes"].items())) + ")",
        "Bytes:    " + ", ".join(f"{d} {size_text(n)}" for d, n in sorted(data["bytes_by_dtype"].items())),
        *[f"Note:     {note}" for note in data["notes"]],
    ]
    return "\n".join(lines)
