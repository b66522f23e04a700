"""LoRA on FP8 layers: peft's LoRA ``Linear`` over an ``Fp8Linear`` base.

The base stays FP8 and runs its FP8 GEMM; the adapters are created and run in the layer's
compute dtype (``Fp8Linear.compute_dtype``), so the output is the FP8 base plus the BF16 LoRA
delta, exactly as for a BF16 base. diffusers' ``load_lora_weights`` / ``set_adapters`` /
``disable_lora`` / ``unload_lora_weights`` work unchanged (``registration`` tells peft to use this
class for ``Fp8Linear``).

``fuse_lora`` merges exactly as far as FP8 allows: the weight is dequantized, the delta added in
float32 and the sum re-quantized with the shared numerics (a fresh scale), so a fused layer is
one FP8 rounding away from base + delta. The original codes and scale are kept, so
``unfuse_lora`` restores the FP8 weight bit for bit (not by subtracting, which would round twice).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from omni_fp8.converter.errors import ConfigError

from .fp8_linear import Fp8Linear

__all__ = ["Fp8LoraLinear", "adopt_lora_wrappers"]


class Fp8LoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` whose base layer is an ``Fp8Linear`` (see the module docstring)."""

    def resolve_lora_variant(self, **kwargs: Any) -> Any:
        """DoRA and the other variants read the base weight as numbers; FP8 codes are not: refused."""
        variant = super().resolve_lora_variant(**kwargs)
        if variant is not None:
            raise ConfigError(
                f"this LoRA uses {getattr(variant, '__name__', variant)} (DoRA or another LoRA variant), which reads "
                "the base weight directly; it is not supported on FP8 layers. Use a plain LoRA, or a BF16 model."
            )
        return variant

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base: Fp8Linear = self.get_base_layer()
        if not self.merged_adapters:  # the FP8 weight as loaded, for an exact unmerge
            self._fp8_original = (base.weight.detach().clone(), base.scale.detach().clone(),
                                  None if base.bias is None else base.bias.detach().clone())
        weight = base.dequantized_weight(torch.float32)
        bias = None if base.bias is None else base.bias.detach().float()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            weight = weight + self.get_delta_weight(name).to(device=weight.device, dtype=torch.float32)
            if self.lora_bias.get(name):
                if bias is None:
                    raise RuntimeError("cannot merge a LoRA with lora_bias=True: the base layer has no bias.")
                bias = bias + self.lora_B[name].bias.float() * self.scaling[name]
            self.merged_adapters.append(name)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights; the adapter(s) {adapter_names} seem broken.")
        q, scale = base.quantize(weight, name="the merged LoRA weight")
        base.set_quantized_(q, scale)
        if bias is not None:
            base.bias.data.copy_(bias.to(base.bias.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight, scale, bias = self._fp8_original
        base: Fp8Linear = self.get_base_layer()
        base.set_quantized_(weight.to(base.weight.device), scale.to(base.scale.device))
        if bias is not None:
            base.bias.data.copy_(bias)
        self.merged_adapters.clear()
        del self._fp8_original


def adopt_lora_wrappers(model: torch.nn.Module) -> None:
    """peft wrappers whose base became FP8 after the LoRA was loaded (``quantize_`` of a LoRA model)
    get this class, so ``fuse_lora`` merges into FP8 instead of failing on float8 arithmetic."""
    for module in model.modules():
        if type(module) is LoraLinear and isinstance(module.get_base_layer(), Fp8Linear):
            module.__class__ = Fp8LoraLinear
