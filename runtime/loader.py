"""``load_transformer``: a diffusers transformer with FP8 ``Fp8Linear`` layers, from either source.

* An FP8 checkpoint: a folder ``omni-convert`` produced, or another tool's FP8 folder or single
  file (``converter/layouts.py``): nothing is re-quantized; each tensor is memory-mapped (one at
  a time, as the converter reads), checked, and goes to its device once.
* A BF16/FP16/FP32 folder with ``quantization="fp8"``: the converter's plan and numerics run
  while loading, one tensor at a time, so peak memory is about the FP8 model plus one source
  tensor, never the high-precision model.

Both give the same bits for the same source and options.

    >>> from omni_fp8 import load_transformer
    >>> t = load_transformer("./Qwen-Image", subfolder="transformer", quantization="fp8",
    ...                      quantization_config={"ignored_layers": ["img_mlp"]}, device="cuda")  # doctest: +SKIP
    >>> t = load_transformer("./Qwen-Image-fp8", subfolder="transformer", device="cuda")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from omni_fp8.converter.errors import (
    ConfigError,
    CorruptCheckpointError,
    ModelMismatchError,
)
from omni_fp8.converter.layouts import FP8_SCHEMES, Layout, read_layout
from omni_fp8.converter.numerics import FP8_DTYPE, cast_checked, check_fp8_codes, check_scale, fp8_nan_error, quantize_weight
from omni_fp8.converter.options import Fp8Config, parse_dtype
from omni_fp8.converter.plan import KEPT, check_tensors_match, decide_linears, empty_model, linear_shapes, make_plan
from omni_fp8.converter.source import Source, open_source

from .fp8_linear import Fp8Linear, replace_linears
from .fp8_model import Fp8Provenance, mark_fp8
from .kernels import device_has_fp8, no_fp8_gemm_error

__all__ = ["load_transformer", "QUANTIZATIONS"]

QUANTIZATIONS = ("fp8",)


def load_transformer(
    pretrained: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    quantization: str | None = None,
    quantization_config: Fp8Config | Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    force_fp8_kernels: bool = False,
    progress: bool = True,
    torch_dtype: torch.dtype | None = None,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
) -> nn.Module:
    """Load a diffusers transformer with FP8 weights.

    Args:
        pretrained: A pipeline folder or a transformer folder (high precision, converted, or
            another tool's FP8: vLLM fp8, compressed-tensors, ModelOpt), a Hugging Face Hub repo id
            of either (only the transformer's files are downloaded, into the Hub cache diffusers
            uses, and loading starts while later shards download), or a single FP8
            ``.safetensors`` file (ComfyUI's, BFL's ``fp8r``) with ``config``.
        subfolder: The transformer's folder inside ``pretrained`` (``"transformer"``); by default
            ``transformer/`` of a pipeline folder, or ``pretrained`` itself.
        revision: For a repo id: the branch, tag or commit (default ``main``).
        token: For a repo id: a Hub token (default: ``HF_TOKEN`` or the saved login).
        quantization: ``"fp8"`` quantizes a high-precision checkpoint while loading. A converted
            folder loads as FP8 either way; ``None`` on a high-precision folder loads it as is.
        quantization_config: ``Fp8Config`` or dict (``ignored_layers``, ``weight_block_size``,
            ``activation_scheme``, ``preset``), validated exactly as ``omni-convert`` does. Given
            for a converted folder, it must describe that folder's conversion.
        device: Where the weights go; each tensor is moved there once.
        dtype: dtype of the tensors that stay high precision (default: the checkpoint's); FP8
            weights and their float32 scales keep theirs.
        force_fp8_kernels: Fail unless ``device`` has FP8 matmuls, instead of emulating them.
        progress: Show a progress bar.
        torch_dtype: The older diffusers name of ``dtype``.
        config: For a single file: the model's ``config.json``, its folder, or the dict.

    Returns:
        The ordinary diffusers model class, eligible ``nn.Linear`` layers replaced by
        ``Fp8Linear``, in eval mode: pipelines accept it as their ``transformer``.
    """
    if not (quantization is None or (isinstance(quantization, str) and quantization in QUANTIZATIONS)):
        raise ConfigError(f"unknown quantization {quantization!r}; supported: 'fp8' (or None).")
    dtype, torch_dtype = parse_dtype(dtype), parse_dtype(torch_dtype, what="torch_dtype")
    if torch_dtype is not None:
        if dtype is not None and dtype != torch_dtype:
            raise ConfigError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give dtype only.")
        dtype = torch_dtype
    explicit = None if quantization_config is None else Fp8Config.coerce(quantization_config)
    device = _usable_device(device)
    if force_fp8_kernels and not device_has_fp8(device):
        raise no_fp8_gemm_error(device)  # before reading a byte; each layer checks its scheme too
    source = open_source(pretrained, subfolder=subfolder, revision=revision, token=token, allow_quantized=True,
                         config=config)
    model = empty_model(source.class_name, source.config)
    folder_config = source.config.get("quantization_config")
    _check_quantization_config(source, folder_config)
    layout = read_layout(source, linear_shapes(model))
    if layout is not None:
        made = _load_fp8(model, source, layout, explicit, device, dtype, force_fp8_kernels, progress)
    elif quantization is not None or explicit is not None:
        made = _load_quantizing(model, source, explicit or Fp8Config(), device, dtype, force_fp8_kernels, progress)
    else:
        made = _load_plain(model, source, device, dtype, progress)
    _check_complete(model, source)
    model = model.to(device).eval()
    if made is not None:
        mark_fp8(model, quantization_config=made[0], provenance=made[1], compute_dtype=dtype)
    return model


def _check_quantization_config(source: Source, folder_config: Any) -> None:
    """FP8 tensors without a readable ``quantization_config`` would load as raw codes, unscaled."""
    where = source.model_dir / "config.json"
    if folder_config is not None and not isinstance(folder_config, Mapping):
        raise CorruptCheckpointError(
            f"{where}: quantization_config must be a JSON object, got {type(folder_config).__name__}; the file is "
            "damaged. Restore it from the conversion.",
            path=where,
        )
    if folder_config is None and source.kind != "file" and any(t.dtype.startswith("F8_") for t in source.tensors):
        raise CorruptCheckpointError(
            f"{where}: the weights include FP8 tensors but config.json has no quantization_config, so their scales "
            "would not be applied; restore config.json from the conversion (omni-convert verify shows what changed).",
            path=where,
        )


def _usable_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` this torch can put tensors on, or one line saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"device {device!r} is not a device torch knows; use 'cpu', 'cuda' or 'cuda:N'.") from e
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU; install a CUDA build of "
                "torch on a GPU machine, or load with device='cpu'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}."
            )
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "meta" or backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ConfigError(f"device {device!r} is not available here; load with device='cpu' or 'cuda'.")
    return dev


def _load_quantizing(
    model: nn.Module, source: Source, config: Fp8Config, device: torch.device, dtype: torch.dtype | None,
    force: bool, progress: bool,
) -> tuple[dict[str, Any], Fp8Provenance]:
    """The converter's plan and numerics, applied tensor by tensor into the model."""
    plan = make_plan(source, config, dtype=dtype, model=model)
    replace_linears(model, {n: d.scheme for n, d in plan.linears.items()}, config.weight_block_size,
                    force_fp8_gemm=force, static=plan.static)
    plans = {t.name: t for t in plan.tensors}

    def place(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        t = plans[name]
        if t.scheme == KEPT:
            yield name, _owned(tensor, device, t.outputs[0].dtype, name=name)
            return
        q, scale = quantize_weight(tensor, t.block_size, per_channel=t.per_channel, name=name)
        yield name, q.to(device)
        yield t.scale_name, scale.to(device)
        if t.input_scale is not None:  # the value the converter writes, as the same float32 tensor
            yield t.input_scale_name, torch.tensor(t.input_scale, dtype=torch.float32, device=device)

    _stream(model, source, place, progress)
    return plan.quantization_config(), Fp8Provenance.from_plan(plan)


def _load_fp8(
    model: nn.Module, source: Source, layout: Layout, explicit: Fp8Config | None,
    device: torch.device, dtype: torch.dtype | None, force: bool, progress: bool,
) -> tuple[dict[str, Any], Fp8Provenance]:
    """Memory-map an FP8 checkpoint (ours or another tool's, see ``layouts``) into ``Fp8Linear`` modules."""
    folder_config = source.config.get("quantization_config")
    manifest = check_manifest(source.model_dir, source.root, folder_config) if layout.name == "fp8" else None
    infos = {t.name: t for t in source.tensors}
    schemes = layout.schemes
    if explicit is not None:
        _check_agrees(explicit, schemes, layout.block_size, model, source, layout.static)
    replace_linears(model, schemes, layout.block_size, force_fp8_gemm=force, static=layout.static)
    for note in layout.notes:
        warnings.warn(f"{source.shards[0].path}: {note}.", stacklevel=3)

    def place(stored: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        # Checked on the mapped bytes, before they are copied anywhere (see the README's Safety).
        where = str(infos[stored].file)
        for name, part in layout.translate(stored, tensor):
            if name.endswith(("weight_scale", "weight_scale_inv", ".input_scale")):
                check_scale(part, name=name, where=where)
                yield name, _owned(part, device, None)
            elif part.dtype == FP8_DTYPE:
                owned = _owned(part, device, None)
                codes.check(owned, name=name, where=where)
                yield name, owned
            else:
                yield name, _owned(part, device, dtype if part.is_floating_point() else None, name=name)

    codes = _NanCodes()
    _stream(model, source, place, progress)
    codes.finish()
    saved = dict(folder_config) if layout.name == "fp8" else layout.checkpoint_config()
    return saved, checkpoint_provenance(saved, schemes, manifest, {**source.origin, "layout": layout.name})


def checkpoint_provenance(
    folder_config: Mapping[str, Any], schemes: Mapping[str, str], manifest: Mapping[str, Any] | None,
    origin: Mapping[str, Any],
) -> Fp8Provenance:
    """What a save of a model loaded from a checkpoint records: the manifest's story where there is one."""
    if manifest is None:  # another tool's fp8 folder: all we know is what it holds
        options = {"method": "fp8", "preset": "none", "dtype": "keep",
                   "ignored_layers": list(folder_config.get("ignored_layers") or []),
                   "activation_scheme": folder_config.get("activation_scheme", "dynamic"),
                   "weight_block_size": folder_config.get("weight_block_size")}
        reasons = {name: "checkpoint" for name, scheme in schemes.items() if scheme == KEPT}
        return Fp8Provenance(options, reasons, {}, dict(origin))
    entries = manifest["tensors"]
    reasons = {e["name"].rsplit(".", 1)[0]: e["reason"] for e in entries
               if e["scheme"] == KEPT and e["name"].rsplit(".", 1)[0] in schemes and e["name"].endswith(".weight")}
    dtypes = {e["name"]: e["source_dtype"] for e in entries if e["scheme"] in FP8_SCHEMES
              and e.get("source_dtype")}
    return Fp8Provenance(dict(manifest["options"]), reasons, dtypes, dict(manifest["source"]))


class _NanCodes:
    """Refuse FP8 weights holding NaN codes, where the check costs least.

    On the CPU the copy just made is scanned at once (``has_fp8_nan``). On a GPU each weight's
    largest code magnitude is reduced there and all of them are read back once at the end, so the
    check adds no host work and no synchronisation per tensor.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, str, torch.Tensor]] = []

    def check(self, q: torch.Tensor, *, name: str, where: str) -> None:
        if q.device.type == "cpu":
            check_fp8_codes(q, name=name, where=where)
        elif q.numel():  # 0x7F and 0xFF are the largest codes read as int8 and as uint8
            codes = torch.stack([q.view(torch.int8).amax().to(torch.int16) - 0x7F,
                                 q.view(torch.uint8).amax().to(torch.int16) - 0xFF])
            self._pending.append((name, where, codes.amax()))

    def finish(self) -> None:
        if not self._pending:
            return
        found = torch.stack([code for _, _, code in self._pending]).cpu()  # 0 where a NaN code is
        for (name, where, _), code in zip(self._pending, found.tolist()):
            if code == 0:
                raise fp8_nan_error(name, where)
        self._pending.clear()


def check_manifest(model_dir: Path, root: Path, folder_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """An omni-fp8 folder's config.json must still say what its manifest recorded; returns the manifest."""
    from omni_fp8.converter.manifest import read_manifest
    from omni_fp8.converter.source import MANIFEST_NAME

    for folder in dict.fromkeys((model_dir, root)):
        if (folder / MANIFEST_NAME).is_file():
            manifest = read_manifest(folder)
            if (folder / manifest["component"]).resolve() != model_dir.resolve():
                continue  # a manifest about another folder (a pipeline's, say)
            if manifest["quantization_config"] != dict(folder_config):
                raise ModelMismatchError(
                    f"{model_dir / 'config.json'}: quantization_config differs from {folder / MANIFEST_NAME}; "
                    "the folder was edited after conversion. Run omni-convert verify, or convert again.",
                    path=model_dir,
                )
            return manifest
    return None


def _check_agrees(
    explicit: Fp8Config, schemes: Mapping[str, str], block: tuple[int, int] | None, model: nn.Module, source: Source,
    static: Collection[str] = (),
) -> None:
    """An explicit config must describe the folder's conversion, or it would silently not apply."""
    where = source.model_dir
    folder_scheme = "static" if static else "dynamic"
    if explicit.activation_scheme != folder_scheme:
        raise ConfigError(
            f"{where}: quantization_config asks for {explicit.activation_scheme} activations but the folder holds "
            f"{folder_scheme} ones; omit quantization_config to load it as converted, or convert again."
        )
    if explicit.weight_block_size != block:
        raise ConfigError(
            f"{where}: quantization_config asks for weight_block_size {explicit.weight_block_size} but the folder "
            f"was converted with {block}; omit quantization_config to load it as converted, or convert again."
        )
    wanted = decide_linears(model, explicit, class_name=source.class_name).decisions
    differ = [m for m, d in wanted.items() if (d.scheme == KEPT) != (schemes[m] == KEPT)]
    if differ:
        first = differ[0]
        state = "keeps" if schemes[first] == KEPT else "quantizes"
        raise ConfigError(
            f"{where}: quantization_config disagrees with the converted folder on {len(differ)} layer(s): the folder "
            f"{state} {first}; omit quantization_config to load it as converted, or convert again with these options."
        )


def check_converted_config(source: Source, explicit: Fp8Config) -> None:
    """Refuse ``explicit`` unless it describes how the FP8 checkpoint ``source`` was made.

    For loaders that hand the folder to diffusers (which would silently keep the folder's own
    config): the same check ``load_transformer`` makes, from the headers alone.
    """
    model = empty_model(source.class_name, source.config)
    layout = read_layout(source, linear_shapes(model))
    if layout is not None:
        _check_agrees(explicit, layout.schemes, layout.block_size, model, source, layout.static)


def _load_plain(
    model: nn.Module, source: Source, device: torch.device, dtype: torch.dtype | None, progress: bool
) -> None:
    """A high-precision checkpoint loaded as it is (no FP8): the ordinary model."""
    check_tensors_match(source, model)
    def place(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield name, _owned(tensor, device, dtype if tensor.is_floating_point() else None, name=name)

    _stream(model, source, place, progress)


def _stream(
    model: nn.Module,
    source: Source,
    place: Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]],
    progress: bool,
) -> None:
    """Map each checkpoint tensor in file order, turn it into model tensors, put them in place."""
    with (source.downloading(progress=progress), source.open_reader() as reader,
          _bar(source.data_bytes, progress) as bar):
        for info in source.tensors:
            for name, tensor in place(info.name, reader.read(info)):
                _assign(model, name, tensor)
            bar.update(info.nbytes)


def _owned(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None, *, name: str = "") -> torch.Tensor:
    """A fresh copy on ``device``: never a view of the read-only file map.

    Fresh allocations are also aligned, and CPU matmuls can round differently on unaligned
    operands, so both load paths give the same bits. A cast that would overflow is refused.
    """
    if dtype is not None and dtype != tensor.dtype:
        tensor = cast_checked(tensor, dtype, name=name)
    return tensor.to(device=device, copy=True)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put one checkpoint tensor in place of the meta tensor it stands for."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or (attr not in module._parameters and attr not in module._buffers):
        raise ModelMismatchError(
            f"the checkpoint has {name!r}, which {type(model).__name__} built from config.json does not; "
            "the config does not match the weights."
        )
    if attr in module._buffers:
        module._buffers[attr] = tensor
        return
    old = module._parameters[attr]
    if old is not None and tuple(old.shape) != tuple(tensor.shape):
        raise ModelMismatchError(
            f"{name} has shape {list(tensor.shape)} in the checkpoint but {list(old.shape)} in "
            f"{type(model).__name__} built from config.json; the config does not match the weights."
        )
    requires_grad = bool(old is not None and old.requires_grad and tensor.is_floating_point() and tensor.dtype != FP8_DTYPE)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad)


def _check_complete(model: nn.Module, source: Source) -> None:
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        raise ModelMismatchError(
            f"{source.model_dir}: the checkpoint lacks {len(missing)} tensor(s) of {source.class_name} "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); it is incomplete or for another config.",
            path=source.model_dir,
        )
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module._place(rescale=True)


def _bar(total: int, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc="Loading", disable=not progress)
