"""Load a ``--target comfyui`` file with ComfyUI's own loader, from a ComfyUI checkout, and check it.

    python bench/interop/comfyui_load.py COMFY_CHECKOUT FILE [--reference BF16_FILE]

Runs ``comfy.sd.load_diffusion_model`` (what ComfyUI's "Load Diffusion Model" node calls) on the
CPU, then prints: the architecture ComfyUI detected, how many Linears it built as FP8
(``QuantizedTensor``) and whether each holds exactly the file's codes and scale, and, with
``--reference`` (the same model in high precision, e.g. written with ``--target comfyui
--ignored-layers 're:.*'``), the relative L2 error of the diffusion model's output on random inputs.

ComfyUI detects Qwen-Image and Z-Image by key names and real widths (Z-Image only at width 3840),
so the file must be a real-width model; ``make_comfyui_files.py`` writes shallow ones. Run it in
an environment with ComfyUI's requirements (torch, comfy-kitchen, transformers, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("comfy", type=Path, help="a ComfyUI checkout (the folder holding comfy/)")
    parser.add_argument("file", type=Path, help="the .safetensors file to load")
    parser.add_argument("--reference", type=Path, help="the same model unquantized, for the output error")
    args = parser.parse_args()
    sys.path.insert(0, str(args.comfy.resolve()))
    sys.argv = [sys.argv[0], "--cpu"]  # comfy.cli_args parses the command line on import, once enabled
    import torch

    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401  (sets the CPU up before the loader runs)
    import comfy.sd
    from comfy.quant_ops import QuantizedTensor
    from safetensors import safe_open

    patcher = comfy.sd.load_diffusion_model(str(args.file))
    model = patcher.model
    dit = model.diffusion_model
    print(f"detected: {type(model).__name__} / {type(dit).__name__}, quant_config "
          f"{getattr(model.model_config, 'quant_config', None)}")
    exact = differ = 0
    marker = full_precision = None
    with safe_open(args.file, "pt") as f:
        keys = set(f.keys())
        for name, module in dit.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, QuantizedTensor):
                continue
            codes = weight._qdata if hasattr(weight, "_qdata") else weight.qdata
            params = getattr(weight, "_params", None) or getattr(weight, "_layout_params", None)
            scale = params.scale if hasattr(params, "scale") else params["scale"]
            want_codes, want_scale = f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.weight_scale")
            same = torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)) and torch.equal(
                scale.float().reshape(()), want_scale.float().reshape(()))
            exact, differ = exact + same, differ + (not same)
            marker = json.loads(f.get_tensor(f"{name}.comfy_quant").numpy().tobytes())
            full_precision = module._full_precision_mm
        plain = sum(1 for k in keys if k.endswith(".weight")) - exact - differ
    print(f"FP8 Linears: {exact + differ} ({exact} hold the file's codes and scale exactly, {differ} differ); "
          f"other weights: {plain}; marker: {marker}; full-precision matmul: {full_precision}")
    if args.reference:
        ref = comfy.sd.load_diffusion_model(str(args.reference)).model
        out, want = forward(model), forward(ref)
        print(f"output vs reference: relative L2 {((out - want).norm() / want.norm()).item():.4f}")
    return 1 if differ else 0


def forward(model):
    import torch

    torch.manual_seed(0)
    dit = model.diffusion_model
    with torch.no_grad():
        if type(dit).__name__ == "NextDiT":  # Z-Image
            x = torch.randn(1, 16, 8, 8)
            context = torch.randn(1, 8, dit.cap_embedder[1].in_features)
            out = dit(x, torch.tensor([0.5]), context, num_tokens=8)
        else:  # Qwen-Image
            x = torch.randn(1, 16, 1, 8, 8)
            context = torch.randn(1, 8, dit.txt_in.in_features)
            out = dit(x, torch.tensor([0.5]), context)
    return out.float()


if __name__ == "__main__":
    sys.exit(main())
