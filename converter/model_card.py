"""The model card (``README.md``) of a converted folder, as the Hub reads it.

Built from the manifest alone, so it says exactly what the folder holds: the base model with
``base_model_relation: quantized`` (the Hub would otherwise guess the relation from the files and
may show an FP8 safetensors repo as a fine-tune), ``library_name: diffusers``, the ``fp8`` and
``omni-fp8`` tags, the options, which Linears stayed in high precision and why, the sizes, and how
to load it. ``huggingface_hub.ModelCard`` / ``ModelCardData`` write the metadata block.

``settle_card`` decides whether a folder's card is ours to (re)write, and records the card in the
manifest so that ``verify`` keeps passing and ``--force`` knows whose card it is.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UnsupportedSourceError
from .filenames import CARD_NAME, MANIFEST_NAME
from .report import size_text
from .writer import FileRecord, hash_file, write_json

__all__ = ["build_card", "settle_card", "base_model_of"]

_WHY = {
    "dtype-read": "the model's forward reads this weight's dtype, so it must stay high precision",
    "unaligned": "a dimension is not a multiple of 16, which FP8 GEMMs need",
}


def base_model_of(manifest: Mapping[str, Any]) -> str | None:
    """The Hub repo the folder was converted from, when the source was one (or its cache copy)."""
    repo = manifest["source"].get("repo_id")
    return repo if isinstance(repo, str) and repo else None


def build_card(manifest: Mapping[str, Any], repo_id: str) -> str:
    """The card's full text for ``manifest``, pushed as ``repo_id``."""
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_of(manifest)
    data = ModelCardData(library_name="diffusers", tags=["fp8", "omni-fp8", "quantized"], base_model=base)
    if base:
        data.base_model_relation = "quantized"  # not a ModelCardData argument; CardData keeps extra keys
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(manifest, repo_id, base)}"))


def _calibration_rows(options: Mapping[str, Any]) -> list[str]:
    """Where static input scales came from: a reader can check them against their own calibration."""
    calibration = options.get("calibration")
    if options.get("activation_scheme") != "static" or not isinstance(calibration, Mapping):
        return []
    rows = [f"| calibration | `{calibration.get('statistic')}` of \\|input\\| over {calibration.get('calls')} transformer "
            f"calls (file sha256 `{str(calibration.get('sha256'))[:16]}`) |"]
    dynamic = options.get("static_ignored_layers") or []
    if dynamic:
        rows.append(f"| static_ignored_layers | {', '.join(f'`{p}`' for p in dynamic)} |")
    return rows


