"""Which tensors become FP8, which stay as they are, and why.

The decision comes from the model, not from tensor names: the diffusers class named in
``config.json`` is built on the meta device (no memory) and its ``nn.Linear`` modules are the
candidates; what the plan reads from it (``ModelStructure``) is cached, so a config built before
needs no diffusers import (``structure.py``). A Linear weight is quantized when both its dims are multiples of 16 (what FP8 GEMMs
accept) and no ``ignored_layers`` pattern matches it. Every other tensor is kept, with a reason
the manifest records: ``ignored:<pattern>``, ``dtype-read`` (the model's code reads the weight's dtype), ``unaligned`` or
``not-linear``.

``plan_linears`` is the decision itself and serves the runtime loader too, so a model quantized
while loading makes exactly the converter's choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import ConfigError, ModelMismatchError, PatternMatchError, UnsupportedSourceError
from .numerics import FP8_DTYPE, HIGH_PRECISION_DTYPES, block_scale_shape
from .options import ALIGNMENT, DEFAULT_TARGET, Fp8Config, parse_dtype, parse_target
from .presets import Preset, resolve_preset
from .safetensors_format import TensorInfo
from .source import Source, open_source
from .structure import ModelStructure, load_cached, store
from .targets import FUSED_BLOCK_SHAPE, FUSED_GROUP, KEPT_BY_TARGET, TargetRules, fused_groups, rules_for

__all__ = [
    "LayerPattern",
    "compile_patterns",
    "LinearDecision",
    "plan_linears",
    "decide_linears",
    "LinearPlan",
    "linear_shapes",
    "dtype_read_linears",
    "meta_model",
    "empty_model",
    "ModelStructure",
    "model_structure",
    "structure_of",
    "OutputTensor",
    "TensorPlan",
    "Plan",
    "make_plan",
    "check_tensors_match",
    "checkpoint_quantization_config",
    "apply_target",
    "encoder_linears",
    "static_input_scales",
]

FP8_TENSOR, FP8_CHANNEL, FP8_BLOCK, KEPT = "fp8_tensor", "fp8_channel", "fp8_block", "kept"
NOT_LINEAR, UNALIGNED, DTYPE_READ = "not-linear", "unaligned", "dtype-read"

# vllm-omni fuses these projections into one Linear; users write the fused names in its configs.
ALIASES: Mapping[str, tuple[str, ...]] = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "add_kv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "w13": ("w1", "w3"),
}


@dataclass(frozen=True)
class LayerPattern:
    """One ``ignored_layers`` entry, compiled.

    A plain pattern is a dot-separated run of name components that must appear, whole and in
    order, somewhere in the module name; fused aliases expand per component. ``re:`` patterns
    are ``re.search``-ed against the full module name.
    """

    text: str
    regex: re.Pattern[str] | None = None
    sequences: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def parse(cls, text: str) -> LayerPattern:
        if text.startswith("re:"):
            if not text[3:]:
                raise ConfigError(
                    "ignored_layers pattern 're:' has an empty regex, which would keep every layer; "
                    "write the regex after 're:' (re:.* if every layer is really meant)."
                )
            try:
                return cls(text=text, regex=re.compile(text[3:]))
            except re.error as e:
                raise ConfigError(f"ignored_layers pattern {text!r} is not a valid regex: {e}.") from e
        parts = text.split(".")
        if not all(parts):
            raise ConfigError(
                f"ignored_layers pattern {text!r} has an empty name component; write e.g. 'img_mlp' "
                "or 'attn.to_q', or use 're:' for a regex."
            )
        sequences: list[tuple[str, ...]] = [()]
        for part in parts:
            sequences = [seq + (alt,) for seq in sequences for alt in ALIASES.get(part, (part,))]
        return cls(text=text, sequences=tuple(sequences))

    def matches(self, module_name: str) -> bool:
        if self.regex is not None:
            return self.regex.search(module_name) is not None
        components = module_name.split(".")
        for seq in self.sequences:
            n = len(seq)
            if any(tuple(components[i : i + n]) == seq for i in range(len(components) - n + 1)):
                return True
        return False


def compile_patterns(texts: Iterable[str]) -> tuple[LayerPattern, ...]:
    return tuple(LayerPattern.parse(t) for t in texts)


@dataclass(frozen=True)
class LinearDecision:
    """What happens to one Linear: ``fp8_tensor``, ``fp8_channel``, ``fp8_block`` or ``kept`` (with the reason)."""

    scheme: str
    reason: str | None = None

    @property
    def quantized(self) -> bool:
        return self.scheme != KEPT


def plan_linears(
    shapes: Mapping[str, tuple[int, int]],
    config: Fp8Config,
    patterns: Iterable[str],
    *,
    class_name: str = "the model",
    dtype_read: Iterable[str] = (),
) -> dict[str, LinearDecision]:
    """Decide every Linear: ``shapes`` maps module name -> (out_features, in_features).

    ``dtype_read`` names Linears whose weight dtype the model's own code reads (see
    ``dtype_read_linears``); they stay high precision whatever the patterns say. Raises
    ``PatternMatchError`` if a pattern matches none of the Linears, listing the closest names, so
    a typo cannot silently quantize a layer the user meant to keep.
    """
    dtype_read = set(dtype_read)
    compiled = compile_patterns(patterns)
    hits = {p.text: 0 for p in compiled}
    decisions: dict[str, LinearDecision] = {}
    for name, (out_features, in_features) in shapes.items():
        matching = [p.text for p in compiled if p.matches(name)]
        for text in matching:
            hits[text] += 1
        if matching:
            decisions[name] = LinearDecision(KEPT, f"ignored:{matching[0]}")
        elif name in dtype_read:
            decisions[name] = LinearDecision(KEPT, DTYPE_READ)
        elif out_features % ALIGNMENT or in_features % ALIGNMENT:
            decisions[name] = LinearDecision(KEPT, UNALIGNED)
        else:
            decisions[name] = LinearDecision(config.scheme)
    unmatched = [text for text, n in hits.items() if n == 0]
    if unmatched:
        raise PatternMatchError(_unmatched_message(unmatched[0], shapes, class_name))
    return decisions


def _unmatched_message(pattern: str, shapes: Mapping[str, Any], class_name: str) -> str:
    names = list(shapes)
    components = sorted({c for n in names for c in n.split(".") if not c.isdigit()})
    probe = pattern[3:] if pattern.startswith("re:") else pattern.split(".")[-1]
    close = difflib.get_close_matches(probe, components, n=4, cutoff=0.5)
    close += [n for n in difflib.get_close_matches(pattern, names, n=2, cutoff=0.6)]
    hint = f"closest names: {', '.join(close)}" if close else f"Linear layers include: {', '.join(names[:4])}"
    return (
        f"ignored_layers pattern {pattern!r} matches no Linear layer of {class_name}; {hint}. "
        "A plain pattern matches whole name components (img_mlp, attn.to_q); 're:' takes a regex."
    )


class LinearPlan(NamedTuple):
    """Every Linear of a model decided: shapes, decisions, and the preset and patterns behind them."""

    shapes: dict[str, tuple[int, int]]
    decisions: dict[str, LinearDecision]
    preset: Preset | None
    ignored_layers: tuple[str, ...]


def decide_linears(
    model: nn.Module | ModelStructure, config: Fp8Config, *, class_name: str | None = None
) -> LinearPlan:
    """The decisions for ``model`` under ``config``: the preset of its class, the patterns,
    alignment and the layers whose dtype its forward reads. The converter, the loader,
    ``quantize_`` and the sensitivity study all decide through here."""
    structure = model if isinstance(model, ModelStructure) else structure_of(model)
    class_name = class_name or structure.class_name
    config = Fp8Config.coerce(config)
    preset = resolve_preset(config.preset, class_name)
    ignored = tuple(dict.fromkeys((*(preset.ignored_layers if preset else ()), *config.ignored_layers)))
    shapes = dict(structure.linears)
    decisions = plan_linears(shapes, config, ignored, class_name=class_name, dtype_read=structure.dtype_read)
    return LinearPlan(shapes, decisions, preset, ignored)


# ``self.mlp[0].weight.dtype`` and the like, in a module's forward.
_WEIGHT_DTYPE_READ = re.compile(r"self\.(\w+(?:\.\w+|\[\d+\])*)\.weight\.dtype")


def dtype_read_linears(model: nn.Module) -> set[str]:
    """Linears whose weight dtype the model's forward reads, found in the model's source code.

    Z-Image's timestep embedder casts its input to ``self.mlp[0].weight.dtype``: with an FP8
    weight the input would become FP8 and the forward would fail. Such layers must stay high
    precision whatever the user's patterns say, so the plan keeps them with reason ``dtype-read``.
    """
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = set()
    for name, module in model.named_modules():
        for path in _weight_dtype_reads(type(module)):
            target = f"{name}.{path}" if name else path
            if target in linears:
                found.add(target)
    return found


@functools.lru_cache(maxsize=None)
def _weight_dtype_reads(cls: type) -> tuple[str, ...]:
    try:
        code = inspect.getsource(cls.forward)
    except (OSError, TypeError, AttributeError):
        return ()
    return tuple(re.sub(r"\[(\d+)\]", r".\1", m) for m in _WEIGHT_DTYPE_READ.findall(code))


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features) for every ``nn.Linear`` (subclasses included).

    Inside a LoRA-wrapped layer (a module with a ``base_layer``, as peft makes them) only the
    base layer counts: the adapters' own small Linears stay in their dtype.
    """
    wrappers = [name for name, m in model.named_modules() if isinstance(getattr(m, "base_layer", None), nn.Module)]
    shapes = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        owner = next((w for w in wrappers if name.startswith(w + ".")), None)
        if owner is None or name == f"{owner}.base_layer":
            shapes[name] = (m.out_features, m.in_features)
    return shapes


