"""Which layers can take FP8: one group of Linears at a time, measured on the model's own inputs.

    >>> report = suggest(transformer, load_inputs("inputs.safetensors"))  # doctest: +SKIP
    >>> print(report.table()); report.ignored_layers  # doctest: +SKIP

``sensitivity`` quantizes one group of Linears (a block's attention, each MLP, the modulation,
each embedder) at a time, replays recorded transformer inputs, and measures how far the output
moves from the unquantized model's; ``suggest`` then keeps the most damaging groups in high
precision, greedily, until the whole model's error passes a bound. With a static config
(``activation_scheme="static"`` and a calibration), each group is measured with static and with
dynamic activations, ranked by what static adds, and ``suggest`` keeps the worst groups dynamic
(``static_ignored_layers``) instead, every Linear staying FP8.

Recorded inputs are a safetensors file (``save_inputs`` / ``load_inputs``): for forward call
``i``, tensor keyword arguments as ``"{i:05d}.{name}"`` (a list of tensors, as ZImagePipeline
passes its latents, as ``"{i:05d}.{name}[j]"``) and the other JSON-able ones (lists of
image shapes, flags; tuples written as ``{"__tuple__": [...]}``) in the metadata, under
``"omni-fp8-inputs"``. Record them from a real
pipeline run with ``record_inputs``:

    >>> with record_inputs(pipe.transformer) as calls:  # doctest: +SKIP
    ...     pipe("a cat", num_inference_steps=8)
    >>> save_inputs("inputs.safetensors", calls)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omni_fp8.converter.options import DEFAULT_MAX_ERROR, Fp8Config
from omni_fp8.converter.plan import decide_linears, linear_shapes, static_input_scales

from .fp8_linear import Fp8Linear

INPUTS_FORMAT = "omni-fp8-inputs"
INPUTS_VERSION = 2  # 2: lists of tensors (ZImagePipeline's latents and embeddings); 1 is read too

__all__ = [
    "save_inputs", "load_inputs", "record_inputs", "sensitivity", "suggest", "SensitivityReport",
    "GroupDamage", "group_of", "DEFAULT_MAX_ERROR",
]


def save_inputs(path: str | os.PathLike[str], calls: Sequence[Mapping[str, Any]]) -> None:
    """Write recorded forward keyword arguments, one mapping per call, as a safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    other: list[dict[str, Any]] = []
    for i, kwargs in enumerate(calls):
        rest = {}
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i:05d}.{name}"] = value.detach().to("cpu").clone()  # calls may share a tensor
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
                for j, v in enumerate(value):
                    tensors[f"{i:05d}.{name}[{j}]"] = v.detach().to("cpu").clone()
                rest[name] = {"__tensors__": len(value), "tuple": isinstance(value, tuple)}
            else:
                rest[name] = _encode(value)
        other.append(rest)
    meta = {"format": INPUTS_FORMAT, "format_version": INPUTS_VERSION, "calls": len(calls), "other": other}
    save_file(tensors, os.fspath(path), metadata={INPUTS_FORMAT: json.dumps(meta)})


def load_inputs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a file written by ``save_inputs``: a list of forward keyword-argument dicts."""
    from safetensors import safe_open

    from omni_fp8.converter.errors import CorruptCheckpointError
    from omni_fp8.converter.safetensors_format import read_header

    header = read_header(path)  # strict: a file that is not safetensors is one clear error

    def damaged(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{path}: not a recorded-inputs file ({why}); record one with omni_fp8.record_inputs and save_inputs.",
            path=path)

    meta = header.json_metadata(INPUTS_FORMAT, damaged)
    if meta.get("format_version") not in (1, INPUTS_VERSION):
        raise CorruptCheckpointError(f"{path}: recorded-inputs format_version {meta.get('format_version')!r} "
                                     f"is not 1 or {INPUTS_VERSION}; upgrade omni-fp8.", path=path)
    other = meta.get("other")
    if not isinstance(other, list) or not all(isinstance(o, dict) for o in other):
        raise damaged("'other' is not a list of calls")
    calls = [{name: _decode(value) for name, value in o.items()} for o in other]
    lists = {(i, name): value for i, o in enumerate(other) for name, value in o.items()
             if isinstance(value, dict) and "__tensors__" in value}
    places = {}
    for key in header.tensors:
        match = re.fullmatch(r"([0-9]{5,})\.([A-Za-z_][A-Za-z_0-9]*)(?:\[([0-9]+)\])?", key)
        if match is None or int(match[1]) >= len(calls):
            raise damaged(f"tensor {key!r} is not named 'CALL.argument' for one of its {len(calls)} calls")
        index, name, item = int(match[1]), match[2], match[3]
        if item is not None and not (int(item) < lists.get((index, name), {}).get("__tensors__", 0)):
            raise damaged(f"tensor {key!r} is not an item of a recorded list of tensors")
        places[key] = (index, name, None if item is None else int(item))
    for (index, name), value in lists.items():
        calls[index][name] = [None] * value["__tensors__"]
    with safe_open(os.fspath(path), "pt") as f:
        for key, (index, name, item) in places.items():
            if item is None:
                calls[index][name] = f.get_tensor(key)
            else:
                calls[index][name][item] = f.get_tensor(key)
    for (index, name), value in lists.items():
        if any(t is None for t in calls[index][name]):
            raise damaged(f"call {index}'s {name} lacks some of its {value['__tensors__']} tensors")
        if value.get("tuple"):
            calls[index][name] = tuple(calls[index][name])
    return calls


def _encode(value: Any) -> Any:
    """JSON for a non-tensor argument, tuples kept apart from lists (``img_shapes`` holds tuples)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _snapshot(value: Any) -> Any:
    """A copy of an input that the pipeline's later in-place updates cannot change (tensors in lists too)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


@contextmanager
def record_inputs(transformer: torch.nn.Module) -> Iterator[list[dict[str, Any]]]:
    """Collect the keyword arguments of every forward call of ``transformer`` while in the block."""
    calls: list[dict[str, Any]] = []
    signature = inspect.signature(transformer.forward)

    def hook(module, args, kwargs):
        # Pipelines call some transformers positionally (ZImagePipeline: latents, timestep, prompt
        # embeddings): name those arguments as forward does, so every call replays as keywords.
        bound = signature.bind_partial(*args, **kwargs).arguments if args else kwargs
        calls.append({k: _snapshot(v) for k, v in bound.items()})

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@dataclass
class GroupDamage:
    """What quantizing one group alone does to the output."""

    group: str
    linears: list[str]
    error: float  # mean relative L2 error of the outputs against the unquantized model's
    bytes: int  # high-precision weight bytes of the group (FP8 saves about half)
    dynamic_error: float | None = None  # static configs: the same group with dynamic activations

    @property
    def static_cost(self) -> float:
        """What static activations add to this group's error (0 for a dynamic measurement)."""
        return 0.0 if self.dynamic_error is None else self.error - self.dynamic_error


