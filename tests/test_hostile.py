"""Hostile but realistic input: every case a one-line error or a correct result, never a lost file.

Each test names the class of input it stands for. Reproductions start from the tiny fixtures of
conftest (a BF16 Qwen-Image transformer, an FP32 Z-Image one, a whole Qwen-Image pipeline).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import hf_cache_copy, load_tensors, tree_digest
from safetensors.torch import load_file, save_file

from omni_fp8 import Fp8Linear, convert, load_transformer, verify
from omni_fp8.converter.cli import main
from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image, tiny_z_image
from omni_fp8.converter.errors import (
    ConfigError,
    CorruptCheckpointError,
    CorruptScaleError,
    DtypeRangeError,
    ModelMismatchError,
    OmniFp8Error,
    OutputExistsError,
    SourceNotFoundError,
    UnsupportedSourceError,
)
from omni_fp8.converter.source import INDEX_NAME, MANIFEST_NAME

TINY = torch.finfo(torch.float32).tiny


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert fragment in err, err
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".omni-fp8-" in p.name)


# --- 1. --force never deletes what omni-fp8 did not write ---------------------------------------

@pytest.mark.parametrize("manifest", [
    "",                                               # an empty file with the manifest's name
    "{",                                              # not JSON
    '{"format": "omni-fp8-manifest", "format_version": 1}',  # the right header, nothing else
])
def test_force_refuses_a_folder_whose_manifest_does_not_parse(qwen_src, tmp_path, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    (out / MANIFEST_NAME).write_text(manifest)
    one_line_error(run("convert", qwen_src, out, "-q", "--force"), "is not an omni-fp8 output")
    assert (out / "precious.txt").read_text() == "keep"
    assert leftovers(tmp_path) == []


def test_force_refuses_an_earlier_output_holding_other_files(qwen_src, tmp_path):
    out = tmp_path / "out"
    convert(qwen_src, out, progress=False)
    (out / "notes").mkdir()
    (out / "notes" / "precious.txt").write_text("keep")
    err = one_line_error(run("convert", qwen_src, out, "-q", "--force"), "holds files its manifest does not list")
    assert "notes/precious.txt" in err
    assert (out / "notes" / "precious.txt").read_text() == "keep" and verify(out).problems == [
        "notes/precious.txt: not in the manifest"]


def test_force_refuses_a_manifest_copied_from_another_output(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "real", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tmp_path / "real" / MANIFEST_NAME, out / MANIFEST_NAME)
    (out / "thesis.tex").write_text("years of work")
    one_line_error(run("convert", qwen_src, out, "-q", "--force"), "(thesis.tex)")
    assert (out / "thesis.tex").exists()


def test_force_refuses_a_symlinked_output(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "real", progress=False)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    one_line_error(run("convert", qwen_src, tmp_path / "link", "-q", "--force"), "is a symbolic link")
    assert verify(tmp_path / "real").ok


def test_an_empty_output_folder_is_used_without_force(qwen_src, tmp_path):
    (tmp_path / "out").mkdir()
    assert run("convert", qwen_src, tmp_path / "out", "-q").exit_code == 0
    assert verify(tmp_path / "out").ok


def test_demo_force_only_replaces_an_earlier_demo(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "qwen-image-tiny-fp8").mkdir()
    (out / "qwen-image-tiny-fp8" / MANIFEST_NAME).write_text("")
    (out / "precious.txt").write_text("keep")
    one_line_error(run("demo", out, "-q", "--force"), "is not an earlier demo output")
    assert (out / "precious.txt").exists()
    shutil.rmtree(out)
    assert run("demo", out, "-q").exit_code == 0
    (out / "qwen-image-tiny-bf16" / "precious.txt").write_text("keep")
    one_line_error(run("demo", out, "-q", "--force"), "files the demo did not write: qwen-image-tiny-bf16/precious.txt")
    (out / "qwen-image-tiny-bf16" / "precious.txt").unlink()
    assert run("demo", out, "-q", "--force").exit_code == 0


# --- 2. Publishing re-checks OUT atomically (see also test_safety.py for runs racing each other) --

def test_publish_never_replaces_a_folder_that_appeared_meanwhile(tmp_path):
    from omni_fp8.converter.output import check_output, publish, staging_folder

    out = tmp_path / "out"
    existing = check_output(out, tmp_path / "src", force=True)
    with staging_folder(out) as staging:
        (staging / "new.txt").write_text("new")
        out.mkdir()
        (out / "precious.txt").write_text("keep")
        with pytest.raises(OutputExistsError, match="appeared while converting"):
            publish(staging, out, existing)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_never_replaces_an_earlier_output_that_changed_meanwhile(qwen_src, tmp_path):
    from omni_fp8.converter.output import check_output, publish, staging_folder

    out = tmp_path / "out"
    convert(qwen_src, out, progress=False)
    existing = check_output(out, qwen_src, force=True)
    with staging_folder(out) as staging:
        (out / "added-meanwhile.txt").write_text("keep")
        with pytest.raises(OutputExistsError, match="changed while converting"):
            publish(staging, out, existing)
    assert (out / "added-meanwhile.txt").exists() and (out / MANIFEST_NAME).exists()
    with staging_folder(out) as staging:  # the same name, another folder: also refused
        os.rename(out, tmp_path / "moved")
        shutil.copytree(tmp_path / "moved", out)
        (out / "added-meanwhile.txt").unlink()
        with pytest.raises(OutputExistsError, match="changed while converting"):
            publish(staging, out, existing)
    assert verify(out).ok and sorted(p.name for p in tmp_path.iterdir()) == ["moved", "out"]


# --- 3. Subnormal weights and activations: finite, positive scales ------------------------------

def test_subnormal_weight_converts_and_loads_finite(tmp_path):
    model = tiny_qwen_image()
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_q.weight.fill_(1e-44)
        model.transformer_blocks[1].txt_mlp.net[2].weight.fill_(0.0)
    src = save_checkpoint(model, tmp_path / "src", dtype=torch.float32, max_shard_size="100MB")
    for block in (None, [16, 16]):
        out = tmp_path / f"out-{block is None}"
        convert(src, out, config={"weight_block_size": block, "preset": "none"}, progress=False)
        tensors = load_tensors(out)
        scale = tensors["transformer_blocks.0.attn.to_q.weight_scale" + ("_inv" if block else "")]
        assert (scale == TINY).all()
        zero_scale = tensors["transformer_blocks.1.txt_mlp.net.2.weight_scale" + ("_inv" if block else "")]
        assert (zero_scale == 1.0).all()
        for name, t in tensors.items():
            if t.dtype == torch.float8_e4m3fn:
                assert not torch.isnan(t.float()).any(), name
        loaded = load_transformer(out, progress=False)
        assert all(torch.isfinite(p.float()).all() for p in loaded.parameters())


def test_fp8_linear_with_subnormal_activations_stays_finite():
    layer = Fp8Linear.from_linear(torch.nn.Linear(32, 16))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.full((3, 32), 1e-40, dtype=dtype)
        y = layer(x)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, layer.bias.to(dtype).expand(3, 16), rtol=0, atol=1e-6)


# --- 4. A cast that would overflow is refused, naming the tensor ------------------------------------

@pytest.fixture(scope="module")
def loud_norm_src(tmp_path_factory) -> Path:
    """FP32 Qwen-Image whose kept norm weight holds 1e6: beyond float16's range."""
    model = tiny_qwen_image()
    with torch.no_grad():
        model.txt_norm.weight[3] = 1e6
    return save_checkpoint(model, tmp_path_factory.mktemp("loud") / "src", dtype=torch.float32)


