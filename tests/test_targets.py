"""Outputs for other engines: vllm-omni folders, ComfyUI and diffusers single files, and ``check``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_tensors, reference_fp8, same_bits, tree_digest
from safetensors import safe_open

from omni_fp8 import convert, make_plan, open_source
from omni_fp8.converter.check import VLLM_FP8_CONFIG_KEYS, check
from omni_fp8.converter.cli import main
from omni_fp8.converter.errors import ConfigError, OutputExistsError
from omni_fp8.converter.numerics import quantize_per_channel, quantize_per_tensor, shared_scale, weight_amax

FP8 = torch.float8_e4m3fn


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shared_scale_is_the_fused_weights_scale_bit_for_bit(dtype):
    torch.manual_seed(0)
    parts = [torch.randn(48, 32) * r for r in (0.02, 0.5, 3.0)]
    parts = [p.to(dtype) for p in parts]
    scale = shared_scale([weight_amax(p) for p in parts])
    q_fused, s_fused = reference_fp8(torch.cat(parts))
    assert same_bits(scale, s_fused)  # max of the amaxes == amax of the concatenation, exactly
    rows = 0
    for p in parts:
        q, s = quantize_per_tensor(p, scale=scale)
        assert same_bits(s, s_fused)
        # Each part's q is the formula with the group scale, and the matching rows of the fused q.
        assert same_bits(q, (p.float() / scale).clamp(-448, 448).to(FP8))
        assert same_bits(q, q_fused[rows : rows + p.shape[0]])
        rows += p.shape[0]


def test_shared_scale_of_zero_and_tiny_weights_follows_the_contract():
    zero = torch.zeros(16, 16)
    assert shared_scale([weight_amax(zero)]).item() == 1.0
    tiny = torch.full((16, 16), 1e-40)
    assert shared_scale([weight_amax(tiny), weight_amax(zero)]).item() == torch.finfo(torch.float32).tiny


# ----------------------------------------------------------------------------- vllm-omni plans


def test_vllm_omni_plan_keeps_what_vllm_omni_never_quantizes(qwen_src):
    plan = make_plan(open_source(qwen_src), target="vllm-omni")
    kept = {n: d.reason for n, d in plan.linears.items() if not d.quantized}
    for name in ("transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1"):
        assert kept[name] == "target:vllm-omni"
    for name in ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "proj_out"):
        assert name in kept  # by the preset already, and by vllm-omni's rule whatever the preset
    assert make_plan(open_source(qwen_src), {"preset": "none"}, target="vllm-omni").linears["proj_out"].reason == (
        "target:vllm-omni")
    qc = plan.quantization_config()
    assert set(qc) <= VLLM_FP8_CONFIG_KEYS
    # Fused groups share one scale; the default target has none.
    assert set(plan.scale_groups) == {f"transformer_blocks.{i}.attn.{g}" for i in (0, 1) for g in ("to_qkv", "add_kv_proj")}
    assert not make_plan(open_source(qwen_src)).scale_groups


def test_vllm_omni_fused_group_is_decided_together_and_listed_under_both_names(qwen_src):
    plan = make_plan(open_source(qwen_src), {"ignored_layers": ["to_k"]}, target="vllm-omni")
    for part in ("to_q", "to_k", "to_v"):
        assert not plan.linears[f"transformer_blocks.0.attn.{part}"].quantized
    assert plan.linears["transformer_blocks.0.attn.to_q"].reason == "fused-group"
    ignored = plan.quantization_config()["ignored_layers"]
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_qkv"} <= set(ignored)
    assert "transformer_blocks.0.attn.add_kv_proj" not in ignored


def test_vllm_omni_block_scales_keep_fused_parts_that_split_blocks(qwen_src):
    plan = make_plan(open_source(qwen_src), {"weight_block_size": [128, 128]}, target="vllm-omni")
    assert plan.linears["transformer_blocks.0.attn.to_q"].reason == "fused-block-shape"  # 64 rows, 128-row blocks
    plan = make_plan(open_source(qwen_src), {"weight_block_size": [32, 32]}, target="vllm-omni")
    assert plan.linears["transformer_blocks.0.attn.to_q"].quantized and not plan.scale_groups


def test_vllm_omni_z_image_needs_the_pipeline_to_list_the_text_encoder(zimage_src, zimage_pipeline):
    with pytest.raises(ConfigError, match="text_encoder"):
        make_plan(open_source(zimage_src), target="vllm-omni")
    plan = make_plan(open_source(zimage_pipeline), target="vllm-omni")
    ignored = plan.quantization_config()["ignored_layers"]
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"} <= set(ignored)
    assert "layers.0.adaLN_modulation.0" in ignored and "layers.0.feed_forward.w13" not in ignored
    assert plan.linears["layers.0.adaLN_modulation.0"].reason == "target:vllm-omni"
    assert "layers.0.feed_forward.w13" in plan.scale_groups


def test_vllm_omni_conversion_shares_scales_bit_exactly_and_checks_clean(qwen_src, tmp_path):
    before = tree_digest(qwen_src)
    convert(qwen_src, tmp_path / "out", target="vllm-omni", progress=False)
    assert tree_digest(qwen_src) == before
    out, src = load_tensors(tmp_path / "out"), load_tensors(qwen_src)
    parts = [f"transformer_blocks.1.attn.{p}.weight" for p in ("add_q_proj", "add_k_proj", "add_v_proj")]
    q_fused, s_fused = reference_fp8(torch.cat([src[p] for p in parts]))
    rows = 0
    for p in parts:
        assert same_bits(out[p + "_scale"], s_fused)
        assert same_bits(out[p], q_fused[rows : rows + src[p].shape[0]])
        rows += src[p].shape[0]
    assert same_bits(out["transformer_blocks.0.img_mod.1.weight"], src["transformer_blocks.0.img_mod.1.weight"])
    assert check(tmp_path / "out", "vllm-omni").ok
    manifest = json.loads((tmp_path / "out" / "fp8_manifest.json").read_text())
    assert manifest["options"]["target"] == "vllm-omni"


def test_default_folder_is_flagged_for_vllm_omni(qwen_src, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(qwen_src), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert "note: vllm-omni would not load this folder correctly" in result.stderr and "--target vllm-omni" in result.stderr
    result = CliRunner().invoke(main, ["convert", str(qwen_src), str(tmp_path / "out2"), "--json"])
    data = json.loads(result.stdout)
    assert data["vllm_omni"]["loadable"] is False and data["vllm_omni"]["fix"] == "--target vllm-omni"
    result = CliRunner().invoke(main, ["check", str(tmp_path / "out"), "--target", "vllm-omni"])
    assert result.exit_code == 1
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("problem:")]
    assert len(lines) == 4 and all("mod.1" in ln and "cast" in ln for ln in lines)
    result = CliRunner().invoke(main, ["check", str(tmp_path / "out"), "--target", "vllm-omni", "--json"])
    assert json.loads(result.stdout)["ok"] is False
    result = CliRunner().invoke(main, ["check", str(tmp_path / "out"), "--target", "omni-fp8"])
    assert result.exit_code == 0 and result.stdout.startswith("OK")


def test_check_finds_mixed_fused_groups_and_foreign_config_keys(qwen_src, tmp_path, copy_of):
    convert(qwen_src, tmp_path / "out", target="vllm-omni", progress=False)
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["modules_to_not_convert"] = []
    config["quantization_config"]["ignored_layers"].append("transformer_blocks.0.attn.add_q_proj")
    config_path.write_text(json.dumps(config))
    problems = check(tmp_path / "out", "vllm-omni").problems
    assert any("modules_to_not_convert" in p and "TypeError" in p for p in problems)
    assert any("add_kv_proj" in p and "some but not all" in p for p in problems)


# ----------------------------------------------------------------------------- ComfyUI


def test_comfyui_qwen_image_file(qwen_src, tmp_path):
    out = tmp_path / "qwen.safetensors"
    result = convert(qwen_src, out, target="comfyui", progress=False)
    tensors, src = file_tensors(out), load_tensors(qwen_src)
    marker = json.loads(tensors["transformer_blocks.0.attn.to_q.comfy_quant"].numpy().tobytes())
    assert marker == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    q_ref, s_ref = reference_fp8(src["transformer_blocks.0.img_mod.1.weight"])
    assert same_bits(tensors["transformer_blocks.0.img_mod.1.weight"], q_ref)
    assert same_bits(tensors["transformer_blocks.0.img_mod.1.weight_scale"], s_ref)
    assert same_bits(tensors["img_in.weight"], src["img_in.weight"])  # kept by the preset, as it was
    assert set(tensors) - {k for k in tensors if k.endswith((".comfy_quant", ".weight_scale"))} == set(src)
    assert result.manifest["files"][out.name]["size"] == out.stat().st_size
    assert check(out, "comfyui").ok
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no staging left behind


def test_comfyui_z_image_file_has_lumina_names_and_a_fused_qkv(zimage_src, tmp_path):
    out = tmp_path / "z.safetensors"
    convert(zimage_src, out, target="comfyui", progress=False)
    tensors, src = file_tensors(out), load_tensors(zimage_src)
    assert not [k for k in tensors if ".to_q." in k or k.startswith(("all_x_embedder", "all_final_layer"))]
    assert {"x_embedder.weight", "final_layer.linear.weight", "layers.0.attention.out.weight",
            "layers.0.attention.q_norm.weight", "cap_pad_token"} <= set(tensors)
    fused = torch.cat([src[f"layers.1.attention.{p}.weight"] for p in ("to_q", "to_k", "to_v")])
    q_ref, s_ref = quantize_per_tensor(fused)
    assert same_bits(tensors["layers.1.attention.qkv.weight"], q_ref)
    assert same_bits(tensors["layers.1.attention.qkv.weight_scale"], s_ref)
    assert check(out, "comfyui").ok


def test_single_file_targets_refuse_block_scales_and_non_files(qwen_src, tmp_path):
    for target in ("comfyui", "diffusers"):
        result = CliRunner().invoke(main, ["convert", str(qwen_src), str(tmp_path / "x.safetensors"), "--target",
                                           target, "--weight-block-size", "32,32"])
        assert result.exit_code == 1 and "per-tensor scales only" in result.stderr
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        convert(qwen_src, tmp_path / "folder", target="comfyui", progress=False)
    with pytest.raises(OutputExistsError, match="inside the source"):
        convert(qwen_src, qwen_src / "x.safetensors", target="comfyui", progress=False)


def test_single_file_force_replaces_only_our_own_file(qwen_src, tmp_path):
    out = tmp_path / "q.safetensors"
    foreign = b"not ours at all"
    out.write_bytes(foreign)
    with pytest.raises(OutputExistsError, match="pass --force"):
        convert(qwen_src, out, target="comfyui", progress=False)
    with pytest.raises(OutputExistsError, match="not an omni-fp8 output"):
        convert(qwen_src, out, target="comfyui", force=True, progress=False)
    assert out.read_bytes() == foreign
    out.unlink()
    convert(qwen_src, out, target="diffusers", progress=False)
    first = out.stat().st_ino
    convert(qwen_src, out, target="comfyui", force=True, progress=False)  # an earlier output: replaced
    assert out.stat().st_ino != first and check(out, "comfyui").ok
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# ----------------------------------------------------------------------------- stock diffusers


_DIFFUSERS_LOAD = textwrap.dedent("""
    import sys, torch
    from diffusers import BFLQuantizationConfig, {cls}
    from safetensors.torch import save_file
    assert not any(m.startswith("omni_fp8") for m in sys.modules)
    model = {cls}.from_single_file(sys.argv[1], config=sys.argv[2], quantization_config=BFLQuantizationConfig())
    state = {{}}
    for name, module in model.named_modules():
        if type(module).__name__ == "BFLFP8RLinear":
            state[name + ".weight"] = module.weight.data.contiguous()
            state[name + ".weight_scale"] = module.weight_scale.contiguous()
    torch.manual_seed(0)
    {forward}
    state["__output__"] = out.float().contiguous()
    save_file(state, sys.argv[3])
    assert not any(m.startswith("omni_fp8") for m in sys.modules)