def structure_of(model: nn.Module, class_name: str | None = None) -> ModelStructure:
    """What the plan reads from ``model``: its tensors' shapes, its Linears, the dtype-read ones."""
    return ModelStructure(
        class_name=class_name or type(model).__name__,
        tensors={name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()},
        linears=linear_shapes(model),
        dtype_read=frozenset(dtype_read_linears(model)),
    )


def model_structure(class_name: str, config: Mapping[str, Any]) -> ModelStructure:
    """The structure of the diffusers class named in ``config.json``, built from ``config``.

    Read from the cache when this exact config was built before by the same code (see
    ``structure.py``), which spares importing diffusers; otherwise built on the meta device and
    remembered. Errors are ``meta_model``'s: a config that fails to build is never cached.
    """
    config = {k: v for k, v in config.items() if k != "quantization_config"}  # the build ignores it
    cached = load_cached(class_name, config)
    if cached is not None:
        return cached
    model = meta_model(class_name, config)
    structure = structure_of(model, class_name)
    store(class_name, config, structure, {type(m) for m in model.modules()})
    return structure


def meta_model(class_name: str, config: Mapping[str, Any]) -> nn.Module:
    """Build the diffusers class named in ``config.json`` on the meta device: structure, no memory."""
    return _construct(class_name, config, torch.device("meta"))