def test_dtype_fp16_overflow_is_refused(loud_norm_src, tmp_path):
    one_line_error(run("convert", loud_norm_src, tmp_path / "out", "-q", "--dtype", "fp16"),
                   "txt_norm.weight: holds 1e+06, beyond float16's largest value 65504")
    assert list(tmp_path.iterdir()) == []
    assert run("convert", loud_norm_src, tmp_path / "out", "-q", "--dtype", "bf16").exit_code == 0
    with pytest.raises(DtypeRangeError, match="txt_norm.weight: holds 1e"):
        load_transformer(loud_norm_src, dtype=torch.float16, progress=False)
    with pytest.raises(DtypeRangeError, match="txt_norm.weight: holds 1e"):
        load_transformer(loud_norm_src, quantization="fp8", dtype="fp16", progress=False)


# --- 5. Damaged scales and FP8 NaN codes are refused on load ---------------------------------------

def rewrite(folder: Path, name: str, value: torch.Tensor) -> None:
    """Replace one tensor's value in place (same dtype and shape), as a bit flip on disk would."""
    index = json.loads((folder / INDEX_NAME).read_text())
    path = folder / index["weight_map"][name]
    tensors = load_file(path)
    tensors[name] = value.to(tensors[name].dtype).reshape(tensors[name].shape)
    save_file(tensors, path)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.01, 0.0])
