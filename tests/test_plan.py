"""Planning from the model: patterns, aliases, presets, alignment, and the options that feed them."""

from __future__ import annotations

import json

import pytest
import torch

from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image
from omni_fp8.converter.errors import ConfigError, ModelMismatchError, PatternMatchError, UnsupportedSourceError
from omni_fp8.converter.options import Fp8Config, parse_size
from omni_fp8.converter.plan import LayerPattern, make_plan
from omni_fp8.converter.source import open_source


@pytest.mark.parametrize("pattern,name,hit", [
    ("img_mlp", "transformer_blocks.3.img_mlp.net.0.proj", True),
    ("img_mlp", "transformer_blocks.3.img_mlp2.net.0.proj", False),
    ("img_mlp", "transformer_blocks.3.my_img_mlp.proj", False),
    ("attn.to_q", "transformer_blocks.0.attn.to_q", True),
    ("attn.to_q", "transformer_blocks.0.attn.add_q_proj", False),
    ("transformer_blocks.1", "transformer_blocks.1.attn.to_q", True),
    ("transformer_blocks.1", "transformer_blocks.10.attn.to_q", False),
    ("to_qkv", "layers.2.attention.to_k", True),
    ("to_qkv", "layers.2.attention.to_out.0", False),
    ("attention.to_qkv", "layers.2.attention.to_v", True),
    ("add_kv_proj", "transformer_blocks.0.attn.add_q_proj", True),
    ("add_kv_proj", "transformer_blocks.0.attn.to_add_out", False),
    ("w13", "layers.0.feed_forward.w3", True),
    ("w13", "layers.0.feed_forward.w2", False),
    (r"re:blocks\.(0|1)\.attn", "transformer_blocks.1.attn.to_q", True),
    (r"re:^proj_out$", "proj_out", True),
    (r"re:^proj_out$", "x.proj_out", False),
])
def test_pattern_semantics(pattern, name, hit):
    assert LayerPattern.parse(pattern).matches(name) is hit


@pytest.mark.parametrize("bad", ["img_mlp..net", ".img_mlp", "re:(unclosed"])
def test_malformed_patterns(bad):
    with pytest.raises(ConfigError, match="ignored_layers pattern"):
        LayerPattern.parse(bad)


def test_qwen_preset_is_auto_picked_and_keeps_the_edges(qwen_src):
    plan = make_plan(open_source(qwen_src))
    assert plan.preset.name == "qwen-image"
    kept = plan.kept_linears
    edges = {"img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out"}
    assert set(kept) == edges  # the image MLPs are FP8 since the deep lab (bench/RESULTS.md)
    for name in ("transformer_blocks.0.txt_mlp.net.0.proj", "transformer_blocks.0.img_mlp.net.2"):
        assert plan.linears[name].scheme == "fp8_tensor"
    assert plan.pattern_hits == {"img_in": 1, "txt_in": 1, "time_text_embed": 2, "norm_out": 1, "proj_out": 1}
    assert plan.quantization_config() == {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None,
        "ignored_layers": kept, "is_checkpoint_fp8_serialized": True,
    }


def test_preset_none_quantizes_every_aligned_linear(qwen_src):
    plan = make_plan(open_source(qwen_src), Fp8Config(preset="none"))
    assert plan.preset is None and plan.kept_linears == []


def test_explicit_patterns_extend_the_preset(qwen_src):
    plan = make_plan(open_source(qwen_src), {"ignored_layers": ["to_qkv", "re:^proj_out$"], "weight_block_size": [32, 32]})
    preset = ("img_in", "txt_in", "time_text_embed", "norm_out", "proj_out")
    assert plan.ignored_layers == (*preset, "to_qkv", "re:^proj_out$")
    assert plan.linears["transformer_blocks.1.attn.to_k"].reason == "ignored:to_qkv"
    assert plan.linears["proj_out"].reason == "ignored:proj_out"  # the first matching pattern gets it
    assert plan.linears["transformer_blocks.1.attn.to_out.0"].scheme == "fp8_block"
    weight = next(t for t in plan.tensors if t.name == "transformer_blocks.0.txt_mod.1.weight")
    assert [(o.name, o.dtype, o.shape) for o in weight.outputs] == [
        ("transformer_blocks.0.txt_mod.1.weight", torch.float8_e4m3fn, (384, 64)),
        ("transformer_blocks.0.txt_mod.1.weight_scale_inv", torch.float32, (12, 2)),
    ]


def test_z_image_preset_keeps_what_its_forward_reads_the_dtype_of(zimage_src):
    plan = make_plan(open_source(zimage_src))
    assert plan.preset.name == "z-image-turbo"
    assert plan.linears["t_embedder.mlp.0"].reason == "ignored:t_embedder"
    assert plan.linears["cap_embedder.1"].reason == "ignored:cap_embedder"
    for name, d in plan.linears.items():
        in_block = name.split(".")[0] in ("layers", "noise_refiner", "context_refiner")
        assert d.quantized is in_block, name


