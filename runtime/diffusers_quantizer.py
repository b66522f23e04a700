"""``Fp8Quantizer``: diffusers' own ``from_pretrained`` loading FP8 folders and quantizing BF16 ones.

Registered for ``quant_method: "fp8"`` (see ``registration``), so after ``import omni_fp8``

    QwenImageTransformer2DModel.from_pretrained("./Qwen-Image-fp8", subfolder="transformer")
    DiffusionPipeline.from_pretrained("./Qwen-Image-fp8")
    QwenImageTransformer2DModel.from_pretrained("./Qwen-Image", subfolder="transformer",
                                                quantization_config=Fp8Config())
    DiffusionPipeline.from_pretrained("./Qwen-Image", quantization_config=PipelineQuantizationConfig(
        quant_mapping={"transformer": Fp8Config()}))

give the same ``Fp8Linear`` layers, bits and decisions as ``load_transformer``: the same checks on
the checkpoint (scales finite and positive, no FP8 NaN codes, every tensor where the model wants
it), the converter's plan for on-the-fly quantization, and the numerics module for the weights.
diffusers does the streaming (shard by shard) and the device placement.

The lifecycle (``diffusers/models/modeling_utils.py``): ``maybe_update_loaded_keys`` is the first
point the checkpoint files are known (their headers are read here), ``preprocess_model`` swaps
the Linears on the meta model, ``check_if_quantized_param`` / ``create_quantized_param`` claim
FP8 weights and scales (else diffusers would cast a float32 scale to ``torch_dtype``), and
``postprocess_model`` marks the model (``fp8_model.mark_fp8``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from omni_fp8.converter.errors import ConfigError, ModelMismatchError
from omni_fp8.converter.layouts import Layout, read_layout
from omni_fp8.converter.numerics import FP8_DTYPE, HIGH_PRECISION_DTYPES, check_fp8_codes, check_scale
from omni_fp8.converter.options import Fp8Config
from omni_fp8.converter.plan import KEPT, linear_shapes, make_plan
from omni_fp8.converter.safetensors_format import TensorInfo, read_header
from omni_fp8.converter.source import Source

from .fp8_linear import Fp8Linear, replace_linears
from .fp8_model import Fp8Provenance, mark_fp8, unmark_fp8

__all__ = ["Fp8Quantizer"]

_SCALES = ("weight_scale", "weight_scale_inv", "input_scale")


class Fp8Quantizer(DiffusersQuantizer):
    """diffusers' quantizer for ``quant_method: "fp8"`` checkpoints and ``Fp8Config`` (see module docstring)."""

    requires_calibration = False
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: Fp8Config, **kwargs: Any) -> None:
        super().__init__(Fp8Config.coerce(quantization_config), **kwargs)
        self._infos: dict[str, TensorInfo] = {}
        self._folder: Path | None = None
        self._folder_config: dict[str, Any] | None = None
        self._schemes: dict[str, str] = {}
        self._static: dict[str, Any] = {}
        self._headers: tuple = ()
        self._provenance: Fp8Provenance | None = None
        self._torch_dtype: torch.dtype | None = None

    # --- environment ---------------------------------------------------------------------------

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        from diffusers.utils import is_accelerate_available

        if not is_accelerate_available():
            raise ConfigError(
                "loading FP8 models with diffusers' from_pretrained needs accelerate (diffusers requires it for every "
                "quantized load): pip install accelerate, or use omni_fp8.load_transformer."
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ConfigError(
                f"device_map={device_map!r} is not supported for FP8 models; give one device (device_map='cuda'), "
                "or load on the CPU and use enable_model_cpu_offload / enable_group_offload."
            )

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        """No ``torch_dtype`` means BF16, as for diffusers' other quantizers: FP8 GEMMs take BF16
        activations, and diffusers' default (float32) would emulate them."""
        if torch_dtype is None:
            torch_dtype = torch.bfloat16
        if torch_dtype not in HIGH_PRECISION_DTYPES:
            raise ConfigError(f"torch_dtype {torch_dtype} is not a compute dtype; use bfloat16, float16 or float32.")
        self._torch_dtype = torch_dtype
        return torch_dtype

    def get_cuda_warm_up_factor(self) -> int:
        return 2  # FP8 weights: one byte each, half the BF16 model diffusers' warm-up assumes

    # --- before the weights ------------------------------------------------------------------

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        """The checkpoint's headers, read strictly (as the converter does), before any tensor is."""
        files = [Path(f) for f in checkpoint_files or []]
        self._headers = tuple(read_header(path) for path in files)
        for header in self._headers:
            self._infos.update(header.tensors)
        self._folder = files[0].parent if files else None
        if self.pre_quantized and self._folder is not None and (self._folder / "config.json").is_file():
            with open(self._folder / "config.json", encoding="utf-8") as f:
                self._folder_config = json.load(f).get("quantization_config")
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .loader import check_manifest, checkpoint_provenance

        where = self._folder or Path(".")
        folder_config = (self._folder_config or self._checkpoint_dict()) if self.pre_quantized else None
        config = {"_class_name": type(model).__name__, **({"quantization_config": folder_config} if folder_config else {})}
        source = Source(root=where, kind="transformer", model_dir=where, config=config, shards=self._headers,
                        origin={"type": "local", "path": str(where)})
        if self.pre_quantized:
            layout = read_layout(source, linear_shapes(model))
            manifest = check_manifest(where, where.parent, folder_config) if self._folder else None
            self._schemes, block = layout.schemes, layout.block_size
            self._static = dict.fromkeys(layout.static)
            self._provenance = checkpoint_provenance(folder_config, self._schemes, manifest, source.origin)
        else:  # the converter's plan and checks, exactly as load_transformer(quantization="fp8")
            plan = make_plan(source, self.quantization_config, dtype=self._torch_dtype, model=model)
            self._schemes = {name: d.scheme for name, d in plan.linears.items()}
            block = self.quantization_config.weight_block_size
            self._static = dict(plan.static)  # module -> its calibrated input_scale
            self._provenance = Fp8Provenance.from_plan(plan)
        self._block = block
        replace_linears(model, self._schemes, block, static=self._static)
        return model

    def _checkpoint_dict(self) -> dict[str, Any]:
        """A quantization_config given without a folder to read it from (a single file): the object's."""
        config = self.quantization_config
        return {"quant_method": "fp8", "activation_scheme": config.activation_scheme,
                "weight_block_size": list(config.weight_block_size) if config.weight_block_size else None}

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Own the tensors we do not claim (biases, norms, kept Linears), as ``load_transformer`` does.

        diffusers reads each shard as views of its memory map; a parameter left viewing it would
        keep the whole file mapped (and every page read counted in the process's memory) until
        the load ends. FP8 weights and scales are copied or quantized in ``create_quantized_param``,
        so once a shard is done nothing refers to its map.
        """
        return {name: value if self._claims(name) or not torch.is_tensor(value) else value.clone()
                for name, value in state_dict.items()}

    def _claims(self, name: str) -> bool:
        module, _, attr = name.rpartition(".")
        return attr in ("weight", *_SCALES) and self._schemes.get(module, KEPT) != KEPT

    def update_missing_keys(self, model: nn.Module, missing_keys: list[str], prefix: str) -> list[str]:
        if self.pre_quantized:
            return missing_keys
        return [k for k in missing_keys if not (k.endswith(_SCALES) and self._fp8_module(model, k) is not None)]

    # --- each tensor -----------------------------------------------------------------------------

    def check_if_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                                 state_dict: dict[str, Any], **kwargs: Any) -> bool:
        return self._fp8_module(model, param_name) is not None

    def create_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                               target_device: Any, state_dict: dict[str, Any], unexpected_keys: list[str] | None = None,
                               **kwargs: Any) -> None:
        module = self._fp8_module(model, param_name)
        attr = param_name.rsplit(".", 1)[1]
        original = state_dict[param_name]  # not cast to torch_dtype, unlike param_value
        device = torch.device("cpu") if target_device is None else torch.device(target_device)
        where = str(self._infos[param_name].file) if param_name in self._infos else param_name
        if not self.pre_quantized:
            q, scale = module.quantize(original, name=param_name)
            _set(module, "weight", q.to(device))
            _set(module, module.scale_name, scale.to(device))
            if module.static:
                _set(module, "input_scale", self._static[param_name.rpartition(".")[0]].to(device, copy=True))
        elif attr == "weight":
            if original.dtype != FP8_DTYPE:
                raise ModelMismatchError(f"{where}: {param_name} is {original.dtype}, expected float8_e4m3fn.")
            check_fp8_codes(original, name=param_name, where=where)
            _set(module, "weight", original.to(device, copy=True))
        else:
            original = original.to(torch.float32) if attr == "input_scale" else original  # BF16 ones widen exactly
            check_scale(original, name=param_name, where=where)
            _set(module, attr, original.reshape(getattr(module, attr).shape).to(device, copy=True))

    def check_quantized_param_shape(self, param_name: str, current_param: torch.Tensor,
                                    loaded_param: torch.Tensor) -> bool:
        if current_param.numel() != loaded_param.numel():  # only a scalar scale stored as [1] may differ
            raise ModelMismatchError(
                f"{param_name} has shape {list(loaded_param.shape)} in the checkpoint but {list(current_param.shape)} "
                "in the model; the checkpoint is damaged or was written with other block sizes.")
        return True

    @staticmethod
    def _fp8_module(model: nn.Module, param_name: str) -> Fp8Linear | None:
        module_name, _, attr = param_name.rpartition(".")
        if attr not in ("weight", *_SCALES):
            return None
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return None
        return module if isinstance(module, Fp8Linear) else None

    # --- after the weights ---------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        missing = [f"{name}.{attr}" for name, m in model.named_modules() if isinstance(m, Fp8Linear)
                   for attr in ("weight", m.scale_name, *(("input_scale",) if m.static else ()))
                   if getattr(m, attr).device.type == "meta"]
        if missing:
            raise ModelMismatchError(
                f"{self._folder}: the checkpoint lacks {len(missing)} FP8 tensor(s) ({', '.join(missing[:3])}); it is "
                "incomplete or damaged.", path=self._folder)
        for module in model.modules():
            if isinstance(module, Fp8Linear):
                module._place(rescale=True)
        if self.pre_quantized and self._folder_config is not None:
            serialized = dict(self._folder_config)
        else:  # what the layers now hold, written as a checkpoint of them would say it
            serialized = Layout("fp8", self._schemes, self._block, static=set(self._static)).checkpoint_config()
        mark_fp8(model, quantization_config=serialized, provenance=self._provenance, compute_dtype=self._torch_dtype,
                 quantizer=self)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module) -> nn.Module:
        """Every ``Fp8Linear`` back to an ``nn.Linear`` holding the dequantized weight (lossy once)."""
        for name, module in list(model.named_modules()):
            if not isinstance(module, Fp8Linear):
                continue
            dtype = module.compute_dtype
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.weight.device, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight(torch.float32).to(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.requires_grad_(False)
            if hasattr(module, "_hf_hook"):  # accelerate's offload hook travels with the layer
                from accelerate.hooks import add_hook_to_module, remove_hook_from_module

                hook = module._hf_hook
                remove_hook_from_module(module)
                add_hook_to_module(linear, hook)
            model.set_submodule(name, linear)
        unmark_fp8(model)
        return model


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