def test_damaged_scale_is_refused_on_load(qwen_src, tmp_path, value):
    convert(qwen_src, tmp_path / "fp8", progress=False)
    rewrite(tmp_path / "fp8", "transformer_blocks.1.attn.to_k.weight_scale", torch.tensor(value))
    with pytest.raises(CorruptScaleError, match=r"transformer_blocks.1.attn.to_k.weight_scale holds .*finite and positive"):
        load_transformer(tmp_path / "fp8", progress=False)
    assert not verify(tmp_path / "fp8").ok  # verify finds it too, through the hashes


def test_damaged_block_scale_and_nan_codes_are_refused(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "fp8", config={"weight_block_size": [32, 32]}, progress=False)
    name = "transformer_blocks.0.attn.to_v.weight"
    grid = load_tensors(tmp_path / "fp8")[name + "_scale_inv"]
    grid[1, 1] = float("nan")
    rewrite(tmp_path / "fp8", name + "_scale_inv", grid)
    with pytest.raises(CorruptScaleError, match=r"to_v.weight_scale_inv holds nan"):
        load_transformer(tmp_path / "fp8", progress=False)
    grid[1, 1] = 0.01
    rewrite(tmp_path / "fp8", name + "_scale_inv", grid)
    q = load_tensors(tmp_path / "fp8")[name]
    q.view(torch.uint8)[5, 7] = 0x7F
    rewrite(tmp_path / "fp8", name, q)
    with pytest.raises(CorruptScaleError, match=rf"{name} holds FP8 NaN codes"):
        load_transformer(tmp_path / "fp8", progress=False)


def test_fp8_tensors_without_quantization_config_are_refused(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "fp8", progress=False)
    path = tmp_path / "fp8" / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]
    path.write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="FP8 tensors but config.json has no quantization_config"):
        load_transformer(tmp_path / "fp8", progress=False)
    config["quantization_config"] = "fp8"
    path.write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="quantization_config must be a JSON object, got str"):
        load_transformer(tmp_path / "fp8", progress=False)


