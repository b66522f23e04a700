"""``omni-convert``: every command, and every known failure as one line with a non-zero exit."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tree_digest

from omni_fp8.converter.cli import main
from omni_fp8.converter.source import INDEX_NAME, MANIFEST_NAME


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert fragment in err, err


def test_convert_prints_plan_and_final_line(qwen_src, tmp_path):
    result = run("convert", qwen_src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Preset:   qwen-image" in result.stderr and "Ignored:  img_in (1 Linear)" in result.stderr
    line = result.stdout.strip()
    assert "\n" not in line and "Linears in FP8" in line and "GB/s" in line and str(tmp_path / "out") in line
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()


def test_convert_json_and_quiet(qwen_src, tmp_path):
    result = run("convert", qwen_src, tmp_path / "out", "--json", "--quiet", "--weight-block-size", "32,32",
                 "--ignored-layers", "to_qkv", "--ignored-layers", "txt_mlp,re:^proj_out$")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    data = json.loads(result.stdout)
    preset = ["img_in", "txt_in", "time_text_embed", "norm_out", "proj_out"]
    assert data["options"]["ignored_layers"] == [*preset, "to_qkv", "txt_mlp", "re:^proj_out$"]
    assert data["quantization_config"]["weight_block_size"] == [32, 32]
    assert data["linears_quantized"] < data["linears"] and data["output_bytes"] < data["source_bytes"]


def test_inspect_source_and_converted(qwen_src, tmp_path):
    plan = run("inspect", qwen_src)
    assert plan.exit_code == 0
    assert "transformer_blocks.*.img_mlp.net.0.proj.weight" in plan.stdout
    assert "kept (ignored:img_in)" in plan.stdout and "Size:" in plan.stdout
    plan_json = json.loads(run("inspect", qwen_src, "--json", "--preset", "none").stdout)
    assert plan_json["summary"]["linears_quantized"] == plan_json["summary"]["linears"]
    assert {t["scheme"] for t in plan_json["tensors"]} == {"fp8_tensor", "kept"}

    run("convert", qwen_src, tmp_path / "out", "--quiet")
    summary = run("inspect", tmp_path / "out")
    assert summary.exit_code == 0 and "Folder:" in summary.stdout and "28 of 34 in FP8" in summary.stdout
    data = json.loads(run("inspect", tmp_path / "out", "--json").stdout)
    assert data["quantization_config"]["quant_method"] == "fp8"


def test_verify_ok_and_tampered(qwen_src, tmp_path):
    out = tmp_path / "out"
    run("convert", qwen_src, out, "--quiet")
    ok = run("verify", out, "--quiet")
    assert ok.exit_code == 0 and ok.stdout.startswith("OK: 3 files")
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    bad = run("verify", out, "--quiet")
    assert bad.exit_code == 1
    assert f"{shard.name}: size" in bad.stderr or f"{shard.name}: SHA-256 differs" in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert json.loads(run("verify", out, "--json", "--quiet").stdout)["ok"] is False


def test_demo(tmp_path):
    result = run("demo", tmp_path / "demo", "--quiet")
    assert result.exit_code == 0, result.output
    assert "relative L2 error" in result.stdout
    assert (tmp_path / "demo" / "qwen-image-tiny-fp8" / MANIFEST_NAME).is_file()
    assert_one_line_error(run("demo", tmp_path / "demo", "--quiet"), "already exists; pass --force")
    assert run("demo", tmp_path / "demo", "--quiet", "--force").exit_code == 0


def damage_truncate(folder):
    shard = sorted(folder.glob("*-00002-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])


def damage_index(folder):
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "/etc/passwd"
    (folder / INDEX_NAME).write_text(json.dumps(index))


def damage_missing_shard(folder):
    sorted(folder.glob("*-00003-of-*.safetensors"))[0].unlink()


def damage_config(folder):
    (folder / "config.json").write_text("{")


def damage_pickle(folder):
    for p in folder.iterdir():
        p.unlink()
    (folder / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel"}))
    torch.save({}, folder / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize("damage,fragment", [
    (damage_truncate, "not a valid safetensors file"),
    (damage_index, "outside the model folder"),
    (damage_missing_shard, "is missing"),
    (damage_config, "config.json is not valid JSON"),
    (damage_pickle, "never unpickles"),
])
def test_damaged_sources_fail_in_one_line_and_leave_nothing(copy_of, qwen_src, tmp_path, damage, fragment):
    src = copy_of(qwen_src)
    damage(src)
    before = tree_digest(src)
    assert_one_line_error(run("convert", src, tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert tree_digest(src) == before


@pytest.mark.parametrize("args,fragment", [
    (["--preset", "qwen"], "unknown preset 'qwen'"),
    (["--weight-block-size", "128,100"], "bad weight_block_size"),
    (["--weight-block-size", "abc"], "bad weight_block_size"),
    (["--ignored-layers", "img_mpl"], "matches no Linear layer of QwenImageTransformer2DModel; closest names: img_mlp"),
    (["--activation-scheme", "static"], "activation_scheme 'static' needs a calibration"),
    (["--activation-scheme", "static", "--calibration", "nope.safetensors"], "no such calibration file"),
    (["--calibration", "nope.safetensors"], "calibration is given but activation_scheme is 'dynamic'"),
    (["--max-shard-size", "huge"], "bad size 'huge'"),
])
def test_bad_options(qwen_src, tmp_path, args, fragment):
    assert_one_line_error(run("convert", qwen_src, tmp_path / "out", *args), fragment)
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path):
    assert_one_line_error(run("convert", tmp_path / "nope", tmp_path / "out"), "no such folder")
    assert_one_line_error(run("inspect", tmp_path / "nope"), "no such folder")
    assert_one_line_error(run("verify", tmp_path), "no manifest")


def test_unknown_option_is_a_usage_error(qwen_src, tmp_path):
    result = run("convert", qwen_src, tmp_path / "out", "--ignore-layers", "img_mlp")
    assert result.exit_code == 2
    assert "No such option '--ignore-layers'." in result.stderr and "'--ignored-layers'" in result.stderr


def test_nan_weight_fails_mid_run_and_publishes_nothing(tmp_path):
    from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image

    model = tiny_qwen_image()
    with torch.no_grad():
        model.transformer_blocks[1].attn.to_k.weight[0, 0] = float("nan")
    src = save_checkpoint(model, tmp_path / "src")
    result = run("convert", src, tmp_path / "out", "--quiet")
    assert_one_line_error(result, "transformer_blocks.1.attn.to_k.weight: the weight holds NaN or Inf")
    loud = run("convert", src, tmp_path / "out")  # with the plan and progress bar, the error is still one line, last
    assert loud.exit_code == 1 and loud.stderr.strip().splitlines()[-1].startswith("error: transformer_blocks.1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "convert", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "SourceNotFoundError"  # raised, not turned into a line
