"""Cache backends by name: TeaCache (``teacache``) and diffusers' own caches, checked against the model.

``cache_backend="tea_cache"`` is this package's TeaCache hook; the other names are diffusers'
caches (``diffusers.hooks``), applied through the model's own ``enable_cache``. Which of
diffusers' caches serve which model was found by running each on the tiny pipelines of both
families (``tests/test_pipeline.py`` keeps it so); the ones that cannot serve them are refused by
name, with the reason, instead of running without effect or failing half-way through a
generation. Everything is applied before ``enable_parallelism`` (see ``teacache``), and only
caches whose decisions agree on every rank run under context parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from omni_fp8.converter.errors import ConfigError
from omni_fp8.converter.options import refuse_unknown_keys
from torch import nn

__all__ = ["CACHE_BACKENDS", "UNSUPPORTED", "CacheHandle", "apply_cache", "check_cache_backend"]

TEA_CACHE = "tea_cache"
# diffusers' caches that serve Qwen-Image, by their config class in diffusers.hooks.
_DIFFUSERS_CONFIGS = {
    "first_block_cache": "FirstBlockCacheConfig",
    "mag_cache": "MagCacheConfig",
    "taylorseer_cache": "TaylorSeerCacheConfig",
}
CACHE_BACKENDS = (TEA_CACHE, *_DIFFUSERS_CONFIGS)
# Which transformer classes each backend serves.
_MODELS = {
    TEA_CACHE: ("QwenImageTransformer2DModel", "ZImageTransformer2DModel"),
    **{name: ("QwenImageTransformer2DModel",) for name in _DIFFUSERS_CONFIGS},
}
_NOT_FOR_Z_IMAGE = (
    "diffusers 0.42.1 offers its caches only on CacheMixin models, which ZImageTransformer2DModel is not, and its "
    "block caches look for a 'hidden_states' argument that Z-Image's blocks (x, ...) do not have"
)
# diffusers 0.42.1 caches that do not serve these models, and why.
UNSUPPORTED = {
    "pyramid_attention_broadcast": "it keeps one state per attention layer, not per cache context, so with true CFG "
                                   "QwenImagePipeline's negative pass would reuse the positive pass's attention",
    "faster_cache": "it expects the positive and negative prompts in one batch; QwenImagePipeline runs them as two "
                    "calls, and it fails in the first one",
    "sea_cache": "it needs the step index and sigma in the pipeline's cache_context, which QwenImagePipeline does not "
                 "pass, so it never skips",
    "text_kv_cache": "it only hooks NucleusMoE image blocks",
}
# Defaults where diffusers has none for the model. MagCache's magnitude ratios are calibrated per
# model: these are Qwen-Image's (50 steps, one per step of each CFG branch) and the settings of
# Zehong-Ma/MagCache, MagCache4QwenImage/magcache_generate.py (df81cb18): threshold 0.06, K 2,
# retention 0.2.
_QWEN_MAG_RATIOS = (1.0, 1.64062, 1.45312, 1.1875, 1.17188, 1.05469, 1.21094, 1.10938, 1.11719, 1.13281, 1.11719,
                    1.07812, 1.07031, 1.08594, 1.08594, 1.07812, 1.03906, 1.04688, 1.07812, 1.07031, 1.03125, 1.07812,
                    1.04688, 1.04688, 1.04688, 1.03906, 1.01562, 1.03125, 1.02344, 1.02344, 1.02344, 1.03906, 1.0,
                    1.01562, 1.0, 0.99219, 1.00781, 0.98047, 0.95703, 0.96875, 0.99219, 0.92578, 0.92578, 0.90625,
                    0.85938, 0.80469, 0.87891, 0.75, 0.60938, 0.55078)
_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("mag_cache", "QwenImageTransformer2DModel"): {"mag_ratios": list(_QWEN_MAG_RATIOS), "threshold": 0.06,
                                                   "max_skip_steps": 2, "retention_ratio": 0.2},
}
# Caches whose skip decision depends only on the step count, so every rank of a context-parallel
# run decides the same; tea_cache all-reduces its distance. first_block_cache decides on each
# rank's own tokens without synchronising: ranks could disagree and wait on each other forever.
_RANK_CONSISTENT = (TEA_CACHE, "mag_cache", "taylorseer_cache")


@dataclasses.dataclass
class CacheHandle:
    """An applied cache: what ``Omni`` reports, and the settings that follow the step count."""

    backend: str
    config: Any
    mag_ratios: tuple[float, ...] | None = None

    def prepare(self, transformer: nn.Module, num_inference_steps: int) -> None:
        """Fit step-count-dependent settings to the coming generation."""
        if self.backend == TEA_CACHE:
            from .teacache import set_teacache_steps

            set_teacache_steps(transformer, num_inference_steps)
        elif self.backend == "mag_cache" and self.mag_ratios is not None:
            import torch
            from diffusers.hooks.mag_cache import nearest_interp

            # The hooks hold this very config object; MagCache indexes its ratios by step.
            self.config.num_inference_steps = num_inference_steps
            self.config.mag_ratios = nearest_interp(torch.tensor(self.mag_ratios), num_inference_steps)

    def to_dict(self) -> dict[str, Any]:
        if dataclasses.is_dataclass(self.config):
            values = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        else:
            values = {}
        return {"backend": self.backend,
                "config": {k: v for k, v in values.items() if k not in ("mag_ratios", "current_timestep_callback")}}


def check_cache_backend(backend: Any, cache_config: Any, class_name: str, *, parallel: bool) -> None:
    """Everything about a cache request that can be refused before the pipeline is loaded."""
    if backend is None:
        if cache_config is not None:
            raise ConfigError("cache_config was given without cache_backend; name the cache, e.g. "
                              "cache_backend='tea_cache'.")
        return
    if not isinstance(backend, str) or backend not in CACHE_BACKENDS:
        if isinstance(backend, str) and backend in UNSUPPORTED:
            raise ConfigError(f"cache_backend {backend!r} is not supported: {UNSUPPORTED[backend]}; use one of "
                              f"{', '.join(CACHE_BACKENDS)}.")
        raise ConfigError(f"unknown cache_backend {backend!r}; use one of {', '.join(CACHE_BACKENDS)}.")
    if class_name not in _MODELS[backend]:
        why = f": {_NOT_FOR_Z_IMAGE}" if class_name == "ZImageTransformer2DModel" else ""
        takes = ", ".join(b for b in CACHE_BACKENDS if class_name in _MODELS[b]) or "none"
        raise ConfigError(f"cache_backend {backend!r} does not support {class_name}{why}; {class_name} takes {takes}.")
    if parallel and backend not in _RANK_CONSISTENT:
        raise ConfigError(f"cache_backend {backend!r} decides on each rank's own tokens without synchronising, so "
                          f"ranks could disagree and hang under parallel; use {', '.join(_RANK_CONSISTENT)}.")
    if cache_config is not None and not isinstance(cache_config, Mapping):
        raise ConfigError(f"cache_config must be a dict of {backend} options, got {type(cache_config).__name__}.")
    _build_config(backend, cache_config, class_name)  # every option checked now, not after a 40 GB load


def apply_cache(pipe: Any, backend: str | None, cache_config: Mapping[str, Any] | None) -> CacheHandle | None:
    """Apply ``backend`` to ``pipe.transformer`` (checked by ``check_cache_backend`` first)."""
    if backend is None:
        return None
    from .teacache import apply_teacache, refuse_second_cache

    transformer = pipe.transformer
    config, ratios = _build_config(backend, cache_config, type(transformer).__name__)
    if backend == TEA_CACHE:
        apply_teacache(transformer, config)
    else:
        refuse_second_cache(transformer, backend)
        transformer.enable_cache(config)
    return CacheHandle(backend, config, ratios)


def _build_config(backend: str, cache_config: Mapping[str, Any] | None, class_name: str) -> tuple[Any, Any]:
    if backend == TEA_CACHE:
        from .teacache import TeaCacheConfig

        return TeaCacheConfig.from_dict(cache_config), None
    import diffusers.hooks

    cls = getattr(diffusers.hooks, _DIFFUSERS_CONFIGS[backend])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(cache_config or {})
    refuse_unknown_keys(values, (n for n in fields if n != "current_timestep_callback"), what=backend)
    values = {**_DEFAULTS.get((backend, class_name), {}), **values}
    for name, value in values.items():
        default = fields[name].default
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise ConfigError(f"{backend} option {name!r} must be a number, got {value!r}.")
    if "taylor_factors_dtype" in values and isinstance(values["taylor_factors_dtype"], str):
        from omni_fp8.converter.options import parse_dtype

        values["taylor_factors_dtype"] = parse_dtype(values["taylor_factors_dtype"], what="taylor_factors_dtype")
    try:
        ratios = tuple(float(r) for r in values["mag_ratios"]) if values.get("mag_ratios") is not None else None
        return cls(**values), ratios
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{backend}: {' '.join(str(e).split())}") from e