# --- 6, 11. Python arguments of the wrong kind: one OmniFp8Error each ---------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": torch.int8}, "dtype torch.int8 is not a compute dtype"),
    ({"dtype": torch.float8_e4m3fn}, "dtype torch.float8_e4m3fn is not a compute dtype"),
    ({"dtype": "int8"}, "dtype 'int8' is not a compute dtype"),
    ({"torch_dtype": torch.float64}, "torch_dtype torch.float64 is not a compute dtype"),
    ({"quantization_config": "fp8"}, "quantization_config must be a dict or Fp8Config, got str"),
    ({"quantization_config": {"ignored_layers": 5}}, "ignored_layers must be a list of layer-name patterns"),
    ({"quantization_config": {"ignored_layers": [5]}}, "ignored_layers entries must be strings, got int 5"),
    ({"quantization_config": {"weight_block_size": 128}}, "bad weight_block_size 128"),
    ({"quantization_config": {"weight_block_size": [128.0, 128]}}, "bad weight_block_size"),
    ({"quantization_config": {"method": ["fp8"]}}, "quantization method ['fp8'] is not supported"),
    ({"quantization_config": {1: 2}}, "unknown quantization_config key(s) 1"),
    ({"quantization": ["fp8"]}, "unknown quantization ['fp8']"),
    ({"device": "cuda:banana"}, "is not a device torch knows"),
    ({"device": 3.5}, "is not a device torch knows"),
    ({"device": "meta"}, "device 'meta' is not available here"),
])
def test_python_arguments_of_the_wrong_kind(qwen_src, kwargs, match):
    kwargs.setdefault("quantization", "fp8")
    with pytest.raises(OmniFp8Error) as info:
        load_transformer(qwen_src, progress=False, **kwargs)
    assert match in str(info.value), str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(qwen_src):
    with pytest.raises(ConfigError, match=r"device 'cuda': this torch \(.*\) sees no CUDA GPU; .*device='cpu'"):
        load_transformer(qwen_src, device="cuda", progress=False)


def test_converted_folder_with_an_integer_dtype(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "fp8", progress=False)
    with pytest.raises(ConfigError, match="dtype torch.int8 is not a compute dtype"):
        load_transformer(tmp_path / "fp8", dtype=torch.int8, progress=False)
    model = load_transformer(tmp_path / "fp8", dtype="bf16", progress=False)  # names are accepted
    assert model.transformer_blocks[0].attn.to_q.bias.dtype == torch.bfloat16
    assert model.transformer_blocks[0].attn.to_q.bias.abs().sum() > 0


# --- 7, 12. A config that does not describe the weights ------------------------------------------

@pytest.mark.parametrize("edit,fragment", [
    ({"num_layers": 1}, "the checkpoint has 32 tensor(s) that QwenImageTransformer2DModel built from config.json "
                        "does not (transformer_blocks.1."),
    ({"num_layers": -1}, "the checkpoint has 2 transformer_blocks, config.json builds 0"),
    ({"num_layers": 0}, "the checkpoint has 2 transformer_blocks, config.json builds 0"),
])
def test_config_that_does_not_describe_the_weights(copy_of, qwen_src, tmp_path, edit, fragment):
    src = copy_of(qwen_src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **edit}))
    one_line_error(run("convert", src, tmp_path / "out", "-q"), fragment)
    one_line_error(run("inspect", src), fragment)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelMismatchError):
        load_transformer(src, progress=False)
    with pytest.raises(ModelMismatchError):
        load_transformer(src, quantization="fp8", progress=False)


def test_a_bias_of_shape_zero(copy_of, qwen_src, tmp_path):
    src = copy_of(qwen_src)
    index = json.loads((src / INDEX_NAME).read_text())
    path = src / index["weight_map"]["img_in.bias"]
    tensors = load_file(path)
    tensors["img_in.bias"] = torch.zeros(0, dtype=torch.bfloat16)
    save_file(tensors, path)
    one_line_error(run("convert", src, tmp_path / "out", "-q"),
                   "img_in.bias has shape [0] but QwenImageTransformer2DModel built from config.json expects [64]")
    assert not (tmp_path / "out").exists()


# --- 8. The Hugging Face cache as a source ------------------------------------------------------

