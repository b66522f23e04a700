"""``quantize_``: turn a model already in memory into FP8, in place, with the converter's decisions.

For a model you built or loaded yourself (on any device): its ``nn.Linear`` layers are planned
exactly as ``omni-convert`` would plan a checkpoint of the same class (presets, patterns,
alignment, layers whose dtype the forward reads) and the eligible ones are replaced by
``Fp8Linear``, freeing their high-precision weights one layer at a time.

    >>> from omni_fp8 import quantize_
    >>> transformer = quantize_(pipe.transformer, {"ignored_layers": ["img_mlp"]})  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from omni_fp8.converter.errors import ConfigError
from omni_fp8.converter.options import Fp8Config
from omni_fp8.converter.plan import checkpoint_quantization_config, decide_linears, static_input_scales
from omni_fp8.converter.safetensors_format import dtype_name

from .fp8_linear import Fp8Linear
from .fp8_model import Fp8Provenance, mark_fp8

__all__ = ["quantize_"]


def quantize_(
    model: nn.Module, config: Fp8Config | Mapping[str, Any] | None = None, *, force_fp8_kernels: bool = False
) -> nn.Module:
    """Replace eligible ``nn.Linear`` layers of ``model`` by ``Fp8Linear``, in place; return ``model``.

    The preset is looked up by the model's class name, as for a checkpoint's ``_class_name``.
    Weights are quantized where they are (a GPU model is quantized on the GPU, with the same bits).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize_ takes a torch.nn.Module (a diffusers transformer), got {type(model).__name__}.")
    config = Fp8Config.coerce(config)
    plan = decide_linears(model, config)
    static = static_input_scales(config, plan.shapes, plan.decisions, type(model).__name__)
    source_dtypes = {}
    with torch.no_grad():
        for name, decision in plan.decisions.items():
            if not decision.quantized:
                continue
            linear = model.get_submodule(name)
            source_dtypes[f"{name}.weight"] = dtype_name(linear.weight.dtype)
            input_scale = static.get(name)
            if input_scale is not None:
                input_scale = input_scale.to(linear.weight.device)
            model.set_submodule(name, Fp8Linear.from_linear(
                linear, config.weight_block_size, per_channel=config.weight_strategy == "channel",
                force_fp8_gemm=force_fp8_kernels, input_scale=input_scale))
            del linear
    if "peft" in sys.modules:  # LoRA loaded before quantizing: its wrappers must merge into FP8
        from .lora import adopt_lora_wrappers

        adopt_lora_wrappers(model)
    options = {**config.to_dict(), "preset": plan.preset.name if plan.preset else "none",
               "ignored_layers": list(plan.ignored_layers), "dtype": "keep"}
    kept = [name for name, d in plan.decisions.items() if not d.quantized]
    dynamic = [name for name, d in plan.decisions.items() if d.quantized and name not in static] \
        if config.activation_scheme == "static" else []
    mark_fp8(model, quantization_config=checkpoint_quantization_config(config, kept, dynamic),
             provenance=Fp8Provenance(options, {n: plan.decisions[n].reason for n in kept}, source_dtypes,
                                      {"type": "memory", "class_name": type(model).__name__}))
    return model
