"""Teaching diffusers and peft about FP8 layers, the moment each is imported.

diffusers picks a quantizer from two module-level dicts keyed by ``quant_method``
(``diffusers.quantizers.auto``), and peft wraps a layer for LoRA only if it knows its class
(``LoraConfig._register_custom_module``); neither has a plugin mechanism, so ``import omni_fp8``
adds our entries, and only adds (a quantizer another package registered for ``"fp8"`` is left in
place, with a warning).

Importing diffusers' quantizers costs about 2 s, so nothing is imported here: if diffusers (or
peft) is already imported the entries are added at once, otherwise a small import hook adds them
right after the module is first imported, before anyone can use it. A version whose layout we
do not recognise gets one warning naming what to use instead, never a crash of its import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["install"]

_lock = threading.Lock()
_pending: dict[str, Callable[[ModuleType], None]] = {}


def install() -> None:
    """Register with diffusers and peft now or on their import (idempotent)."""
    for name, action in (("diffusers.quantizers.auto", _register_diffusers),
                         ("peft.tuners.lora.config", _register_peft)):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__spec__", None) is not None and _initialised(module):
            _run(name, action, module)
        else:
            with _lock:
                _pending[name] = action
    with _lock:
        if _pending and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport())


def _initialised(module: ModuleType) -> bool:
    spec = module.__spec__
    return not getattr(spec, "_initializing", False)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a watched module to run our action after it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        with _lock:
            action = _pending.get(fullname)
        if action is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _run(fullname, action, module)

        spec.loader.exec_module = exec_then_register  # this module's own loader instance
        return spec


def _run(name: str, action: Callable[[ModuleType], None], module: ModuleType) -> None:
    with _lock:
        _pending.pop(name, None)
    try:
        action(module)
    except Exception as e:  # never break the user's import of diffusers or peft
        package = name.split(".")[0]
        version = getattr(sys.modules.get(package), "__version__", "?")
        warnings.warn(
            f"omni-fp8 could not register with {package} {version} ({type(e).__name__}: {e}); its own loaders will "
            "not read FP8 folders. Use omni_fp8.load_transformer, or a supported version.",
            RuntimeWarning,
            stacklevel=2,
        )


def _register_diffusers(auto: ModuleType) -> None:
    from omni_fp8.converter.options import Fp8Config

    from .diffusers_quantizer import Fp8Quantizer

    quantizers, configs = auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING
    current = configs.get("fp8")
    if current is not None and current is not Fp8Config:
        warnings.warn(
            f"diffusers already has a quantizer for quant_method 'fp8' ({current.__name__}); omni-fp8 leaves it in "
            "place. Load FP8 folders with omni_fp8.load_transformer.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    quantizers["fp8"] = Fp8Quantizer
    configs["fp8"] = Fp8Config


def _register_peft(config_module: ModuleType) -> None:
    lora_config = config_module.LoraConfig
    if not hasattr(lora_config, "_register_custom_module"):
        raise AttributeError("LoraConfig has no _register_custom_module (peft >= 0.15 has it)")
    original = lora_config.__post_init__
    if getattr(original, "_omni_fp8", False):
        return

    def post_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from .fp8_linear import Fp8Linear
        from .lora import Fp8LoraLinear

        self._register_custom_module({Fp8Linear: Fp8LoraLinear})

    post_init._omni_fp8 = True  # type: ignore[attr-defined]
    lora_config.__post_init__ = post_init