def test_hf_cache_snapshot_converts_with_no_links_in_the_output(qwen_pipeline, tmp_path):
    repo, snapshot = hf_cache_copy(qwen_pipeline, tmp_path / "hub", "Qwen/Qwen-Image-tiny")
    assert (snapshot / "model_index.json").is_symlink()
    before = tree_digest(repo)
    for i, src in enumerate((snapshot, repo)):  # the snapshot, or the model's cache folder (refs/main)
        out = tmp_path / f"out{i}"
        assert run("convert", src, out, "-q").exit_code == 0
        assert not [p for p in out.rglob("*") if p.is_symlink()]
        assert verify(out).ok
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        assert manifest["source"]["repo_id"] == "Qwen/Qwen-Image-tiny"
        assert manifest["source"]["commit"] == snapshot.name
        assert (out / "vae" / "config.json").read_bytes() == (qwen_pipeline / "vae" / "config.json").read_bytes()
        model = load_transformer(out, progress=False)
        assert isinstance(model.transformer_blocks[0].attn.to_q, Fp8Linear)
    assert tree_digest(repo) == before
    t = load_transformer(repo, quantization="fp8", progress=False)  # the loader reads the cache the same way
    assert isinstance(t.transformer_blocks[0].attn.to_k, Fp8Linear)


def test_hf_cache_folder_without_refs_and_several_snapshots(qwen_src, tmp_path):
    repo, snapshot = hf_cache_copy(qwen_src, tmp_path / "hub", "org/tiny")
    (repo / "refs" / "main").unlink()
    shutil.copytree(snapshot, repo / "snapshots" / ("f" * 40), symlinks=True)
    one_line_error(run("inspect", repo), "a Hugging Face cache folder without refs/main and with 2 snapshots; pass one")


# --- 9. Links, loops and special files inside a pipeline ----------------------------------------

def test_component_that_is_a_link_to_elsewhere_is_carried(qwen_pipeline, tmp_path):
    src = tmp_path / "pipe"
    shutil.copytree(qwen_pipeline, src)
    shutil.move(src / "vae", tmp_path / "elsewhere-vae")
    (src / "vae").symlink_to(tmp_path / "elsewhere-vae")
    out = tmp_path / "out"
    assert run("convert", src, out, "-q").exit_code == 0
    assert (out / "vae").is_dir() and not (out / "vae").is_symlink()
    assert sorted(p.name for p in (out / "vae").iterdir()) == sorted(p.name for p in (tmp_path / "elsewhere-vae").iterdir())
    assert verify(out).ok


@pytest.mark.parametrize("make,fragment", [
    (lambda d: os.mkfifo(d / "vae" / "pipe"), "not a regular file (a FIFO)"),
    (lambda d: (d / "vae" / "gone.json").symlink_to(d / "nowhere.json"), "a broken symbolic link"),
    (lambda d: (d / "vae" / "loop").symlink_to(d), "a symbolic link loop"),
])
def test_special_files_in_a_pipeline_are_refused_before_writing(qwen_pipeline, tmp_path, make, fragment):
    src = tmp_path / "pipe"
    shutil.copytree(qwen_pipeline, src)
    make(src)
    proc = subprocess.run([sys.executable, "-m", "omni_fp8.converter.cli", "convert", str(src), str(tmp_path / "out"),
                           "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


# --- 10. A failed write: the real error, once, naming the user's path --------------------------

def test_file_size_limit_is_one_line_naming_the_output(qwen_src, tmp_path):
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    proc = subprocess.run([sys.executable, "-m", "omni_fp8.converter.cli", "convert", str(qwen_src), str(out), "-q",
                           "--max-shard-size", "1MB"], capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {out}: writing diffusion_pytorch_model-00001-of-00001.safetensors failed: "
                                  "File too large; ")
    assert "omni-fp8-partial" not in proc.stderr and "lower --max-shard-size" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(qwen_src, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    one_line_error(run("convert", qwen_src, parent / "out", "-q"), "Permission denied")


# --- 11. Malformed JSON and manifests ----------------------------------------------------------

def test_deeply_nested_json_is_a_corrupt_file_not_a_crash(copy_of, qwen_src, tmp_path):
    src = copy_of(qwen_src)
    deep = "[" * 200_000 + "]" * 200_000
    (src / "config.json").write_text('{"_class_name": "QwenImageTransformer2DModel", "x": ' + deep + "}")
    one_line_error(run("convert", src, tmp_path / "out", "-q"), "config.json nests JSON too deeply")
    src = tmp_path / "src2"  # the same inside a shard header
    shutil.copytree(qwen_src, src)
    shard = sorted(src.glob("*.safetensors"))[0]
    header = ('{"x": ' + deep + "}").encode()
    shard.write_bytes(len(header).to_bytes(8, "little") + header)
    one_line_error(run("inspect", src), "its header nests JSON too deeply")


@pytest.mark.parametrize("edit,fragment", [
    (lambda m: m.update(files=[]), "'files' is missing or not a JSON object"),
    (lambda m: [f.pop("size") for f in m["files"].values()], "has no size"),
    (lambda m: m.pop("tensors"), "'tensors' is missing"),
    (lambda m: m["tensors"][0].pop("shape"), "has a malformed shape"),
    (lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}), "is not a path inside"),
    (lambda m: m["totals"].update(output_bytes="big"), "totals.output_bytes"),
])
def test_malformed_manifests_for_verify_and_inspect(qwen_src, tmp_path, edit, fragment):
    out = tmp_path / "out"
    convert(qwen_src, out, progress=False)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    edit(manifest)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    for command in ("verify", "inspect"):
        one_line_error(run(command, out), fragment)
    with pytest.raises(CorruptCheckpointError):
        load_transformer(out, progress=False)


# --- 12. Options that used to give unclear messages ----------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["--weight-block-size", "²,16"], "bad weight_block_size '²,16'"),
    (["--weight-block-size", "1e2,16"], "bad weight_block_size"),
    (["--max-shard-size", "0.5"], "bad size '0.5': that is less than one byte"),
    (["--max-shard-size", "-5GB"], "bad size '-5GB'"),
    (["--max-shard-size", "0"], "bad size '0'"),
])
def test_unclear_options_now_say_what_is_wrong(qwen_src, tmp_path, args, fragment):
    one_line_error(run("convert", qwen_src, tmp_path / "out", "-q", *args), fragment)


