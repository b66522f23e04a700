"""TeaCache as a diffusers hook: skip every transformer block on steps whose input barely moved.

TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
arXiv:2411.19108) watches the first block's timestep-modulated input. Each call it adds the
relative L1 change of that input since the previous call, rescaled by a per-model polynomial
fitted to how much the blocks' output changes for a given input change, to an accumulator;
while the accumulator stays under ``rel_l1_thresh`` the blocks are skipped and their last
residual (output of the last block minus input of the first) is added instead. Crossing the
threshold computes the blocks and resets the accumulator. The first and the last call of a
generation always compute.

It is built from diffusers' own hook machinery (``diffusers.hooks``), as its First Block Cache
is: a leader hook on the first block decides (before that block runs, so the first block is
skipped too), the other blocks pass their inputs through while skipping, and the last block
records the residual. Decisions are made per cache context (QwenImagePipeline runs its
positive and negative prompts as ``cond`` / ``uncond``, each with its own history); pipelines
that set no context (ZImagePipeline batches both) share one. Under context parallelism each
rank sees its share of the tokens, so the L1 sums are all-reduced across the ranks before the
decision: every rank decides exactly what one GPU would, and none can enter the blocks'
collectives alone.

    >>> apply_teacache(pipe.transformer, TeaCacheConfig(rel_l1_thresh=0.2, num_inference_steps=50))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from omni_fp8.converter.errors import ConfigError
from omni_fp8.converter.options import refuse_unknown_keys
from torch import nn

__all__ = ["TeaCacheConfig", "apply_teacache", "remove_teacache", "teacache_counts", "COEFFICIENTS",
           "LEADER_HOOK", "BLOCK_HOOK"]

LEADER_HOOK = "omni_fp8_teacache_leader"
BLOCK_HOOK = "omni_fp8_teacache_block"

# The rescale polynomials, highest power first, per transformer class. Both come from vllm-omni's
# TeaCache table (vllm-project/vllm-omni, vllm_omni/diffusion/cache/teacache/config.py), so a
# threshold means the same here as in vllm-omni: Qwen-Image's is credited there to ComfyUI-TeaCache;
# for Z-Image that table reuses Qwen-Image's and says it is not tuned for Z-Image yet. They were
# fitted on BF16 models; pass ``coefficients`` to use a polynomial fitted on your FP8 model.
COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "QwenImageTransformer2DModel": (-450.0, 280.0, -45.0, 3.2, -0.02),
    "ZImageTransformer2DModel": (-450.0, 280.0, -45.0, 3.2, -0.02),
}


@dataclasses.dataclass(frozen=True)
class TeaCacheConfig:
    """How eagerly TeaCache skips.

    Args:
        rel_l1_thresh: Skip while the accumulated rescaled change stays below this. 0 never skips;
            vllm-omni suggests 0.2 (about 1.5x) to 0.6 (about 2x, with visible changes).
        coefficients: The rescale polynomial, highest power first; ``None`` takes the model's from
            ``COEFFICIENTS``.
        num_inference_steps: Steps per generation, so the last is always computed. ``Omni`` sets
            it for every call; a pipeline that passes it in its cache context overrides it.
    """

    rel_l1_thresh: float = 0.2
    coefficients: tuple[float, ...] | None = None
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        thresh = self.rel_l1_thresh
        if isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not math.isfinite(thresh) or thresh < 0:
            raise ConfigError(f"tea_cache rel_l1_thresh must be a finite number >= 0, got {thresh!r}.")
        if self.coefficients is not None:
            values = self.coefficients
            if (isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values
                    or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                               for c in values)):
                raise ConfigError(f"tea_cache coefficients must be a list of finite numbers, highest power first, "
                                  f"got {values!r}.")
            object.__setattr__(self, "coefficients", tuple(float(c) for c in values))
        steps = self.num_inference_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"tea_cache num_inference_steps must be a positive integer, got {steps!r}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> TeaCacheConfig:
        """``cache_config`` as ``Omni`` and the CLI take it, unknown keys refused by name."""
        values = dict(values or {})
        refuse_unknown_keys(values, (f.name for f in dataclasses.fields(cls)), what="tea_cache")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class _Family:
    """What TeaCache needs to know about one model family's blocks."""

    blocks: str                                   # the ModuleList of blocks
    hidden: str                                   # the block argument carrying the image tokens
    encoder: str | None                           # the text-stream argument, for two-stream blocks
    indicator: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]  # block 0's modulated input

    def output_hidden(self, output: Any) -> torch.Tensor:
        return output[1] if self.encoder else output

    def encoder_of(self, arguments: Mapping[str, Any]) -> torch.Tensor | None:
        return arguments.get(self.encoder) if self.encoder else None

    def pack(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        return (encoder, hidden) if self.encoder else hidden


def _qwen_indicator(block: nn.Module, a: Mapping[str, Any]) -> torch.Tensor:
    """The image stream after ``img_norm1`` and the first shift/scale, as the block computes it."""
    shift_scale_gate = block.img_mod(a["temb"]).chunk(2, dim=-1)[0]
    modulated, _ = block._modulate(block.img_norm1(a["hidden_states"]), shift_scale_gate, a.get("modulate_index"))
    return modulated


def _z_image_indicator(block: nn.Module, a: Mapping[str, Any]) -> torch.Tensor:
    """The tokens after ``attention_norm1`` times the attention scale, as the block computes it."""
    adaln = a["adaln_input"] if a.get("adaln_input") is not None else a.get("adaln_noisy")
    if adaln is None:
        raise ConfigError("tea_cache needs Z-Image's first block to be modulated (adaln_input); this call has none.")
    scale_msa = 1.0 + block.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)[0]
    return block.attention_norm1(a["x"]) * scale_msa