def empty_model(class_name: str, config: Mapping[str, Any]) -> nn.Module:
    """Build the model with every parameter on the meta device but real buffers.

    Buffers and plain tensors a model computes in ``__init__`` (rotary tables, say) are not in
    checkpoints, so they must exist for real; parameters are filled in by the loader.
    """
    return _construct(class_name, config, _parameters_on_meta())


def _construct(class_name: str, config: Mapping[str, Any], context: Any) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module) or not hasattr(cls, "from_config"):
        raise UnsupportedSourceError(
            f"config.json names {class_name!r}, which is not a model class of diffusers "
            f"{diffusers.__version__}; upgrade diffusers, or check that this is a diffusers transformer."
        )
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    previous = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()  # from_config warns about every key it does not use
    try:
        with context:
            return cls.from_config(config)
    except Exception as e:  # a malformed config surfaces as anything from the model's __init__
        raise UnsupportedSourceError(
            f"could not build {class_name} from config.json ({type(e).__name__}: {e}); "
            "the config is malformed or needs a newer diffusers."
        ) from e
    finally:
        diffusers.logging.set_verbosity(previous)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While building a model, move each parameter to the meta device as it is registered.

    ``torch.empty`` reserves but never touches memory, so building a 20B-parameter model this way
    costs no RAM; initialisers then run on meta tensors and do nothing.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class TensorPlan:
    """One source tensor's fate and the output tensors it becomes."""

    source: TensorInfo
    scheme: str
    reason: str | None = None
    out_dtype: torch.dtype | None = None  # for kept tensors: the dtype written
    block_size: tuple[int, int] | None = None
    scale_group: str | None = None  # the engine's fused Linear whose parts share this weight's scale
    input_scale: float | None = None  # static activations: the calibrated scale (a float32 value)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def per_channel(self) -> bool:
        return self.scheme == FP8_CHANNEL

    @property
    def scale_name(self) -> str | None:
        if self.scheme in (FP8_TENSOR, FP8_CHANNEL):
            return self.name + "_scale"
        if self.scheme == FP8_BLOCK:
            return self.name + "_scale_inv"
        return None

    @property
    def input_scale_name(self) -> str | None:
        """``X.input_scale`` beside ``X.weight``, as vLLM names a static activation scale."""
        return None if self.input_scale is None else self.name.removesuffix(".weight") + ".input_scale"

    @property
    def outputs(self) -> tuple[OutputTensor, ...]:
        shape = self.source.shape
        static = () if self.input_scale is None else (OutputTensor(self.input_scale_name, torch.float32, ()),)
        if self.scheme == FP8_TENSOR:
            return (OutputTensor(self.name, FP8_DTYPE, shape), OutputTensor(self.scale_name, torch.float32, ()),
                    *static)
        if self.scheme == FP8_CHANNEL:
            return (OutputTensor(self.name, FP8_DTYPE, shape),
                    OutputTensor(self.scale_name, torch.float32, (shape[0], 1)), *static)
        if self.scheme == FP8_BLOCK:
            grid = block_scale_shape(shape, self.block_size)
            return (OutputTensor(self.name, FP8_DTYPE, shape), OutputTensor(self.scale_name, torch.float32, grid),
                    *static)
        return (OutputTensor(self.name, self.out_dtype or self.source.torch_dtype, shape),)