@dataclass
class SensitivityReport:
    """Every group's damage, worst first, and the all-FP8 error; see ``sensitivity``."""

    class_name: str
    calls: int
    all_fp8_error: float
    groups: list[GroupDamage] = field(default_factory=list)
    ignored_layers: list[str] | None = None  # set by ``suggest``
    suggested_error: float | None = None
    max_error: float | None = None
    static: bool = False  # groups measured with static activations (``dynamic_error`` beside)
    static_ignored_layers: list[str] | None = None  # set by ``suggest`` for a static config

    def to_dict(self) -> dict[str, Any]:
        out = {
            "class_name": self.class_name, "calls": self.calls, "all_fp8_error": self.all_fp8_error,
            "max_error": self.max_error, "ignored_layers": self.ignored_layers, "suggested_error": self.suggested_error,
            "groups": [{"group": g.group, "linears": len(g.linears), "error": g.error, "bytes": g.bytes,
                        **({"dynamic_error": g.dynamic_error} if self.static else {})} for g in self.groups],
        }
        if self.static:
            out.update(activation_scheme="static", static_ignored_layers=self.static_ignored_layers)
        return out

    def table(self, top: int = 20) -> str:
        static = self.static
        lines = [f"{self.class_name}: {self.calls} recorded calls; every eligible Linear in FP8"
                 f"{' with static activations' if static else ''}: relative L2 error {self.all_fp8_error:.4f}", "",
                 f"  {'group (quantized alone)':<44} {'Linears':>7} " +
                 (f"{'static':>8} {'dynamic':>8} {'static adds':>11}" if static else f"{'error':>8} {'weights':>10}")]
        for g in self.groups[:top]:
            rest = (f"{g.dynamic_error:>8.4f} {g.static_cost:>+11.4f}" if static else f"{g.bytes / 1e6:>7.2f} MB")
            lines.append(f"  {g.group:<44} {len(g.linears):>7} {g.error:>8.4f} {rest}")
        if len(self.groups) > top:
            lines.append(f"  ... {len(self.groups) - top} more groups")
        suggested = self.static_ignored_layers if static else self.ignored_layers
        if suggested is not None:
            kept = ", ".join(suggested) or "(none)"
            lines += ["", (f"Suggested static_ignored_layers (kept dynamic): {kept}" if static
                           else f"Suggested ignored_layers: {kept}"),
                      f"  error with them {'dynamic' if static else 'in high precision'}: {self.suggested_error:.4f} "
                      f"(bound {self.max_error})"]
        return "\n".join(lines)


def group_of(linear_name: str) -> str:
    """The group a Linear belongs to: ``<blocks>.<i>.<child>`` inside a block list, else the
    top-level module (``transformer_blocks.3.img_mlp``, ``layers.2.attention``, ``img_in``)."""
    parts = linear_name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:3])
    return parts[0]


def candidates(model: nn.Module, config: Fp8Config) -> dict[str, list[str]]:
    """Groups of the Linears FP8 could take under ``config`` (its patterns, no preset)."""
    decisions = decide_linears(model, dataclasses.replace(config, preset="none")).decisions
    groups: dict[str, list[str]] = {}
    for name, decision in decisions.items():
        if decision.quantized:
            groups.setdefault(group_of(name), []).append(name)
    return groups