""")
_QWEN_FORWARD = """out = model(hidden_states=torch.randn(1, 16, 16, dtype=torch.bfloat16), encoder_hidden_states=torch.randn(1, 7, 32, dtype=torch.bfloat16), encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.bool), timestep=torch.tensor([0.5], dtype=torch.bfloat16), img_shapes=[[(1, 4, 4)]], return_dict=False)[0]"""


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_stock_diffusers_loads_the_fp8r_file(strategy, qwen_src, tmp_path):
    from omni_fp8 import load_transformer

    out = tmp_path / "qwen-fp8r.safetensors"
    convert(qwen_src, out, config={"weight_strategy": strategy}, target="diffusers", progress=False)
    assert check(out, "diffusers").ok
    script = _DIFFUSERS_LOAD.format(cls="QwenImageTransformer2DModel", forward="with torch.no_grad(): " + _QWEN_FORWARD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script, str(out), str(qwen_src), str(tmp_path / "loaded.st")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = file_tensors(tmp_path / "loaded.st")
    written = file_tensors(out)
    layers = [k for k in loaded if k.endswith(".weight")]
    assert len(layers) == make_plan(open_source(qwen_src)).summary()["linears_quantized"] == 28
    source = load_tensors(qwen_src)
    for name in layers:  # stock diffusers holds exactly the bits we wrote: codes, and each row's scale
        assert same_bits(loaded[name], written[name])
        assert same_bits(loaded[name + "_scale"], written[name + "_scale"])
        if strategy == "tensor":
            assert torch.unique(loaded[name + "_scale"]).numel() == 1
        else:
            q, rows = quantize_per_channel(source[name])
            assert same_bits(written[name], q) and same_bits(written[name + "_scale"], rows.reshape(-1))

    def run(model):
        torch.manual_seed(0)
        with torch.no_grad():
            return model(hidden_states=torch.randn(1, 16, 16, dtype=torch.bfloat16),
                         encoder_hidden_states=torch.randn(1, 7, 32, dtype=torch.bfloat16),
                         encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.bool),
                         timestep=torch.tensor([0.5], dtype=torch.bfloat16), img_shapes=[[(1, 4, 4)]],
                         return_dict=False)[0].float()

    bf16 = run(load_transformer(qwen_src, dtype=torch.bfloat16, progress=False))
    ours = run(load_transformer(qwen_src, quantization="fp8", dtype=torch.bfloat16, progress=False))
    theirs = loaded["__output__"]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(theirs, bf16) < 0.02, rel(theirs, bf16)  # weight-only FP8 in diffusers
    assert rel(theirs, ours) < 0.02, rel(theirs, ours)  # ours also quantizes activations (W8A8)
