"""Static activation scales: calibration, input_scale in converted folders, the same bits on every path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import same_bits
from safetensors.torch import load_file, save_file
from test_runtime import assert_same_model, qwen_inputs, rel_l2, run_qwen, run_zimage

from omni_fp8 import Calibration, Fp8Config, Fp8Linear, calibrate, convert, load_inputs, load_transformer, quantize_, verify
from omni_fp8.converter.cli import main
from omni_fp8.converter.demo import tiny_qwen_image
from omni_fp8.converter.errors import (
    CalibrationError,
    ConfigError,
    CorruptCheckpointError,
    CorruptScaleError,
    PatternMatchError,
)
from omni_fp8.converter.numerics import FP8_DTYPE, FP8_MAX, activation_scale, quantize_activation_static

LAB = Path(__file__).parents[1] / "bench" / "quality_lab" / "fixtures" / "lab-dit"


def zimage_calls(model, n: int = 3) -> list[dict]:
    """Z-Image's forward as ZImagePipeline calls it, as keyword arguments, at a few timesteps."""
    calls = []
    cfg, dtype = model.config, model.dtype
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        calls.append({"x": [torch.randn(cfg.in_channels, 1, 8, 8, generator=g).to(dtype)],
                      "t": torch.full((1,), 0.2 + 0.3 * i, dtype=dtype),
                      "cap_feats": [torch.randn(12, cfg.cap_feat_dim, generator=g).to(dtype)]})
    return calls


def qwen_calls(model, n: int = 3) -> list[dict]:
    calls = []
    for i in range(n):
        kw = qwen_inputs(model, seed=i, dtype=model.dtype)
        kw["timestep"] = torch.full((1,), 0.2 + 0.3 * i, dtype=model.dtype)
        calls.append(kw)
    return calls


CALLS = {"qwen": qwen_calls, "zimage": zimage_calls}
RUN = {"qwen": run_qwen, "zimage": run_zimage}
SOURCES = {"qwen": "qwen_src", "zimage": "zimage_src"}


# --- numerics ----------------------------------------------------------------------------------

def test_activation_scale_and_static_quantization_follow_the_contract():
    assert float(activation_scale(torch.tensor(448.0))) == 1.0
    assert activation_scale(3.0).dtype == torch.float32 and activation_scale(3.0).shape == ()
    assert float(activation_scale(torch.tensor(3.0))) == float(torch.tensor(3.0) / torch.tensor(448.0))
    s = activation_scale(torch.tensor(1.0))
    x = torch.tensor([0.0, 0.5, -1.0, 2.0, -1e6], dtype=torch.bfloat16)
    q = quantize_activation_static(x, s)
    assert q.dtype == FP8_DTYPE
    expected = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert same_bits(q, expected)
    assert q.float()[3] == FP8_MAX and q.float()[4] == -FP8_MAX  # beyond the calibrated range: saturated
    for bad, why in ((0.0, "saw only zeros"), (float("inf"), "non-finite"), (float("nan"), "non-finite")):
        with pytest.raises(CalibrationError, match=rf"blocks\.0\.ff: calibrated activation amax is .*{why}"):
            activation_scale(bad, name="blocks.0.ff")


@pytest.mark.parametrize("per_channel,block", [(False, None), (True, None), (False, (16, 16))])
def test_static_fp8_linear_is_the_emulated_static_product(per_channel, block):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    scale = activation_scale(x.abs().amax() * 0.5)  # half the range: some values saturate
    layer = Fp8Linear.from_linear(linear, block, per_channel=per_channel, input_scale=scale)
    assert layer.static and layer.activation_scheme == "static" and "activations=static" in repr(layer)
    x_deq = quantize_activation_static(x, scale).float() * scale
    expected = x_deq @ layer.dequantized_weight().t() + linear.bias.detach()
    assert torch.equal(layer(x), expected.to(x.dtype))
    state = layer.state_dict()
    assert state["input_scale"].dtype == torch.float32 and state["input_scale"].shape == ()
    again = Fp8Linear(64, 48, block_size=block, per_channel=per_channel, static=True)
    again.load_state_dict(state)
    assert torch.equal(again(x), layer(x))
    moved = layer.to(torch.bfloat16)  # only the bias follows a dtype change
    assert moved.input_scale.dtype == torch.float32
    with pytest.raises(CorruptScaleError, match="input_scale holds 0.0"):
        again.load_state_dict({**state, "input_scale": torch.tensor(0.0)})