@dataclass(frozen=True)
class Plan:
    """The whole conversion, decided before a byte is read: see ``make_plan``."""

    source: Source
    config: Fp8Config
    preset: Preset | None
    ignored_layers: tuple[str, ...]
    linears: Mapping[str, LinearDecision]
    tensors: tuple[TensorPlan, ...]
    dtype: torch.dtype | None = None
    target: str = DEFAULT_TARGET
    fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    encoder_ignored: tuple[str, ...] = ()
    static: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # module -> input_scale

    @property
    def dynamic_linears(self) -> list[str]:
        """FP8 Linears whose activations stay dynamic although the scheme is static."""
        if self.config.activation_scheme != "static":
            return []
        return [name for name, d in self.linears.items() if d.quantized and name not in self.static]

    @property
    def scale_groups(self) -> dict[str, tuple[TensorPlan, ...]]:
        """Fused Linear -> the weights that share its one scale (per-tensor FP8 parts only)."""
        groups: dict[str, list[TensorPlan]] = {}
        for t in self.tensors:
            if t.scale_group is not None:
                groups.setdefault(t.scale_group, []).append(t)
        return {name: tuple(parts) for name, parts in groups.items()}

    @property
    def pattern_hits(self) -> dict[str, int]:
        """How many Linears each pattern keeps (the first matching pattern gets the credit)."""
        hits = dict.fromkeys(self.ignored_layers, 0)
        for d in self.linears.values():
            if d.reason and d.reason.startswith("ignored:"):
                hits[d.reason[len("ignored:") :]] += 1
        return hits

    @property
    def kept_linears(self) -> list[str]:
        return [name for name, d in self.linears.items() if not d.quantized]

    @property
    def source_bytes(self) -> int:
        return sum(t.source.nbytes for t in self.tensors)

    @property
    def output_bytes(self) -> int:
        return sum(o.nbytes for t in self.tensors for o in t.outputs)

    def quantization_config(self) -> dict[str, Any]:
        """The ``quantization_config`` block of the output config.json, in vLLM's fp8 convention."""
        ignored = self.kept_linears
        if self.target == "vllm-omni":  # its names too: it matches ignored_layers by exact fused name
            kept = set(ignored)
            ignored += [name for name, parts in self.fused.items() if all(p in kept for p in parts)]
            ignored += list(self.encoder_ignored)
        return checkpoint_quantization_config(self.config, ignored, self.dynamic_linears)

    def options(self) -> dict[str, Any]:
        """The options as resolved: the user's, the preset applied, for the manifest."""
        out = self.config.to_dict()
        out["preset"] = self.preset.name if self.preset else "none"
        out["ignored_layers"] = list(self.ignored_layers)
        out["dtype"] = _dtype_label(self.dtype)
        out["target"] = self.target
        return out

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for t in self.tensors:
            counts[t.scheme] = counts.get(t.scheme, 0) + 1
            if t.reason:
                reasons[t.reason] = reasons.get(t.reason, 0) + 1
        quantized = sum(t.source.nbytes for t in self.tensors if t.scheme != KEPT)
        return {
            "class_name": self.source.class_name,
            "target": self.target,
            "preset": self.preset.name if self.preset else None,
            "ignored_layers": list(self.ignored_layers),
            "pattern_hits": self.pattern_hits,
            "weight_block_size": list(self.config.weight_block_size) if self.config.weight_block_size else None,
            "weight_strategy": self.config.weight_strategy,
            "tensors": len(self.tensors),
            "schemes": counts,
            "kept_reasons": reasons,
            "linears": len(self.linears),
            "linears_quantized": sum(d.quantized for d in self.linears.values()),
            "source_bytes": self.source_bytes,
            "quantized_source_bytes": quantized,
            "output_bytes": self.output_bytes,
        }


