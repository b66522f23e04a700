"""Other tools' FP8 checkpoints, read by the runtime: compressed-tensors (written by llm-compressor),
ComfyUI single files (current markers and the older scaled_fp8 form), BFL fp8r single files,
ModelOpt folders; and the per-channel weight-scale scheme they bring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_tensors, same_bits
from safetensors.torch import load_file, save_file
from test_runtime import rel_l2, run_qwen, run_zimage
from torch import nn

from omni_fp8 import Fp8Linear, convert, load_transformer, verify
from omni_fp8.converter.cli import main
from omni_fp8.converter.errors import ModelMismatchError, SourceNotFoundError, UnsupportedSourceError
from omni_fp8.converter.numerics import quantize_per_channel

FIXTURES = Path(__file__).parent / "fixtures" / "foreign"
SOURCES = {"qwen": "qwen_src", "zimage": "zimage_src"}
RUN = {"qwen": run_qwen, "zimage": run_zimage}


def fp8_layers(model):
    return {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def dequantized(model):
    return {n: m.dequantized_weight() for n, m in fp8_layers(model).items()}


# --- the per-channel scheme ---------------------------------------------------------------------

def test_per_channel_fp8_linear_matches_the_numerics_and_round_trips():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Fp8Linear.from_linear(linear, per_channel=True)
    q, s = quantize_per_channel(linear.weight.detach())
    assert layer.scheme == "fp8_channel" and layer.weight_scale.shape == (48, 1)
    assert same_bits(layer.weight, q) and same_bits(layer.weight_scale, s)
    x = torch.randn(5, 64)
    assert rel_l2(layer(x), linear(x)) < 0.05  # W8A8 on random data: measured 0.036
    copy = Fp8Linear(64, 48, per_channel=True)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy(x), layer(x))


@pytest.mark.parametrize("family", ["qwen", "zimage"])
def test_a_per_channel_model_saves_and_reloads_bit_exactly(family, request, tmp_path):
    from test_runtime import assert_same_model

    model = load_transformer(request.getfixturevalue(SOURCES[family]), progress=False)
    from omni_fp8.converter.plan import decide_linears

    for name, decision in decide_linears(model, {}).decisions.items():
        if decision.quantized:
            model.set_submodule(name, Fp8Linear.from_linear(model.get_submodule(name), per_channel=True))
    from omni_fp8.runtime.fp8_model import Fp8Provenance, mark_fp8
    from omni_fp8.converter.plan import checkpoint_quantization_config
    from omni_fp8.converter.options import Fp8Config

    kept = [n for n, d in decide_linears(model, {}).decisions.items() if not d.quantized]
    mark_fp8(model, quantization_config=checkpoint_quantization_config(Fp8Config(), kept),
             provenance=Fp8Provenance({"method": "fp8", "ignored_layers": [], "activation_scheme": "dynamic",
                                       "weight_block_size": None, "preset": "none", "dtype": "keep"}))
    model.save_pretrained(tmp_path / "saved")
    assert verify(tmp_path / "saved").ok
    manifest = json.loads((tmp_path / "saved" / "fp8_manifest.json").read_text())
    assert {t["scheme"] for t in manifest["tensors"]} >= {"fp8_channel", "scale", "kept"}
    reloaded = load_transformer(tmp_path / "saved", progress=False)
    assert_same_model(reloaded, model)
    assert torch.equal(RUN[family](reloaded), RUN[family](model))


# --- BFL fp8r single files (what --target diffusers writes, and diffusers reads) ---------------

@pytest.mark.parametrize("family", ["qwen", "zimage"])
def test_bfl_fp8r_single_file_loads_as_its_per_row_scales_say(family, request, tmp_path):
    src = request.getfixturevalue(SOURCES[family])
    convert(src, tmp_path / "model.safetensors", target="diffusers", progress=False)
    convert(src, tmp_path / "folder", progress=False)
    single = load_transformer(tmp_path / "model.safetensors", config=src, progress=False)
    folder = load_transformer(tmp_path / "folder", progress=False)
    layers = fp8_layers(single)
    assert layers and all(m.scheme == "fp8_channel" for m in layers.values())
    stored = load_file(tmp_path / "model.safetensors")
    for name, m in layers.items():
        assert same_bits(m.weight, stored[f"{name}.weight"])
        assert torch.equal(m.weight_scale.reshape(-1), stored[f"{name}.weight_scale"])
    # Per-row scales that repeat the per-tensor one: the same weights, so the same outputs.
    reference = dequantized(folder)
    assert all(torch.equal(w, reference[n]) for n, w in dequantized(single).items())
    assert torch.equal(RUN[family](single), RUN[family](folder))


def test_a_single_file_needs_its_config(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "model.safetensors", target="diffusers", progress=False)
    with pytest.raises(SourceNotFoundError, match="a single safetensors file carries no model config; pass config="):
        load_transformer(tmp_path / "model.safetensors", progress=False)


# --- ComfyUI single files ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen", "zimage"])
def test_comfyui_files_load_with_their_codes(family, request, tmp_path):
    src = request.getfixturevalue(SOURCES[family])
    file = tmp_path / "comfy.safetensors"
    convert(src, file, target="comfyui", progress=False)
    model = load_transformer(file, config=src, progress=False)
    stored = load_file(file)
    layers = fp8_layers(model)
    assert layers and all(m.scheme == "fp8_tensor" for m in layers.values())
    if family == "zimage":  # the fused attention.qkv is split back into to_q / to_k / to_v
        qkv = stored["layers.0.attention.qkv.weight"]
        parts = [layers[f"layers.0.attention.{p}"] for p in ("to_q", "to_k", "to_v")]
        assert same_bits(torch.cat([p.weight for p in parts]), qkv)
        assert all(torch.equal(p.weight_scale, stored["layers.0.attention.qkv.weight_scale"]) for p in parts)
    else:
        assert same_bits(layers["transformer_blocks.0.attn.to_q"].weight,
                         stored["transformer_blocks.0.attn.to_q.weight"])
    bf16 = load_transformer(src, progress=False)
    # Measured 0.004-0.03 on these tiny models: FP8 error against the high-precision source.
    assert rel_l2(RUN[family](model), RUN[family](bf16)) < 0.06


def test_comfyui_legacy_scaled_fp8_and_prefixed_files(qwen_src, tmp_path):
    file = tmp_path / "comfy.safetensors"
    convert(qwen_src, file, target="comfyui", progress=False)
    current = load_transformer(file, config=qwen_src, progress=False)
    tensors = load_file(file)
    legacy = {}
    for name, t in tensors.items():
        if name.endswith(".comfy_quant"):
            continue
        name = name.removesuffix(".weight_scale") + ".scale_weight" if name.endswith(".weight_scale") else name
        legacy["model.diffusion_model." + name] = t
    legacy["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(legacy, tmp_path / "legacy.safetensors")
    old = load_transformer(tmp_path / "legacy.safetensors", config=qwen_src, progress=False)
    assert all(same_bits(a.weight, b.weight) and same_bits(a.weight_scale, b.weight_scale)
               for a, b in zip(fp8_layers(old).values(), fp8_layers(current).values()))
    assert torch.equal(run_qwen(old), run_qwen(current))


# --- ModelOpt folders ---------------------------------------------------------------------------

def _with_input_scales(folder, value, dtype=torch.float32, shape=()):
    """Add an ``input_scale`` beside every ``weight_scale`` of a folder, as other tools write them."""
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        tensors.update({n.replace("weight_scale", "input_scale"): torch.full(shape, value, dtype=dtype)
                        for n in list(tensors) if n.endswith("weight_scale")})
        save_file(tensors, path)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update({n.replace("weight_scale", "input_scale"): f
                                   for n, f in list(data["weight_map"].items()) if n.endswith("weight_scale")})
        index.write_text(json.dumps(data))


def _foreign_copy(ours, folder, quantization_config):
    shutil.copytree(ours, folder)
    (folder / "fp8_manifest.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))


def test_modelopt_fp8_folder(qwen_src, tmp_path):
    """vLLM's ModelOpt FP8 layout (quant_method modelopt, quant_algo FP8): its calibrated input_scale
    makes each layer static, as vLLM runs it; the same scales in a vLLM fp8 static folder give the
    same outputs bit for bit."""
    convert(qwen_src, tmp_path / "ours", progress=False)
    _foreign_copy(tmp_path / "ours", tmp_path / "modelopt",
                  {"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": []})
    _with_input_scales(tmp_path / "modelopt", 0.05)
    model = load_transformer(tmp_path / "modelopt", progress=False)
    layers = fp8_layers(model)
    assert layers and all(m.static and float(m.input_scale) == torch.tensor(0.05).item() for m in layers.values())
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    _foreign_copy(tmp_path / "ours", tmp_path / "vllm", {**ours, "activation_scheme": "static"})
    _with_input_scales(tmp_path / "vllm", 0.05)
    vllm = load_transformer(tmp_path / "vllm", progress=False)
    assert all(m.static for m in fp8_layers(vllm).values())
    assert torch.equal(run_qwen(model), run_qwen(vllm))
    assert not torch.equal(run_qwen(model), run_qwen(load_transformer(tmp_path / "ours", progress=False)))


# --- compressed-tensors, written by llm-compressor -------------------------------------------

@pytest.mark.parametrize("name,strategy", [("qwen-fp8-dynamic", "fp8_channel"), ("zimage-fp8-dynamic", "fp8_channel")])
def test_compressed_tensors_from_llm_compressor(name, strategy, request):
    folder = FIXTURES / name
    family = name.split("-")[0]
    model = load_transformer(folder, progress=False)
    stored = load_tensors(folder)
    layers = fp8_layers(model)
    assert layers and {m.scheme for m in layers.values()} == {strategy}
    for module, m in layers.items():
        assert same_bits(m.weight, stored[f"{module}.weight"])
        stored_scale = stored[f"{module}.weight_scale"]  # llm-compressor wrote BF16 scales for the BF16 model
        assert m.weight_scale.dtype == torch.float32
        assert torch.equal(m.weight_scale.reshape(-1), stored_scale.float().reshape(-1))
    bf16 = load_transformer(request.getfixturevalue(SOURCES[family]), progress=False)
    # llm-compressor quantized the same tiny checkpoints the fixtures build (seeds 1 and 2).
    assert rel_l2(RUN[family](model), RUN[family](bf16)) < 0.06


def test_compressed_tensors_static_activations(tmp_path):
    """llm-compressor's static per-tensor input activations: ``input_scale`` [1] in the model's dtype."""
    folder = tmp_path / "static"
    shutil.copytree(FIXTURES / "qwen-fp8-dynamic", folder)
    config = json.loads((folder / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"]["dynamic"] = False
        group["input_activations"]["strategy"] = "tensor"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match=r"activation_scheme is static but .*\.input_scale is missing"):
        load_transformer(folder, progress=False)
    _with_input_scales(folder, 0.03, dtype=torch.bfloat16, shape=(1,))
    layers = fp8_layers(load_transformer(folder, progress=False))
    assert layers and all(m.static and m.input_scale.dtype == torch.float32 and m.input_scale.shape == ()
                          for m in layers.values())
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"]["strategy"] = "token"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSourceError, match="static input activations float8 strategy 'token'"):
        load_transformer(folder, progress=False)


def test_inspect_summarises_foreign_checkpoints(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "comfy.safetensors", target="comfyui", progress=False)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "comfy.safetensors"), "--config", str(qwen_src)])
    assert result.exit_code == 0, result.output
    assert "Layout:   comfyui" in result.stdout and "fp8_tensor" in result.stdout
    result = CliRunner().invoke(main, ["inspect", str(FIXTURES / "qwen-fp8-dynamic"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layout"] == "compressed-tensors" and data["schemes"]["fp8_channel"] > 0