# --- calibrate ---------------------------------------------------------------------------------

def test_calibrate_on_the_lab_dit_takes_the_running_max_over_every_call():
    model = load_transformer(LAB, progress=False)
    calls = load_inputs(LAB / "sample_inputs.safetensors")
    cal = calibrate(model, calls, progress=False)
    assert cal.class_name == "QwenImageTransformer2DModel" and cal.calls == len(calls) and cal.statistic == "max"
    # img_in's input is the latent itself.
    assert cal.amax["img_in"] == max(float(c["hidden_states"].abs().amax()) for c in calls)
    assert set(cal.in_features) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    low = calibrate(model, calls, statistic="p99", progress=False)
    assert all(low.amax[n] <= cal.amax[n] for n in cal.amax) and any(low.amax[n] < cal.amax[n] for n in cal.amax)
    with pytest.raises(ConfigError, match="unknown calibration statistic 'median'"):
        calibrate(model, calls, statistic="median")


def test_a_calibration_file_round_trips_and_refuses_damage(tmp_path):
    cal = Calibration(amax={"a": 1.5, "b": 0.0}, in_features={"a": 16, "b": 32, "c": 16}, class_name="X",
                      statistic="p99.9", calls=7, inputs_sha256="0" * 64)
    cal.save(tmp_path / "s.safetensors")
    back = Calibration.load(tmp_path / "s.safetensors")
    assert (dict(back.amax), dict(back.in_features), back.statistic, back.calls) == (cal.amax, cal.in_features,
                                                                                     "p99.9", 7)
    assert back.provenance()["file"] == "s.safetensors" and len(back.provenance()["sha256"]) == 64
    with pytest.raises(CalibrationError, match="b: calibrated activation amax is 0.0"):
        back.input_scale("b")
    with pytest.raises(CalibrationError, match=r"no activation amax for c \(it never ran"):
        back.input_scale("c")
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CorruptCheckpointError, match="other.safetensors: not an omni-fp8 calibration file"):
        Calibration.load(tmp_path / "other.safetensors")
    with pytest.raises(Exception, match="no such calibration file"):
        Fp8Config(activation_scheme="static", calibration=tmp_path / "missing.safetensors")


# --- converted folders and load-time quantization ---------------------------------------------

