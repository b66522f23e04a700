"""The runtime: diffusers transformers with ``Fp8Linear`` layers, loaded from either kind of folder.

``loader`` (``load_transformer``), ``quantize`` (``quantize_`` for a model in memory),
``fp8_linear`` (the module), ``kernels`` (the one matmul dispatch: cuBLASLt FP8 GEMMs on FP8
GPUs, an exact float32 emulation elsewhere), ``triton_kernels`` (activation quantization, few-row FP8 GEMV),
``cuda_graphs`` (eager blocks replayed as CUDA graphs), ``fused_blocks`` (one QKV GEMM per
stream, RoPE that ``torch.compile`` fuses, AdaLN modulate with the FP8 quantization in one kernel).
"""

from .fp8_linear import Fp8Linear
from .kernels import device_has_fp8
from .loader import load_transformer
from .quantize import quantize_

__all__ = ["Fp8Linear", "load_transformer", "quantize_", "device_has_fp8"]