def test_a_regex_with_commas_after_plain_patterns(qwen_src, tmp_path):
    result = run("inspect", qwen_src, "--json", "--preset", "none", "--ignored-layers", r"img_mlp,re:^transformer_blocks\.[01]{1,1}\.attn\.to_q$")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["options"]["ignored_layers"] == ["img_mlp", r"re:^transformer_blocks\.[01]{1,1}\.attn\.to_q$"]
    hits = data["summary"]["pattern_hits"]
    assert hits == {"img_mlp": 4, r"re:^transformer_blocks\.[01]{1,1}\.attn\.to_q$": 2}


def test_subfolder_paths_are_judged_by_their_text(qwen_pipeline):
    for bad in ("../x", "/etc", "a/../../b", ""):
        if bad:
            with pytest.raises(UnsupportedSourceError, match="is not a folder inside"):
                load_transformer(qwen_pipeline, subfolder=bad, progress=False)
    with pytest.raises(SourceNotFoundError):
        load_transformer(qwen_pipeline, subfolder="nothing-here", progress=False)


def test_unexpected_exceptions_are_still_one_line(qwen_src, tmp_path, monkeypatch):
    import omni_fp8.converter.plan as plan

    monkeypatch.setattr(plan, "decide_linears", lambda *a, **k: 1 / 0)
    err = one_line_error(run("inspect", qwen_src), "unexpected ZeroDivisionError: division by zero (a bug in omni-fp8")
    assert "--debug" in err


def test_z_image_fp32_fp16_overflow_and_recovery(tmp_path):
    model = tiny_z_image()
    with torch.no_grad():
        model.layers[0].attention_norm1.weight[0] = 7e4
    src = save_checkpoint(model, tmp_path / "src", dtype=torch.float32, max_shard_size="100MB")
    one_line_error(run("convert", src, tmp_path / "out", "-q", "--dtype", "fp16"),
                   "layers.0.attention_norm1.weight: holds 7e+04, beyond float16's largest value")
    assert run("convert", src, tmp_path / "out", "-q").exit_code == 0
    assert verify(tmp_path / "out").ok