@pytest.mark.parametrize("family", ["qwen", "zimage"])
@pytest.mark.parametrize("block", [None, (16, 16)])
def test_static_conversion_and_load_time_give_the_same_bits(family, block, request, tmp_path):
    src = request.getfixturevalue(SOURCES[family])
    model = load_transformer(src, progress=False)
    cal = calibrate(model, CALLS[family](model), progress=False)
    cal.save(tmp_path / "scales.safetensors")
    config = Fp8Config(activation_scheme="static", calibration=tmp_path / "scales.safetensors", weight_block_size=block)
    convert(src, tmp_path / "out", config=config, progress=False)
    assert verify(tmp_path / "out").ok
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["activation_scheme"] == "static" and "static_ignored_layers" not in qc
    stored = {}
    for path in (tmp_path / "out").glob("*.safetensors"):
        stored.update(load_file(path))
    fp8 = [n.removesuffix(".weight") for n, t in stored.items() if t.dtype == FP8_DTYPE]
    assert fp8
    for name in fp8:  # X.input_scale beside X.weight, float32 scalar, amax / 448
        scale = stored[f"{name}.input_scale"]
        assert scale.dtype == torch.float32 and scale.shape == ()
        assert same_bits(scale, activation_scale(cal.amax[name]))
    manifest = json.loads((tmp_path / "out" / "fp8_manifest.json").read_text())
    assert manifest["options"]["calibration"]["statistic"] == "max"
    assert manifest["options"]["calibration"]["sha256"] == cal.__class__.load(tmp_path / "scales.safetensors").sha256
    converted = load_transformer(tmp_path / "out", progress=False)
    at_load = load_transformer(src, quantization="fp8", quantization_config=config, progress=False)
    assert_same_model(converted, at_load)
    assert all(m.static for m in converted.modules() if isinstance(m, Fp8Linear))
    assert torch.equal(RUN[family](converted), RUN[family](at_load))
    in_memory = quantize_(load_transformer(src, progress=False), config)
    assert torch.equal(RUN[family](in_memory), RUN[family](converted))
    bf = RUN[family](model)
    assert rel_l2(RUN[family](converted), bf) < 0.1
    # Saved again, it reloads bit for bit and verifies.
    converted.save_pretrained(tmp_path / "saved")
    assert verify(tmp_path / "saved").ok
    assert_same_model(load_transformer(tmp_path / "saved", progress=False), converted)


def test_static_ignored_layers_stay_dynamic_and_are_named_in_the_config(qwen_src, tmp_path):
    model = load_transformer(qwen_src, progress=False)
    cal = calibrate(model, qwen_calls(model), progress=False)
    config = Fp8Config(activation_scheme="static", calibration=cal, static_ignored_layers=["img_mlp"])
    convert(qwen_src, tmp_path / "out", config=config, progress=False)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["static_ignored_layers"] and all(".img_mlp." in n for n in qc["static_ignored_layers"])
    loaded = load_transformer(tmp_path / "out", progress=False)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, Fp8Linear)}
    assert {n for n, m in layers.items() if not m.static} == set(qc["static_ignored_layers"])
    at_load = load_transformer(qwen_src, quantization="fp8", quantization_config=config, progress=False)
    assert_same_model(loaded, at_load)
    with pytest.raises(PatternMatchError, match="static_ignored_layers pattern 'img_mpl' matches no FP8 Linear"):
        load_transformer(qwen_src, quantization="fp8", progress=False, quantization_config=Fp8Config(
            activation_scheme="static", calibration=cal, static_ignored_layers=["img_mpl"]))
    with pytest.raises(ConfigError, match="asks for dynamic activations but the folder holds static ones"):
        load_transformer(tmp_path / "out", quantization_config={}, progress=False)


def test_a_static_folder_tells_its_calibration_and_refuses_plan_flags(qwen_src, tmp_path):
    from click.testing import CliRunner

    from omni_fp8.converter.cli import main
    from omni_fp8.converter.model_card import build_card

    model = load_transformer(qwen_src, progress=False)
    cal = calibrate(model, qwen_calls(model), progress=False)
    cal.save(tmp_path / "scales.safetensors")
    convert(qwen_src, tmp_path / "out", config=Fp8Config(activation_scheme="static", calibration=tmp_path /
            "scales.safetensors", static_ignored_layers=["img_mlp"]), progress=False)
    card = build_card(json.loads((tmp_path / "out" / "fp8_manifest.json").read_text()), "me/qwen-static")
    assert "| activation_scheme | `static` |" in card and "`max` of \\|input\\| over 3 transformer calls" in card
    assert "| static_ignored_layers | `img_mlp` |" in card
    for flags in (["--calibration", str(tmp_path / "scales.safetensors")], ["--static-ignored-layers", "img_mlp"]):
        result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out"), *flags])
        assert result.exit_code == 1 and flags[0] in result.stderr and "a converted folder" in result.stderr


