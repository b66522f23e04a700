"""The conversion job: source -> plan -> shards, config, index, carried-over files -> manifest.

``convert`` is the one entry point; ``omni-convert convert`` and the Python API both end here.

    >>> from omni_fp8 import convert
    >>> result = convert("./Qwen-Image", "./Qwen-Image-fp8")  # doctest: +SKIP
    >>> print(result.summary_line())  # doctest: +SKIP
    QwenImageTransformer2DModel: 40.9 GB -> 24.4 GB (59.8%), 720/846 Linears in FP8, 14.2 s (2.88 GB/s)
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import OmniFp8Error, OutputWriteError, SourceReadError
from .manifest import FILE_RECORD_KEY, build_file_record, build_manifest
from .options import SINGLE_FILE_TARGETS, Fp8Config, parse_path, parse_size
from .plan import Plan, make_plan
from .report import size_text
from .source import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, Source, open_source
from .output import check_output, check_output_file, publish, publish_file, staging_folder
from .writer import FileRecord, FileTensor, carry_over, hash_file, write_file, write_index, write_json, write_shards

__all__ = ["convert", "execute", "fetching", "ConversionResult", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class ConversionResult:
    """A finished conversion: where it went, its manifest, and how long it took."""

    output: Path
    manifest: dict[str, Any]
    seconds: float

    @property
    def source_bytes(self) -> int:
        return self.manifest["totals"]["source_bytes"]

    @property
    def output_bytes(self) -> int:
        return self.manifest["totals"]["output_bytes"]

    def summary_line(self) -> str:
        totals = self.manifest["totals"]
        rate = self.source_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        return (
            f"{self.manifest['source']['class_name']}: {size_text(self.source_bytes)} -> {size_text(self.output_bytes)} "
            f"({100 * self.output_bytes / max(self.source_bytes, 1):.1f}%), "
            f"{totals['linears_quantized']}/{totals['linears']} Linears in FP8, "
            f"{self.seconds:.1f} s ({rate:.2f} GB/s) -> {self.output}"
        )

    def to_dict(self) -> dict[str, Any]:
        totals = self.manifest["totals"]
        return {
            "output": str(self.output),
            "target": self.manifest["options"].get("target", "omni-fp8"),
            "source": self.manifest["source"],
            "options": self.manifest["options"],
            "quantization_config": self.manifest.get("quantization_config"),
            "source_bytes": self.source_bytes,
            "output_bytes": self.output_bytes,
            "linears": totals["linears"],
            "linears_quantized": totals["linears_quantized"],
            "seconds": round(self.seconds, 3),
            "files": len(self.manifest["files"]),
        }


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    config: Fp8Config | Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
    target: str | None = None,
) -> ConversionResult:
    """Convert a BF16/FP16/FP32 diffusers checkpoint to FP8 weights in a new folder (or file).

    ``src`` is a pipeline folder (its transformer is converted, every other component is
    hard-linked or copied, so ``out`` is a complete pipeline), a transformer folder, or a Hugging
    Face Hub repo id of either (downloaded into the Hub cache, shards converted as they arrive).
    ``src`` is never modified; ``out`` appears only once complete.

    Args:
        subfolder: Convert only this folder of ``src`` (``"transformer"``): ``out`` is then a
            transformer folder, and nothing else of a pipeline is carried over or downloaded.
        revision: For a repo id: the branch, tag or commit (default ``main``).
        token: For a repo id: a Hub token (default: ``HF_TOKEN`` or the saved login).
        config: An ``Fp8Config`` or the equivalent dict; ``None`` means defaults plus the preset
            registered for the model's class.
        dtype: Cast the tensors that stay high precision (e.g. ``torch.bfloat16``); ``None``
            keeps them byte for byte.
        max_shard_size: Largest output shard, in bytes or as ``"5GB"``.
        force: Replace ``out`` if it is an earlier omni-fp8 output.
        progress: Show progress bars.
        target: The engine ``out`` is for: ``"omni-fp8"`` (default, this project's folder),
            ``"vllm-omni"`` (a folder vllm-omni loads as written), ``"comfyui"`` or
            ``"diffusers"`` (one ``.safetensors`` file of the transformer, see the README).
    """
    start = time.perf_counter()
    config = Fp8Config.coerce(config)
    limit = parse_size(max_shard_size)
    source = open_source(src, subfolder=subfolder, revision=revision, token=token)
    source = source.component_only() if subfolder else source
    with fetching(source, target=target, progress=progress):
        plan = make_plan(source, config, dtype=dtype, target=target)
        return execute(plan, out, max_shard_size=limit, force=force, progress=progress, started=start)


@contextmanager
def fetching(source: Source, *, target: str | None = None, progress: bool) -> Iterator[None]:
    """Start a Hub source's downloads (shards, then the files a folder output carries over) before planning.

    Building the model for the plan takes seconds (importing diffusers, mostly); the first shard
    downloads meanwhile. A single-file ``target`` carries nothing over, so nothing else is fetched.
    A local source has nothing to download and goes straight on.
    """
    if source.origin.get("type") != "hub":
        yield
        return
    carried = () if target in SINGLE_FILE_TARGETS else source.passthrough_files()
    with source.downloading(carried, progress=progress):
        yield


def execute(
    plan: Plan,
    out: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
    started: float | None = None,
) -> ConversionResult:
    """Carry out a plan (see ``make_plan``); ``convert`` is this plus planning."""
    start = time.perf_counter() if started is None else started
    limit = parse_size(max_shard_size)
    source = plan.source
    out = parse_path(out, what="the output").absolute()
    if plan.target in SINGLE_FILE_TARGETS:
        return _execute_file(plan, out, force=force, progress=progress, start=start)
    passthrough = source.passthrough_files()  # walks (and vets) the source before anything is written
    existing = check_output(out, source.root, force=force)
    component = source.subfolder
    prefix = f"{component}/" if component else ""

    # A Hub source downloads in the background what is read next: the shards, then the rest.
    with staging_folder(out) as staging, source.downloading(passthrough, progress=progress):
        try:
            manifest = _write(plan, staging, passthrough, component, prefix, limit, progress, start)
        except OSError as e:
            if isinstance(e, OmniFp8Error):
                raise
            raise _os_error(e, staging, out, plan) from e
        publish(staging, out, existing)
    return ConversionResult(output=out, manifest=manifest, seconds=time.perf_counter() - start)


def _execute_file(plan: Plan, out: Path, *, force: bool, progress: bool, start: float) -> ConversionResult:
    """One safetensors file of the transformer in ``plan.target``'s layout, staged and published atomically."""
    layout = _file_layout(plan)  # before touching the disk: an unsupported model is refused first
    existing = check_output_file(out, plan.source.root, force=force)
    with staging_folder(out) as staging:
        staged = staging / out.name
        try:
            record = build_file_record(plan, {t.name: [p.name for p in t.parts] for t in layout},
                                       seconds=time.perf_counter() - start)
            metadata = {"format": "pt", FILE_RECORD_KEY: json.dumps(record, sort_keys=True)}
            with tqdm(total=plan.source_bytes, unit="B", unit_scale=True, desc="Converting",
                      disable=not progress) as bar:
                file = write_file(plan, layout, staged, metadata=metadata, on_tensor=bar.update)
        except OSError as e:
            if isinstance(e, OmniFp8Error):
                raise
            raise _os_error(e, staging, out, plan) from e
        publish_file(staged, out, existing)
    seconds = time.perf_counter() - start
    record["totals"].update(output_bytes=file.size, seconds=round(seconds, 3))
    record["files"] = {out.name: file.to_dict()}
    return ConversionResult(output=out, manifest=record, seconds=seconds)


def _file_layout(plan: Plan) -> list[FileTensor]:
    if plan.target == "comfyui":
        from .export_comfyui import comfyui_layout

        return comfyui_layout(plan)
    from .export_diffusers import diffusers_layout

    return diffusers_layout(plan)


def _write(
    plan: Plan, staging: Path, passthrough: list[str], component: str, prefix: str, limit: int, progress: bool,
    start: float,
) -> dict[str, Any]:
    """Everything a converted folder holds, written into ``staging``, manifest last.

    Shards come first: a Hub source downloads them first, and the other components meanwhile.
    """
    source = plan.source
    model_out = staging / component
    model_out.mkdir(parents=True, exist_ok=True)

    with tqdm(total=plan.source_bytes, unit="B", unit_scale=True, desc="Converting", disable=not progress) as bar:
        records, weight_map = write_shards(
            plan, model_out, max_shard_size=limit, on_tensor=lambda t: bar.update(t.source.nbytes)
        )
    files: dict[str, FileRecord] = {prefix + name: rec for name, rec in records.items()}
    files[prefix + INDEX_NAME] = write_index(model_out, weight_map, plan.output_bytes)
    config = dict(source.config)
    config["quantization_config"] = plan.quantization_config()
    files[prefix + CONFIG_NAME] = write_json(model_out / CONFIG_NAME, config)

    carried = {rel: carry_over(source.local_file(rel), staging / rel) for rel in passthrough}
    carried_bytes = sum((staging / rel).stat().st_size for rel in carried)
    with tqdm(total=carried_bytes, unit="B", unit_scale=True, desc="Hashing carried-over files",
              disable=not progress or carried_bytes < (256 << 20)) as bar:
        for rel in carried:
            files[rel] = hash_file(staging / rel)
            bar.update(files[rel].size)

    seconds = time.perf_counter() - start
    manifest = build_manifest(
        plan, component=component, weight_map=weight_map, files=files, carried=carried, seconds=seconds
    )
    write_json(staging / MANIFEST_NAME, manifest)  # last: its presence means "complete"
    return manifest


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full; free at least {need} there, or choose another disk",
    errno.EDQUOT: "the disk quota is exhausted; free at least {need}, or choose another disk",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f) or the filesystem allows; "
                 "lower --max-shard-size or raise the limit",
    errno.EACCES: "no permission to write there; choose another folder",
    errno.EPERM: "no permission to write there; choose another folder",
    errno.EROFS: "the filesystem is read-only; choose another folder",
}


def _os_error(e: OSError, staging: Path, out: Path, plan: Plan) -> OmniFp8Error:
    """One line for an I/O failure, naming the user's paths (never the hidden staging folder)."""
    names = [Path(os.fsdecode(f)) for f in (e.filename, e.filename2) if f]
    written = [n for n in names if staging in (n, *n.parents)]
    name = names[0] if names else None
    why = e.strerror or str(e)
    if written or (name is None and e.errno in _WRITE_HINTS):
        rel = written[0].relative_to(staging).as_posix() if written else "the output"
        hint = _WRITE_HINTS.get(e.errno, "").format(need=size_text(plan.output_bytes))
        return OutputWriteError(
            f"{out}: writing {rel} failed: {why}{'; ' + hint if hint else ''}. Nothing was published.", path=out
        )
    where = name if name is not None else plan.source.root
    return SourceReadError(f"{where}: reading the source failed: {why}; nothing was published.", path=where)