def _body(manifest: Mapping[str, Any], repo_id: str, base: str | None) -> str:
    source, totals, options = manifest["source"], manifest["totals"], manifest["options"]
    component = manifest["component"]
    name = repo_id.split("/")[-1]
    block = manifest["quantization_config"]["weight_block_size"]
    per_row = options.get("weight_strategy") == "channel"
    scheme = (f"one scale per {block[0]}x{block[1]} block" if block else
              "one scale per output row" if per_row else "one scale per tensor")
    origin = f"[{base}]({_endpoint()}/{base})" if base else "a local checkpoint"
    pct = 100 * totals["output_bytes"] / max(totals["source_bytes"], 1)
    sub = f', subfolder="{component}"' if component else ""
    lines = [
        f"# {name}",
        "",
        f"{source['class_name']} of {origin} with FP8 (E4M3FN) weights, {scheme}, dynamic FP8 activations: "
        f"{totals['linears_quantized']} of {totals['linears']} Linear layers in FP8, the rest as in the source. "
        f"Made with omni-fp8 {manifest['tool']['version']} in vLLM's fp8 checkpoint format"
        + (" (a complete diffusers pipeline: only the transformer is converted)." if component else "."),
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from omni_fp8 import load_transformer",
        "",
        f'transformer = load_transformer("{repo_id}"{sub}, device="cuda")',
    ]
    if component:
        lines += [
            "",
            "from diffusers import DiffusionPipeline",
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", transformer=transformer, '
            "torch_dtype=torch.bfloat16).to(\"cuda\")",
        ]
    lines += [
        "```",
        "",
        "```bash",
        f"omni-convert inspect {repo_id}     # what is FP8, what is kept and why (reads only headers)",
        "```",
        "",
        "## Options",
        "",
        "| option | value |",
        "|---|---|",
        f"| preset | `{options['preset']}` |",
        f"| ignored_layers | {', '.join(f'`{p}`' for p in options['ignored_layers']) or 'none'} |",
        f"| weight_block_size | {f'`{block[0]},{block[1]}`' if block else 'none'} |",
        f"| weight_strategy | `{options.get('weight_strategy') or ('block' if block else 'tensor')}` |",
        f"| activation_scheme | `{options['activation_scheme']}` |",
        *_calibration_rows(options),
        f"| dtype of kept tensors | `{options.get('dtype', 'keep')}` |",
        "",
        "## Layers kept in high precision",
        "",
        *_kept_table(manifest),
        "",
        "## Sizes",
        "",
        f"Transformer weights: {size_text(totals['source_bytes'])} -> {size_text(totals['output_bytes'])} "
        f"({pct:.1f}%).",
        "",
        "## Manifest",
        "",
        f"`{MANIFEST_NAME}` lists every tensor (scheme, dtype, shape, why it was kept) and the SHA-256 of every "
        f"file; `omni-convert verify` checks a download against it.",
        "",
        *_provenance(source, manifest),
        "",
    ]
    return "\n".join(lines)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _kept_table(manifest: Mapping[str, Any]) -> list[str]:
    kept: dict[str, list[str]] = {}
    for t in manifest["tensors"]:
        reason = t.get("reason")
        if t["scheme"] == "kept" and reason and reason != "not-linear" and t["name"].endswith(".weight"):
            kept.setdefault(reason, []).append(t["name"].removesuffix(".weight"))
    if not kept:
        return ["None: every Linear layer is in FP8 (norms, biases and embeddings always stay as they are)."]
    rows = ["| why | Linears | e.g. |", "|---|---|---|"]
    for reason, names in kept.items():
        why = (f"matches `{reason.removeprefix('ignored:')}` of ignored_layers: kept for quality"
               if reason.startswith("ignored:") else _WHY.get(reason, reason))
        rows.append(f"| {why} | {len(names)} | `{names[0]}` |")
    return rows + ["", "Norms, biases and other non-Linear tensors are copied unchanged."]


def _provenance(source: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str]:
    rows = ["| | |", "|---|---|"]
    if source.get("repo_id"):
        rows.append(f"| source | `{source['repo_id']}` |")
    if source.get("revision"):
        rows.append(f"| revision | `{source['revision']}` |")
    if source.get("commit"):
        rows.append(f"| commit | `{source['commit']}` |")
    rows += [
        f"| model class | `{source['class_name']}` |",
        f"| converted | {manifest['created']} by omni-fp8 {manifest['tool']['version']} |",
        f"| tensors | {manifest['totals']['tensors']} |",
    ]
    return rows


def settle_card(folder: Path, manifest: dict[str, Any], repo_id: str, *, overwrite: bool = False) -> str:
    """Write our card into ``folder`` unless it holds the user's, and record it in the manifest.

    Ours to (re)write: no card yet, the card we wrote (unchanged since), or the source's own card
    carried over from a pipeline (it describes the original model, not this one). Anything else
    is the user's card and is kept, unless ``overwrite``. The manifest then lists the card with its
    hash and who wrote it, so ``verify`` passes and ``--force`` never deletes the user's card.
    The card is replaced by rename, never rewritten in place: a carried-over card is a hard link
    to the source's bytes. Returns ``"written"`` or ``"kept"``.
    """
    path = folder / CARD_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UnsupportedSourceError(f"{path}: the model card is not a plain file; replace it with one.", path=path)
    listed = manifest["files"].get(CARD_NAME)
    current = hash_file(path) if path.is_file() else None
    unchanged = current is not None and listed is not None and current.sha256 == listed["sha256"]
    card = manifest.get("model_card") or {}
    ours = unchanged and (card.get("written_by") == "omni-fp8" or CARD_NAME in manifest["carried_over"])
    if current is None or ours or overwrite:
        record, written_by = _write_text(path, build_card(manifest, repo_id)), "omni-fp8"
        manifest["carried_over"].pop(CARD_NAME, None)
    else:
        record, written_by = current, "user"
    manifest["files"][CARD_NAME] = record.to_dict()
    manifest["model_card"] = {"path": CARD_NAME, "written_by": written_by}
    write_json(folder / MANIFEST_NAME, manifest)
    return "written" if written_by == "omni-fp8" else "kept"


def _write_text(path: Path, text: str) -> FileRecord:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return hash_file(path)