def test_diffusers_from_pretrained_with_a_static_config_matches_load_transformer(qwen_src, tmp_path):
    pytest.importorskip("accelerate")
    from diffusers import QwenImageTransformer2DModel

    model = load_transformer(qwen_src, progress=False)
    config = Fp8Config(activation_scheme="static", calibration=calibrate(model, qwen_calls(model), progress=False))
    ours = load_transformer(qwen_src, quantization="fp8", quantization_config=config, dtype=torch.bfloat16,
                            progress=False)
    theirs = QwenImageTransformer2DModel.from_pretrained(qwen_src, quantization_config=config,
                                                         torch_dtype=torch.bfloat16)
    assert_same_model(theirs, ours)
    convert(qwen_src, tmp_path / "out", config=config, progress=False)
    assert_same_model(QwenImageTransformer2DModel.from_pretrained(tmp_path / "out", torch_dtype=torch.bfloat16), ours)


# --- errors -----------------------------------------------------------------------------------

def test_static_errors_are_one_line(qwen_src, zimage_src, tmp_path):
    with pytest.raises(ConfigError, match="activation_scheme 'static' needs a calibration: .*omni-convert calibrate"):
        convert(qwen_src, tmp_path / "a", config={"activation_scheme": "static"}, progress=False)
    qwen = load_transformer(qwen_src, progress=False)
    cal = calibrate(qwen, qwen_calls(qwen), progress=False)
    with pytest.raises(CalibrationError, match="calibrated on QwenImageTransformer2DModel, not ZImageTransformer2DModel"):
        convert(zimage_src, tmp_path / "b", config=Fp8Config(activation_scheme="static", calibration=cal),
                progress=False)
    name = next(iter(cal.amax))
    other = Calibration(amax=cal.amax, in_features={**cal.in_features, name: 999}, class_name=cal.class_name)
    with pytest.raises(CalibrationError, match=f"{name} had 999 input features when calibrated"):
        convert(qwen_src, tmp_path / "c", config=Fp8Config(activation_scheme="static", calibration=other,
                                                           preset="none"), progress=False)
    foreign = Calibration(amax=cal.amax, in_features={**cal.in_features, "blocks.9.ff": 16}, class_name=cal.class_name)
    with pytest.raises(CalibrationError, match=r"names 1 Linear\(s\) this QwenImageTransformer2DModel does not have"):
        convert(qwen_src, tmp_path / "d", config=Fp8Config(activation_scheme="static", calibration=foreign),
                progress=False)
    layer = "transformer_blocks.0.attn.to_q"
    for value, why in ((0.0, "saw only zeros"), (float("inf"), "non-finite")):
        bad = Calibration(amax={**cal.amax, layer: value}, in_features=cal.in_features, class_name=cal.class_name)
        with pytest.raises(CalibrationError, match=rf"{layer}: calibrated activation amax is .*{why}"):
            convert(qwen_src, tmp_path / "e", config=Fp8Config(activation_scheme="static", calibration=bad),
                    progress=False)
    assert not any(p.name in "abcde" for p in tmp_path.iterdir())  # nothing written by any failed run
    with pytest.raises(ConfigError, match="--target vllm-omni with static activations"):
        convert(qwen_src, tmp_path / "f", config=Fp8Config(activation_scheme="static", calibration=cal),
                target="vllm-omni", progress=False)