def test_layers_whose_dtype_the_forward_reads_stay_high_precision(zimage_src):
    plan = make_plan(open_source(zimage_src), {"preset": "none"})
    assert plan.linears["t_embedder.mlp.0"].reason == "dtype-read"  # found in the model's own code
    assert plan.linears["t_embedder.mlp.2"].quantized
    assert "t_embedder.mlp.0" in plan.quantization_config()["ignored_layers"]


def test_pattern_matching_nothing_lists_the_closest_names(qwen_src):
    with pytest.raises(PatternMatchError) as err:
        make_plan(open_source(qwen_src), {"ignored_layers": ["img_mpl"]})
    assert str(err.value).startswith(
        "ignored_layers pattern 'img_mpl' matches no Linear layer of QwenImageTransformer2DModel; closest names: img_mlp"
    )


def test_unknown_preset(qwen_src):
    with pytest.raises(ConfigError, match=r"unknown preset 'qwen'; available: qwen-image, z-image-turbo"):
        make_plan(open_source(qwen_src), {"preset": "qwen"})


def test_unaligned_linears_stay_high_precision(tmp_path):
    # joint_attention_dim 40: txt_in is 64x40, which no FP8 GEMM accepts.
    folder = save_checkpoint(tiny_qwen_image(joint_attention_dim=40), tmp_path / "t")
    plan = make_plan(open_source(folder), {"preset": "none"})
    assert plan.linears["txt_in"].reason == "unaligned"
    assert "txt_in" in plan.quantization_config()["ignored_layers"]
    assert plan.linears["img_in"].quantized


def test_config_that_does_not_match_the_weights(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match=r"lacks 32 tensor\(s\) of QwenImageTransformer2DModel \(transformer_blocks.2"
                       r".*: the checkpoint has 2 transformer_blocks, config.json builds 3;"):
        make_plan(open_source(folder))
    config["num_layers"], config["attention_head_dim"] = 2, 16
    config["axes_dims_rope"] = [4, 6, 6]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match=r"img_in.bias has shape \[64\] but QwenImageTransformer2DModel"):
        make_plan(open_source(folder))


def test_class_unknown_to_diffusers(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "LlamaForCausalLM"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSourceError, match=r"names 'LlamaForCausalLM', which is not a model class of diffusers"):
        make_plan(open_source(folder))


@pytest.mark.parametrize("values,why", [
    ({"method": "int8"}, "quantization method 'int8' is not supported"),
    ({"calibration": "scales.safetensors"}, "calibration is given but activation_scheme is 'dynamic'"),
    ({"static_ignored_layers": "img_mlp"}, "static_ignored_layers is given but activation_scheme is 'dynamic'"),
    ({"activation_scheme": "static", "calibration": 3}, "calibration must be a Calibration"),
    ({"activation_scheme": "token"}, "unknown activation_scheme 'token'"),
    ({"weight_block_size": [128]}, "bad weight_block_size"),
    ({"weight_block_size": "128,100"}, "bad weight_block_size '128,100': give two positive multiples of 16"),
    ({"weight_block_size": [0, 128]}, "bad weight_block_size"),
    ({"weight_block_size": [True, 128]}, "bad weight_block_size"),
    ({"ignored_layer": ["img_mlp"]}, r"unknown quantization_config key\(s\) 'ignored_layer'; supported: activation_scheme, calibration, ignored_layers"),
    ({"ignored_layers": [3]}, "ignored_layers entries must be strings"),
    ({"method": "fp8", "quant_method": "int4"}, "give one"),
])
def test_option_errors(values, why):
    with pytest.raises(ConfigError, match=why):
        Fp8Config.from_dict(values)


def test_option_forms():
    config = Fp8Config.from_dict({"quant_method": "fp8", "ignored_layers": "img_mlp, txt_mlp", "weight_block_size": "128,128"})
    assert config.ignored_layers == ("img_mlp", "txt_mlp") and config.weight_block_size == (128, 128)
    assert Fp8Config(ignored_layers=["re:a{1,2}", "b,c"]).ignored_layers == ("re:a{1,2}", "b", "c")
    assert Fp8Config.coerce(None) == Fp8Config()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234
    with pytest.raises(ConfigError, match="bad size 'lots'"):
        parse_size("lots")


def test_dtype_option_must_be_a_float_dtype(qwen_src):
    with pytest.raises(ConfigError, match="dtype torch.int8 is not a compute dtype; use torch.bfloat16"):
        make_plan(open_source(qwen_src), dtype=torch.int8)


def test_integer_linear_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_checkpoint(tiny_qwen_image(), tmp_path / "t", max_shard_size="100MB")
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["proj_out.weight"] = tensors["proj_out.weight"].to(torch.int8)
    save_file(tensors, shard)
    with pytest.raises(UnsupportedSourceError, match=r"proj_out.weight is I8; only BF16, FP16 and FP32 weights are quantized"):
        make_plan(open_source(folder))