def sensitivity(
    model: nn.Module,
    calls: Sequence[Mapping[str, Any]],
    config: Fp8Config | Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
) -> SensitivityReport:
    """Quantize each group of Linears alone and measure how far the outputs move.

    ``model`` is the high-precision transformer (left as it was), ``calls`` its recorded
    forward inputs (``load_inputs``). The error of a variant is the relative L2 distance of its
    outputs from the unquantized model's, averaged over the calls.
    """
    return _sensitivity(model, calls, Fp8Config.coerce(config), progress)[0]


def suggest(
    model: nn.Module,
    calls: Sequence[Mapping[str, Any]],
    config: Fp8Config | Mapping[str, Any] | None = None,
    *,
    max_error: float = DEFAULT_MAX_ERROR,
    progress: bool = True,
) -> SensitivityReport:
    """The smallest set of groups (greedily, worst first) to keep in high precision so that the
    rest in FP8 stays within ``max_error``; ``report.ignored_layers`` are patterns for
    ``Fp8Config(ignored_layers=...)`` and ``omni-convert --ignored-layers``."""
    config = Fp8Config.coerce(config)
    report, reference, scales = _sensitivity(model, calls, config, progress)
    kept: list[str] = []
    error = report.all_fp8_error
    for damage in report.groups:
        if error <= max_error or (report.static and damage.static_cost <= 0):
            break  # (static: the rest lose nothing to static activations; the bound needs --ignored-layers)
        kept.append(damage.group)
        if report.static:  # the group stays FP8, its activations dynamic
            names = [n for g in report.groups for n in g.linears]
            dynamic = {n for g in report.groups if g.group in kept for n in g.linears}
            error = _error_with(model, calls, names, config, reference,
                                {n: v for n, v in scales.items() if n not in dynamic})
        else:
            names = [n for g in report.groups if g.group not in kept for n in g.linears]
            error = _error_with(model, calls, names, config, reference, scales)
    if report.static:
        report.ignored_layers, report.static_ignored_layers = [], kept
    else:
        report.ignored_layers = kept
    report.suggested_error, report.max_error = error, max_error
    return report


def _sensitivity(
    model: nn.Module, calls: Sequence[Mapping[str, Any]], config: Fp8Config, progress: bool
) -> tuple[SensitivityReport, list[torch.Tensor], dict[str, torch.Tensor]]:
    from tqdm.auto import tqdm

    groups = candidates(model, config)
    static = config.activation_scheme == "static"
    # Checked before anything runs: the calibration must be this model's, its amaxes usable.
    scales = static_input_scales(config, linear_shapes(model), decide_linears(model, dataclasses.replace(
        config, preset="none")).decisions, type(model).__name__)
    reference = _replay(model, calls)
    all_error = _error_with(model, calls, [n for names in groups.values() for n in names], config, reference, scales)
    report = SensitivityReport(type(model).__name__, len(calls), all_error, static=static)
    for group, names in tqdm(groups.items(), desc="Sensitivity", disable=not progress):
        weights = [model.get_submodule(n).weight for n in names]
        dynamic = _error_with(model, calls, names, config, reference) if static else None
        report.groups.append(GroupDamage(group, names, _error_with(model, calls, names, config, reference, scales),
                                         sum(w.numel() * w.element_size() for w in weights), dynamic))
    report.groups.sort(key=lambda g: -(g.static_cost if static else g.error))
    return report, reference, scales


def _error_with(model: nn.Module, calls: Sequence[Mapping[str, Any]], names: Sequence[str], config: Fp8Config,
                reference: Sequence[torch.Tensor], scales: Mapping[str, torch.Tensor] | None = None) -> float:
    """The output error with these Linears in FP8 (and the model restored afterwards); those in
    ``scales`` with static activations, at that input scale."""
    with _fp8(model, names, config, scales or {}):
        return _error(_replay(model, calls), reference)


@contextmanager
def _fp8(model: nn.Module, names: Sequence[str], config: Fp8Config,
         scales: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Swap these Linears for ``Fp8Linear`` for the duration, then put the originals back."""
    originals = {n: model.get_submodule(n) for n in names}
    try:
        for name, linear in originals.items():
            scale = scales.get(name)
            scale = None if scale is None else scale.to(linear.weight.device)
            model.set_submodule(name, Fp8Linear.from_linear(linear, config.weight_block_size,
                                                            per_channel=config.weight_strategy == "channel",
                                                            input_scale=scale))
        yield
    finally:
        for name, linear in originals.items():
            model.set_submodule(name, linear)


@torch.no_grad()
def _replay(model: nn.Module, calls: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    outputs = []
    for kwargs in calls:
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        kwargs.setdefault("return_dict", False)
        result = model(**kwargs)
        out = result[0] if isinstance(result, (tuple, list)) else getattr(result, "sample", result)
        if isinstance(out, (list, tuple)):  # Z-Image returns one tensor per image
            out = torch.stack(list(out))
        outputs.append(out.float().cpu())
    return outputs


def _error(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    return float(sum((o - r).norm() / r.norm() for o, r in zip(outputs, reference)) / len(reference))