def test_calibrate_and_convert_from_the_command_line(tmp_path):
    runner = CliRunner()
    scales = tmp_path / "scales.safetensors"
    result = runner.invoke(main, ["calibrate", str(LAB), "--output", str(scales), "-q", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert "62 Linears of QwenImageTransformer2DModel over 5 calls (max" in result.stdout
    assert "--activation-scheme static --calibration" in result.stdout
    cal = Calibration.load(scales)
    assert cal.inputs_sha256 and cal.calls == 5
    result = runner.invoke(main, ["calibrate", str(LAB), "--output", str(scales), "-q"])
    assert result.exit_code == 1 and "exists; pass --force" in result.stderr
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(main, ["calibrate", str(LAB), "--output", str(tmp_path / "notes.txt"), "-q", "--force"])
    assert result.exit_code == 1 and "not a calibration file omni-fp8 wrote" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    result = runner.invoke(main, ["convert", str(LAB), str(out), "--activation-scheme", "static", "-q"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "needs a calibration" in result.stderr
    result = runner.invoke(main, ["convert", str(LAB), str(out), "--activation-scheme", "static", "--calibration",
                                  str(scales), "--static-ignored-layers", "img_mlp", "-q"])
    assert result.exit_code == 0, result.output
    assert verify(out).ok
    result = runner.invoke(main, ["inspect", str(out)])
    assert "static activations" in result.stdout


def test_suggest_with_static_activations_ranks_what_static_adds(tmp_path):
    from omni_fp8 import suggest

    model = load_transformer(LAB, progress=False)
    calls = load_inputs(LAB / "sample_inputs.safetensors")
    scales = calibrate(model, calls, progress=False)
    config = Fp8Config(preset="none", activation_scheme="static", calibration=scales)
    report = suggest(model, calls, config, progress=False)
    assert report.static and report.ignored_layers == [] and report.static_ignored_layers == []
    assert all(g.dynamic_error is not None for g in report.groups)
    costs = [g.static_cost for g in report.groups]
    assert costs == sorted(costs, reverse=True)
    strict = suggest(model, calls, config, max_error=1e-4, progress=False)  # unreachable: stops where static adds 0
    assert strict.static_ignored_layers and strict.static_ignored_layers[0] == report.groups[0].group
    assert "static adds" in strict.table() and "Suggested static_ignored_layers" in strict.table()
    scales.save(tmp_path / "s.safetensors")
    result = CliRunner().invoke(main, ["suggest", str(LAB), "--activation-scheme", "static", "--calibration",
                                       str(tmp_path / "s.safetensors"), "-q", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["activation_scheme"] == "static"
    result = CliRunner().invoke(main, ["suggest", str(LAB), "--activation-scheme", "static", "-q"])
    assert result.exit_code == 1 and "needs --calibration FILE" in result.stderr


@pytest.mark.parametrize("arch", ["qwen-image", "z-image"])
def test_record_inputs_from_a_real_pipeline_then_calibrate(arch, request, tmp_path):
    """ZImagePipeline calls its transformer positionally (latents, timestep, embeddings): recorded
    under forward's own names, the calls replay, save, load and calibrate like Qwen-Image's."""
    pytest.importorskip("accelerate")
    from diffusers import DiffusionPipeline

    from omni_fp8 import calibrate, load_inputs, record_inputs, save_inputs

    folder = request.getfixturevalue("qwen_pipeline" if arch == "qwen-image" else "zimage_pipeline")
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    extra = {"negative_prompt": " ", "true_cfg_scale": 2.0} if arch == "qwen-image" else {"guidance_scale": 0.0}
    with record_inputs(pipe.transformer) as calls:
        pipe("a cat", num_inference_steps=2, height=32, width=32, **extra)
    assert len(calls) >= 2 and all(isinstance(c, dict) for c in calls)
    if arch == "z-image":
        assert {"x", "t", "cap_feats"} <= set(calls[0]) and isinstance(calls[0]["x"], list)
    save_inputs(tmp_path / "inputs.safetensors", calls)
    again = load_inputs(tmp_path / "inputs.safetensors")
    scales = calibrate(pipe.transformer, again, progress=False)
    assert scales.calls == len(calls) and all(v > 0 for v in scales.amax.values())


def test_calibrate_refuses_a_fused_model_in_one_line():
    from omni_fp8 import fuse_blocks_, unfuse_blocks_

    model = tiny_qwen_image()
    calls = qwen_calls(model)
    fuse_blocks_(model)
    with pytest.raises(ConfigError, match="unfuse_blocks_ first") as info:
        calibrate(model, calls, progress=False)
    assert "\n" not in str(info.value)
    unfuse_blocks_(model)
    assert calibrate(model, calls, progress=False).calls == len(calls)