FAMILIES: dict[str, _Family] = {
    "QwenImageTransformer2DModel": _Family("transformer_blocks", "hidden_states", "encoder_hidden_states",
                                           _qwen_indicator),
    "ZImageTransformer2DModel": _Family("layers", "x", None, _z_image_indicator),
}


class _State(BaseState):
    """One cache context's history."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.accumulated = 0.0
        self.previous: torch.Tensor | None = None  # the last call's indicator
        self.residual: torch.Tensor | None = None  # last computed blocks' output minus input, compute dtype
        self.head_input: torch.Tensor | None = None
        self.compute = True


class _Counts:
    """Calls computed and skipped since the hooks were applied (``reset_state`` leaves them)."""

    def __init__(self) -> None:
        self.computed = 0
        self.skipped = 0


class _LeaderHook(ModelHook):
    _is_stateful = True

    def __init__(self, root: nn.Module, family: _Family, config: TeaCacheConfig, coefficients: tuple[float, ...],
                 state_manager: StateManager, counts: _Counts, single_block: bool) -> None:
        super().__init__()
        self.root, self.family, self.config = root, family, config
        self.coefficients = coefficients
        self.state_manager, self.counts, self.single_block = state_manager, counts, single_block
        self.num_inference_steps = config.num_inference_steps
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.state_manager._context is None:  # a pipeline without cache contexts (ZImagePipeline)
            self.state_manager.set_context(CacheContext(name="teacache"))
        steps = self.state_manager._context.num_inference_steps or self.num_inference_steps
        state: _State = self.state_manager.get_state()
        if steps is not None and state.calls >= steps:  # a finished generation that was never reset
            state.reset()
        bound = self._signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        hidden = a[self.family.hidden]
        with torch.no_grad():
            indicator = self.family.indicator(module, a)
        state.compute = self._decide(state, indicator, last=steps is not None and state.calls == steps - 1)
        state.previous = indicator.detach()
        state.calls += 1
        if not state.compute:
            self.counts.skipped += 1
            return self.family.pack(hidden + state.residual, self.family.encoder_of(a))
        self.counts.computed += 1
        state.head_input = hidden
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.single_block:
            state.residual = _residual(self.family.output_hidden(output), hidden)
        return output

    def _decide(self, state: _State, indicator: torch.Tensor, *, last: bool) -> bool:
        if state.previous is None or state.residual is None or last:
            state.accumulated = 0.0
            return True
        previous = state.previous.float()
        change = torch.stack([(indicator.float() - previous).abs().sum(), previous.abs().sum()])
        group = _context_parallel_group(self.root)
        if group is not None:  # every rank holds part of the tokens: decide on all of them
            torch.distributed.all_reduce(change, group=group)
        numerator, denominator = change.tolist()
        relative = numerator / denominator if denominator > 0 else math.inf
        # |poly|: fitted polynomials turn negative outside the range they were fitted on, and a
        # negative step must not count as "no change" (vllm-omni takes the absolute value too).
        state.accumulated += abs(_polyval(self.coefficients, relative)) if math.isfinite(relative) else math.inf
        if state.accumulated < self.config.rel_l1_thresh:
            return False
        state.accumulated = 0.0
        return True

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


class _BlockHook(ModelHook):
    """A block after the first: computes or passes its input through, as the leader decided."""

    def __init__(self, family: _Family, state_manager: StateManager, is_tail: bool) -> None:
        super().__init__()
        self.family, self.state_manager, self.is_tail = family, state_manager, is_tail
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: _State = self.state_manager.get_state()
        if state.compute:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_tail:
                state.residual = _residual(self.family.output_hidden(output), state.head_input)
                state.head_input = None
            return output
        a = self._signature.bind(module, *args, **kwargs).arguments
        return self.family.pack(a[self.family.hidden], self.family.encoder_of(a))


def _residual(output: torch.Tensor, first_input: torch.Tensor) -> torch.Tensor:
    """What the blocks added, kept in the compute dtype (the hidden states'), never FP8."""
    return (output - first_input).detach().to(first_input.dtype)


def _polyval(coefficients: Sequence[float], x: float) -> float:
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def _context_parallel_group(root: nn.Module) -> Any:
    """The process group of the model's context parallelism, or ``None`` when it runs on one device."""
    config = getattr(root, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return mesh.get_group()


def apply_teacache(transformer: nn.Module, config: TeaCacheConfig | Mapping[str, Any] | None = None) -> None:
    """Register TeaCache's hooks on ``transformer`` (a Qwen-Image or Z-Image transformer).

    Its own entry point, beside diffusers' ``enable_cache`` (which accepts only diffusers' own
    configs): another cache already on the model is refused rather than stacked. Apply it before
    ``enable_parallelism``, so the context-parallel split hooks wrap it and it sees each rank's
    tokens, as its residuals are.
    """
    if not isinstance(config, TeaCacheConfig):
        config = TeaCacheConfig.from_dict(config)
    name = type(transformer).__name__
    family = FAMILIES.get(name)
    if family is None:
        raise ConfigError(f"tea_cache supports {', '.join(sorted(FAMILIES))}; {name} is not one of them.")
    coefficients = config.coefficients or COEFFICIENTS[name]
    refuse_second_cache(transformer, "tea_cache")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ConfigError("tea_cache must be applied before enable_parallelism: afterwards its hooks would see "
                          "whole inputs but each rank's share of the outputs.")
    blocks = list(getattr(transformer, family.blocks))
    state_manager = StateManager(_State)
    counts = _Counts()
    leader = _LeaderHook(transformer, family, config, coefficients, state_manager, counts, len(blocks) == 1)
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(leader, LEADER_HOOK)
    for index, block in enumerate(blocks[1:], start=1):
        hook = _BlockHook(family, state_manager, is_tail=index == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, BLOCK_HOOK)
    # A cache_context entered before these hooks existed would not reach them (INTEGRATION (d.3)).
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def remove_teacache(transformer: nn.Module) -> None:
    """Remove TeaCache's hooks (and its state) from ``transformer``."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(LEADER_HOOK, recurse=True)
    registry.remove_hook(BLOCK_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


def set_teacache_steps(transformer: nn.Module, num_inference_steps: int | None) -> None:
    """Tell the hooks how many steps the next generation has (the last one always computes)."""
    leader = _leader(transformer)
    if leader is not None:
        leader.num_inference_steps = num_inference_steps


def teacache_counts(transformer: nn.Module) -> tuple[int, int]:
    """(calls computed, calls skipped) since ``apply_teacache``; (0, 0) without TeaCache."""
    leader = _leader(transformer)
    return (leader.counts.computed, leader.counts.skipped) if leader is not None else (0, 0)


def _leader(transformer: nn.Module) -> _LeaderHook | None:
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(LEADER_HOOK) if registry is not None else None
        if hook is not None:
            return hook
    return None


_DIFFUSERS_CACHES = ("first_block_cache", "mag_cache", "taylorseer_cache", "pyramid_attention_broadcast",
                     "faster_cache", "sea_cache", "text_kv_cache")


def cache_hook_names() -> set[str]:
    """The hook names of every diffusers cache (the ``_..._HOOK`` constants of its modules), and ours."""
    import importlib

    names = {LEADER_HOOK, BLOCK_HOOK}
    for module_name in _DIFFUSERS_CACHES:
        try:
            module = importlib.import_module(f"diffusers.hooks.{module_name}")
        except ImportError:  # a diffusers without this cache
            continue
        names.update(v for k, v in vars(module).items() if k.endswith("_HOOK") and isinstance(v, str))
    return names


def refuse_second_cache(transformer: nn.Module, wanted: str) -> None:
    """Two caches on one model would each skip on the other's stale residuals: refuse the second."""
    present = None
    if getattr(transformer, "_cache_config", None) is not None:
        present = type(transformer._cache_config).__name__
    names = cache_hook_names()
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        found = [n for n in (registry.hooks if registry is not None else {}) if n in names]
        if found:
            present = present or found[0]
            break
    if present is not None:
        raise ConfigError(f"{type(transformer).__name__} already has a cache ({present}); remove it before applying "
                          f"{wanted}: two caches would skip on each other's stale results.")
