"""Per-channel weight scales (``weight_strategy="channel"``) through every stage: options, plan,
writer, manifest, the loaders, diffusers' from_pretrained / save_pretrained, and the targets."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import load_tensors, same_bits
from test_runtime import run_qwen, run_zimage

from omni_fp8 import Fp8Config, Fp8Linear, convert, load_transformer, make_plan, quantize_, verify
from omni_fp8.converter.check import check
from omni_fp8.converter.cli import main
from omni_fp8.converter.demo import tiny_qwen_image
from omni_fp8.converter.errors import ConfigError
from omni_fp8.converter.source import MANIFEST_NAME

FP8 = torch.float8_e4m3fn
CHANNEL = {"weight_strategy": "channel"}


def reference_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor contract applied to each output row, written the obvious way."""
    w32 = w.float()
    tiny = torch.finfo(torch.float32).tiny
    amax = w32.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, (amax / 448).clamp_min(tiny), torch.ones_like(amax))
    return (w32 / s).clamp(-448, 448).to(FP8), s


# ----------------------------------------------------------------------------- options


def test_options_default_and_validate_the_strategy():
    assert Fp8Config().weight_strategy == "tensor" and Fp8Config().scheme == "fp8_tensor"
    assert Fp8Config(weight_block_size=(32, 32)).weight_strategy == "block"
    assert Fp8Config(weight_block_size=(32, 32), weight_strategy="block").scheme == "fp8_block"
    assert Fp8Config(**CHANNEL).scheme == "fp8_channel"
    config = Fp8Config(weight_strategy="channel", ignored_layers=["img_mlp"])
    assert Fp8Config.from_dict(config.to_dict()) == config
    for bad, words in (({"weight_strategy": "row"}, "unknown weight_strategy 'row'"),
                       ({"weight_strategy": "channel", "weight_block_size": [32, 32]}, "contradict"),
                       ({"weight_strategy": "block"}, "needs weight_block_size")):
        with pytest.raises(ConfigError, match=words):
            Fp8Config.from_dict(bad)


# ----------------------------------------------------------------------------- the converter


@pytest.mark.parametrize("family", ["qwen_src", "zimage_src"])
def test_converted_rows_follow_the_contract_and_match_both_loaders(family, request, tmp_path):
    src = request.getfixturevalue(family)
    out = tmp_path / "out"
    result = convert(src, out, config=CHANNEL, progress=False)
    assert verify(out).ok
    source, written = load_tensors(src), load_tensors(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    fp8 = [t for t in manifest["tensors"] if t["scheme"] == "fp8_channel"]
    assert fp8 and len(fp8) == result.manifest["totals"]["linears_quantized"]
    assert manifest["options"]["weight_strategy"] == "channel"
    assert manifest["quantization_config"]["weight_strategy"] == "channel"
    for entry in fp8:
        q, s = reference_rows(source[entry["name"]])
        scale = written[entry["scale"]]
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (q.shape[0], 1)
        assert same_bits(written[entry["name"]], q) and same_bits(scale, s)

    run = run_qwen if family == "qwen_src" else run_zimage
    converted = load_transformer(out, progress=False)
    at_load = load_transformer(src, quantization="fp8", quantization_config=CHANNEL, progress=False)
    in_place = quantize_(load_transformer(src, progress=False), CHANNEL)
    layers = {n: m for n, m in converted.named_modules() if isinstance(m, Fp8Linear)}
    assert layers and all(m.scheme == "fp8_channel" for m in layers.values())
    for other in (at_load, in_place):
        modules = dict(other.named_modules())
        for name, layer in layers.items():
            assert same_bits(layer.weight, modules[name].weight) and same_bits(layer.scale, modules[name].scale)
        assert torch.equal(run(converted), run(other))


def test_channel_scales_beat_one_scale_when_a_row_is_an_outlier():
    model = tiny_qwen_image()
    with torch.no_grad():
        model.transformer_blocks[0].img_mlp.net[2].weight[0] *= 1e5  # one loud row: the others fall into FP8 subnormals
    errors = {}
    for strategy in ("tensor", "channel"):
        layer = quantize_(copy.deepcopy(model), {"weight_strategy": strategy, "preset": "none"})
        fp8 = layer.transformer_blocks[0].img_mlp.net[2]
        w = model.transformer_blocks[0].img_mlp.net[2].weight.float()
        errors[strategy] = ((fp8.dequantized_weight() - w)[1:].norm() / w[1:].norm()).item()
    assert errors["channel"] < errors["tensor"] / 4, errors


def test_inspect_plan_and_folder_say_per_row(qwen_src, tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(qwen_src), "--weight-strategy", "channel"])
    assert result.exit_code == 0 and "one scale per output row" in result.stdout
    assert make_plan(qwen_src, CHANNEL).summary()["weight_strategy"] == "channel"
    convert(qwen_src, tmp_path / "out", config=CHANNEL, progress=False)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out")])
    assert result.exit_code == 0 and "one scale per output row" in result.stdout
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out"), "--weight-strategy", "channel"])
    assert result.exit_code == 1 and "--weight-strategy" in result.stderr


# ----------------------------------------------------------------------------- targets and check


@pytest.mark.parametrize("target", ["vllm-omni", "comfyui"])
def test_engines_without_row_scales_refuse_in_one_line(target, qwen_src, tmp_path):
    out = tmp_path / ("out" if target == "vllm-omni" else "out.safetensors")
    result = CliRunner().invoke(main, ["convert", str(qwen_src), str(out), "--target", target,
                                       "--weight-strategy", "channel"])
    assert result.exit_code == 1 and not out.exists()
    message = result.stderr.strip()
    assert "\n" not in message and "per-channel" in message and "drop --weight-strategy channel" in message


def test_our_per_row_folder_is_flagged_for_vllm_omni_with_the_right_fix(qwen_src, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(qwen_src), str(tmp_path / "out"), "--weight-strategy",
                                       "channel", "--json"])
    assert result.exit_code == 0, result.output
    vllm = json.loads(result.stdout)["vllm_omni"]
    assert vllm["loadable"] is False and vllm["fix"] == "--target vllm-omni --weight-strategy tensor"
    assert any("one weight_scale per output row" in p for p in check(tmp_path / "out", "vllm-omni").problems)
    assert check(tmp_path / "out", "omni-fp8").ok


# ----------------------------------------------------------------------------- diffusers


def test_diffusers_from_pretrained_and_save_pretrained_keep_rows(qwen_src, tmp_path):
    pytest.importorskip("accelerate")
    from diffusers import QwenImageTransformer2DModel

    convert(qwen_src, tmp_path / "out", config=CHANNEL, progress=False)
    theirs = QwenImageTransformer2DModel.from_pretrained(tmp_path / "out")
    ours = load_transformer(tmp_path / "out", progress=False)
    assert torch.equal(run_qwen(theirs), run_qwen(ours))
    fresh = QwenImageTransformer2DModel.from_pretrained(qwen_src, quantization_config=Fp8Config(**CHANNEL),
                                                        dtype=torch.bfloat16)
    assert all(m.scheme == "fp8_channel" for m in fresh.modules() if isinstance(m, Fp8Linear))
    fresh.save_pretrained(tmp_path / "saved")
    assert verify(tmp_path / "saved").ok
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["weight_strategy"] == "channel"
    reloaded = load_transformer(tmp_path / "saved", progress=False)
    assert torch.equal(run_qwen(reloaded), run_qwen(fresh))
