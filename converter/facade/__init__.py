"""omni-fp8: FP8 weights for diffusion transformers, converted offline or while loading.

    >>> from omni_fp8 import convert, load_transformer, Fp8Config
    >>> convert("./Qwen-Image", "./Qwen-Image-fp8", config=Fp8Config(weight_block_size=(128, 128)))  # doctest: +SKIP
    >>> transformer = load_transformer("./Qwen-Image", quantization="fp8", device="cuda")  # doctest: +SKIP
    >>> omni = Omni(model="./Qwen-Image", quantization="fp8", cache_backend="tea_cache")  # doctest: +SKIP
    >>> omni.generate("A cat", OmniDiffusionSamplingParams(seed=0))[0].images[0].save("cat.png")  # doctest: +SKIP

The stages live in ``omni_fp8.converter`` and ``omni_fp8.runtime``; this module re-exports the
public API.
"""

from omni_fp8.converter import (
    ConversionResult,
    Fp8Config,
    OmniFp8Error,
    Plan,
    Source,
    convert,
    make_plan,
    open_source,
    push,
    read_manifest,
    verify,
)
from omni_fp8.converter import errors
from omni_fp8.converter.manifest import tool_version
from omni_fp8.runtime import Fp8Linear, load_transformer, quantize_
from omni_fp8.runtime.calibration import Calibration, calibrate
from omni_fp8.runtime.pipeline import Omni, OmniDiffusionSamplingParams, OmniRequestOutput, OmniTimings
from omni_fp8.runtime.registration import install as _install_integrations
from omni_fp8.runtime.sensitivity import load_inputs, record_inputs, save_inputs, sensitivity, suggest

_install_integrations()  # diffusers' from_pretrained reads FP8 folders, peft wraps FP8 layers for LoRA

__version__ = tool_version()

# TeaCache's hooks subclass diffusers' (importing diffusers.hooks takes seconds): loaded on first use.
_LAZY = {"TeaCacheConfig": "teacache", "apply_teacache": "teacache", "remove_teacache": "teacache",
         "enable_cuda_graphs": "cuda_graphs", "disable_cuda_graphs": "cuda_graphs",
         "fuse_blocks_": "fused_blocks", "unfuse_blocks_": "fused_blocks"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"omni_fp8.runtime.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'omni_fp8' has no attribute {name!r}")


__all__ = [
    "Fp8Config",
    "Omni",
    "OmniDiffusionSamplingParams",
    "OmniRequestOutput",
    "OmniTimings",
    "TeaCacheConfig",
    "apply_teacache",
    "remove_teacache",
    "enable_cuda_graphs",
    "disable_cuda_graphs",
    "fuse_blocks_",
    "unfuse_blocks_",
    "load_transformer",
    "quantize_",
    "sensitivity",
    "suggest",
    "record_inputs",
    "save_inputs",
    "load_inputs",
    "calibrate",
    "Calibration",
    "Fp8Linear",
    "convert",
    "ConversionResult",
    "open_source",
    "Source",
    "make_plan",
    "Plan",
    "read_manifest",
    "verify",
    "push",
    "OmniFp8Error",
    "errors",
    "__version__",
]
