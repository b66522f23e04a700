"""The runtime: diffusers transformers with ``Fp8Linear`` layers, loaded from either kind of folder.

``loader`` (``load_transformer``), ``fp8_linear`` (the module), ``kernels`` (the one matmul
dispatch: ``torch._scaled_mm`` on FP8 GPUs, an exact float32 emulation elsewhere).
"""

from .fp8_linear import Fp8Linear
from .kernels import device_has_fp8
from .loader import load_transformer

__all__ = ["Fp8Linear", "load_transformer", "device_has_fp8"]