def checkpoint_quantization_config(
    config: Fp8Config, kept_linears: Iterable[str], dynamic_linears: Iterable[str] = ()
) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for FP8 weights made with ``config``, vLLM's way.

    ``ignored_layers`` lists the Linear modules kept in high precision by name, whatever the
    patterns, presets or alignment that kept them; readers match names, not our patterns. With
    static activations, FP8 Linears left dynamic (no ``input_scale``) are listed by name under
    ``static_ignored_layers`` (only when there are any). Per-row weight scales are not in vLLM's
    fp8 method: ``weight_strategy: "channel"`` says so (their ``[N, 1]`` shape says it too, which
    is what readers check).
    """
    block = config.weight_block_size
    out = {
        "quant_method": "fp8",
        "activation_scheme": config.activation_scheme,
        "weight_block_size": list(block) if block else None,
        "ignored_layers": list(kept_linears),
        "is_checkpoint_fp8_serialized": True,
    }
    if config.weight_strategy == "channel":
        out["weight_strategy"] = "channel"
    dynamic = list(dynamic_linears)
    if dynamic:
        out["static_ignored_layers"] = dynamic
    return out


def static_input_scales(
    config: Fp8Config, shapes: Mapping[str, tuple[int, int]], decisions: Mapping[str, LinearDecision], class_name: str
) -> dict[str, torch.Tensor]:
    """Each FP8 Linear's static ``input_scale`` (0-dim float32), from ``config.calibration``.

    Empty for dynamic activations. FP8 Linears matched by ``static_ignored_layers`` stay dynamic
    (a pattern matching none of them is an error, as for ``ignored_layers``). The calibration must
    be this model's (names and input widths), and every static Linear's amax finite and positive.
    """
    if config.activation_scheme != "static":
        return {}
    if config.calibration is None:
        raise ConfigError(
            "activation_scheme 'static' needs a calibration: record inputs (omni_fp8.record_inputs), run "
            "omni-convert calibrate SRC --inputs FILE --output scales.safetensors, then pass --calibration "
            "scales.safetensors (calibration= in Python); or use 'dynamic'."
        )
    fp8 = {name: shapes[name] for name, d in decisions.items() if d.quantized}
    dynamic = set()
    if config.static_ignored_layers:
        patterns = compile_patterns(config.static_ignored_layers)
        for p in patterns:
            hits = [name for name in fp8 if p.matches(name)]
            if not hits:
                message = _unmatched_message(p.text, fp8, class_name).replace("ignored_layers", "static_ignored_layers")
                raise PatternMatchError(message.replace("matches no Linear layer", "matches no FP8 Linear layer"))
            dynamic.update(hits)
    static = [name for name in fp8 if name not in dynamic]
    config.calibration.check_model(shapes, class_name, static)
    return {name: config.calibration.input_scale(name) for name in static}


def _dtype_label(dtype: torch.dtype | None) -> str:
    return "keep" if dtype is None else str(dtype).removeprefix("torch.")


def make_plan(
    source: Source | str | os.PathLike[str],
    config: Fp8Config | Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    model: nn.Module | ModelStructure | None = None,
    target: str | None = None,
) -> Plan:
    """Decide every tensor of ``source`` under ``config``.

    Args:
        dtype: Cast the tensors that stay high precision to this dtype (``torch.bfloat16``);
            ``None`` keeps each tensor's own dtype, byte for byte.
        model: The model already built from ``source.config`` (the loader has one); by default
            its structure, from the cache or built on the meta device (``model_structure``).
        target: The engine the output is for (``omni-fp8``, the default; ``vllm-omni``,
            ``comfyui``, ``diffusers``): its rules adjust the decisions (see ``targets.py``).
    """
    if not isinstance(source, Source):
        source = open_source(source)  # a path, for convenience
    config = Fp8Config.coerce(config)
    dtype = parse_dtype(dtype)
    target = parse_target(target, weight_block_size=config.weight_block_size, weight_strategy=config.weight_strategy)
    if model is None:
        structure = model_structure(source.class_name, source.config)
    else:
        structure = model if isinstance(model, ModelStructure) else structure_of(model, source.class_name)
    check_tensors_match(source, structure)  # first: a wrong config must not surface as a pattern error
    shapes, decisions, preset, ignored = decide_linears(structure, config, class_name=source.class_name)
    rules = rules_for(target, source.class_name)
    decisions, fused = apply_target(target, rules, shapes, decisions, config.weight_block_size)
    shared = {part: name for name, parts in fused.items() for part in parts
              if config.weight_strategy == "tensor" and decisions[part].quantized}
    if config.activation_scheme == "static" and target != DEFAULT_TARGET:
        raise ConfigError(
            f"--target {target} with static activations: omni-fp8 writes calibrated input scales for "
            f"--target {DEFAULT_TARGET} only; use --activation-scheme dynamic for {target}."
        )
    static = static_input_scales(config, shapes, decisions, source.class_name)
    encoder = _encoder_linears(source, rules, target) if rules.encoder else ()

    weight_of = {f"{name}.weight": name for name in shapes}
    plans = []
    for info in source.tensors:
        module = weight_of.get(info.name)
        if module is None:
            plans.append(_kept(info, NOT_LINEAR, dtype))
            continue
        if info.torch_dtype not in HIGH_PRECISION_DTYPES:
            raise UnsupportedSourceError(
                f"{info.file}: {info.name} is {info.dtype}; only BF16, FP16 and FP32 weights are quantized."
            )
        decision = decisions[module]
        if decision.quantized:
            scale = static.get(module)
            plans.append(TensorPlan(info, decision.scheme, block_size=config.weight_block_size,
                                    scale_group=shared.get(module),
                                    input_scale=None if scale is None else float(scale)))
        else:
            plans.append(_kept(info, decision.reason, dtype))
    return Plan(
        source=source,
        config=config,
        preset=preset,
        ignored_layers=ignored,
        linears=decisions,
        tensors=tuple(plans),
        dtype=dtype,
        target=target,
        fused=fused,
        encoder_ignored=encoder,
        static=static,
    )


def apply_target(
    target: str,
    rules: TargetRules,
    shapes: Mapping[str, tuple[int, int]],
    decisions: Mapping[str, LinearDecision],
    block_size: tuple[int, int] | None,
) -> tuple[dict[str, LinearDecision], dict[str, tuple[str, ...]]]:
    """The decisions adjusted to ``target``'s engine, and its fused Linears (fused name -> parts).

    Layers the engine never quantizes are kept; a fused Linear is all FP8 or all kept (a part
    kept for any reason keeps its siblings); with block scales, a fused Linear whose parts do
    not span whole blocks of rows is kept. Reasons already given (a user pattern) stay.
    """
    out = dict(decisions)
    patterns = compile_patterns(rules.keeps)
    for name, decision in out.items():
        if decision.quantized and any(p.matches(name) for p in patterns):
            out[name] = LinearDecision(KEPT, f"{KEPT_BY_TARGET}:{target}")
    fused = fused_groups(rules, shapes)
    for parts in fused.values():
        if all(out[p].quantized for p in parts):
            if block_size is not None and rules.fused_block_rows and any(
                shapes[p][0] % block_size[0] for p in parts[:-1]
            ):
                for p in parts:
                    out[p] = LinearDecision(KEPT, FUSED_BLOCK_SHAPE)
            continue
        for p in parts:
            if out[p].quantized:
                out[p] = LinearDecision(KEPT, FUSED_GROUP)
    return out, fused


def _encoder_linears(source: Source, rules: TargetRules, target: str) -> tuple[str, ...]:
    """The Linears of the pipeline component the engine applies the checkpoint's FP8 config to.

    vllm-omni builds Z-Image's Qwen3 text encoder with every ``nn.Linear`` replaced by a vLLM
    Linear under the transformer's quantization config (``create_transformers_model``), named
    from the encoder's root (``model.layers.0.self_attn.q_proj``, ``lm_head``); listing them in
    ``ignored_layers`` keeps its BF16 weights BF16.
    """
    folder = source.root / rules.encoder if source.kind == "pipeline" else None
    if folder is None or not (folder / "config.json").is_file():
        raise ConfigError(
            f"{source.root}: --target {target} for {source.class_name} must list the pipeline's {rules.encoder} "
            f"Linears as ignored ({target} applies the transformer's FP8 config to that encoder too), and this "
            f"source has no {rules.encoder}/config.json; convert the pipeline folder instead of the transformer alone."
        )
    return encoder_linears(folder)


def encoder_linears(folder: os.PathLike[str] | str) -> tuple[str, ...]:
    """Every ``nn.Linear`` of the transformers causal LM whose config.json is in ``folder``, built on meta."""
    folder = os.fspath(folder)
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(
            f"{folder}: listing the text encoder's Linears needs transformers to build it; pip install transformers."
        ) from e
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            encoder = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:  # a malformed or unknown config surfaces as anything from transformers
        raise UnsupportedSourceError(
            f"{folder}/config.json: could not build the text encoder to list its Linears "
            f"({type(e).__name__}: {e}); check the config or upgrade transformers.",
            path=folder,
        ) from e
    return tuple(name for name, m in encoder.named_modules() if isinstance(m, nn.Linear))


def check_tensors_match(source: Source, model: nn.Module | ModelStructure) -> None:
    """Every tensor the model loads is in the checkpoint with the model's shape, and nothing else is.

    Checked before anything is read or written: a config.json that does not describe the weights
    (one block too few, a bias of shape [0]) would otherwise convert "successfully" into a folder
    that no loader accepts.
    """
    if isinstance(model, ModelStructure):
        expected = dict(model.tensors)
    else:
        expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    infos = {t.name: t for t in source.tensors}
    cls = source.class_name
    extra = [n for n in infos if n not in expected]
    if extra:
        raise ModelMismatchError(
            f"{source.model_dir}: the checkpoint has {len(extra)} tensor(s) that {cls} built from config.json "
            f"does not ({_first(extra)}){_count_hint(infos, expected)}; config.json does not match the weights.",
            path=source.model_dir,
        )
    for name, info in infos.items():
        if info.shape != expected[name]:
            raise ModelMismatchError(
                f"{info.file}: {name} has shape {list(info.shape)} but {cls} built from config.json expects "
                f"{list(expected[name])}; the config does not match the weights (or the file is damaged).",
                path=info.file,
            )
    missing = [n for n in expected if n not in infos]
    if missing:
        raise ModelMismatchError(
            f"{source.model_dir}: the checkpoint lacks {len(missing)} tensor(s) of {cls} ({_first(missing)})"
            f"{_count_hint(infos, expected)}; it is incomplete, or config.json describes another model.",
            path=source.model_dir,
        )


def _first(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", and {len(names) - 3} more" if len(names) > 3 else "")


_INDEXED = re.compile(r"^(.+?)\.(\d+)\.")


def _count_hint(checkpoint: Iterable[str], model: Iterable[str]) -> str:
    """``: the checkpoint has 2 transformer_blocks, the config builds 1`` where block counts differ."""

    def counts(names: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in names:
            m = _INDEXED.match(name)
            if m:
                out[m.group(1)] = max(out.get(m.group(1), 0), int(m.group(2)) + 1)
        return out

    have, built = counts(checkpoint), counts(model)
    for prefix in sorted(set(have) | set(built)):
        if have.get(prefix, 0) != built.get(prefix, 0):
            return f": the checkpoint has {have.get(prefix, 0)} {prefix}, config.json builds {built.get(prefix, 0)}"
    return ""


def _kept(info: TensorInfo, reason: str, dtype: torch.dtype | None) -> TensorPlan:
    out = dtype if dtype is not None and info.torch_dtype.is_floating_point else None
    return TensorPlan(info, KEPT, reason=reason, out_dtype=out)
