"""The model-structure cache: same plan as a fresh build, and commands that need no diffusers import none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import tree_digest

from omni_fp8.converter import plan as plan_module
from omni_fp8.converter import structure
from omni_fp8.converter.errors import UnsupportedSourceError
from omni_fp8.converter.plan import make_plan, meta_model, model_structure, structure_of
from omni_fp8.converter.source import MANIFEST_NAME, open_source


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder of this test alone, and no structure remembered in this process."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("OMNI_FP8_CACHE", str(folder))
    monkeypatch.setattr(structure, "_memo", {})
    return folder / "structures"


def no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built although its structure is cached")

    monkeypatch.setattr(plan_module, "meta_model", refuse)


@pytest.mark.parametrize("fixture", ["qwen_src", "zimage_src"])
def test_cached_structure_is_the_built_one(request, cache, monkeypatch, fixture):
    source = open_source(request.getfixturevalue(fixture))
    built = structure_of(meta_model(source.class_name, source.config), source.class_name)
    assert model_structure(source.class_name, source.config) == built
    assert len(list(cache.glob("*.json"))) == 1
    if fixture == "zimage_src":
        assert built.dtype_read  # the timestep embedder's Linear: the source-code scan survives the cache
    monkeypatch.setattr(structure, "_memo", {})  # a new process: only the file remains
    no_build(monkeypatch)
    cached = model_structure(source.class_name, source.config)
    assert cached == built and list(cached.tensors) == list(built.tensors) and list(cached.linears) == list(built.linears)
    # quantization_config does not change what is built: a converted folder shares its source's entry
    assert model_structure(source.class_name, {**source.config, "quantization_config": {"quant_method": "fp8"}}) == built


def test_plan_and_output_are_the_same_from_the_cache(qwen_src, cache, tmp_path, monkeypatch):
    from omni_fp8.converter import convert

    first = convert(qwen_src, tmp_path / "cold", config={"ignored_layers": ["img_mlp"]}, progress=False)
    monkeypatch.setattr(structure, "_memo", {})
    no_build(monkeypatch)
    second = convert(qwen_src, tmp_path / "warm", config={"ignored_layers": ["img_mlp"]}, progress=False)
    for key in ("tensors", "quantization_config", "options", "files"):
        assert first.manifest[key] == second.manifest[key], key
    cold, warm = tree_digest(tmp_path / "cold"), tree_digest(tmp_path / "warm")
    for name in set(cold) | set(warm):
        if name != MANIFEST_NAME:  # it records the time and the folder
            assert cold[name].split(":")[0] == warm[name].split(":")[0], name


def _entry(cache):
    (path,) = cache.glob("*.json")
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("damage", ["stale file", "other diffusers", "other install", "bad json", "bad shape",
                                    "missing file"])
def test_a_stale_or_damaged_entry_is_built_again(qwen_src, cache, monkeypatch, damage):
    source = open_source(qwen_src)
    built = model_structure(source.class_name, source.config)
    path, entry = _entry(cache)
    if damage == "stale file":  # diffusers edited in place, same version
        some = next(iter(entry["files"]))
        entry["files"][some][0] += 1
    elif damage == "other diffusers":
        entry["inputs"]["versions"]["diffusers"] = "0.0.1"
    elif damage == "other install":  # the same version installed elsewhere, e.g. another venv on PYTHONPATH
        entry["inputs"]["packages"]["diffusers"] = "/elsewhere/diffusers/__init__.py"
    elif damage == "bad shape":
        entry["structure"]["tensors"][next(iter(entry["structure"]["tensors"]))] = [-1]
    elif damage == "missing file":
        entry["files"]["/nonexistent/module.py"] = [0, 0]
    path.write_text("{not json" if damage == "bad json" else json.dumps(entry))
    monkeypatch.setattr(structure, "_memo", {})
    calls = []
    real = plan_module.meta_model
    monkeypatch.setattr(plan_module, "meta_model", lambda *a: calls.append(a) or real(*a))
    assert model_structure(source.class_name, source.config) == built
    assert len(calls) == 1
    inputs = _entry(cache)[1]["inputs"]  # rewritten, usable again
    assert inputs["versions"]["diffusers"] != "0.0.1" and inputs["packages"]["diffusers"].startswith(os.sep)
    assert "elsewhere" not in inputs["packages"]["diffusers"]


def test_cache_off_or_unwritable_changes_nothing(qwen_src, tmp_path, monkeypatch):
    source = open_source(qwen_src)
    expected = structure_of(meta_model(source.class_name, source.config), source.class_name)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for setting in ("off", str(blocker)):  # a file where the folder should be: every write fails
        monkeypatch.setenv("OMNI_FP8_CACHE", setting)
        monkeypatch.setattr(structure, "_memo", {})
        assert model_structure(source.class_name, source.config) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_config_that_fails_to_build_is_not_cached(qwen_src, cache):
    source = open_source(qwen_src)
    for _ in range(2):  # the second time too: the same error, from the build
        with pytest.raises(UnsupportedSourceError, match="could not build QwenImageTransformer2DModel"):
            model_structure(source.class_name, {**source.config, "num_attention_heads": "two"})
    with pytest.raises(UnsupportedSourceError, match="not a model class of diffusers"):
        model_structure("NoSuchTransformer", source.config)
    assert not cache.exists() or not list(cache.glob("*.json"))


def test_make_plan_takes_a_built_model_or_its_structure(qwen_src, cache):
    source = open_source(qwen_src)
    model = meta_model(source.class_name, source.config)
    by_model, by_structure = make_plan(source, model=model), make_plan(source, model=structure_of(model))
    assert by_model.linears == by_structure.linears and by_model.tensors == by_structure.tensors


# ----------------------------------------------------------------------------- imports, in fresh interpreters

_PROBE = """
import json, pathlib, runpy, sys
report = pathlib.Path(sys.argv[1])
sys.argv = ["omni-convert", *sys.argv[2:]]
try:
    runpy.run_module("omni_fp8.converter.cli", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = ("diffusers", "transformers", "peft", "accelerate")
report.write_text(json.dumps({"code": code, "imported": [m for m in heavy if m in sys.modules]}))
"""


def cli_imports(tmp_path, *args, cache_folder):
    report = tmp_path / "imports.json"
    env = {**os.environ, "OMNI_FP8_CACHE": str(cache_folder)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(report), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert report.is_file(), proc.stderr
    result = json.loads(report.read_text())
    assert result["code"] in (0, None), proc.stderr
    return result["imported"]


@pytest.mark.slow
def test_commands_import_diffusers_only_to_build_a_new_structure(qwen_src, tmp_path):
    cache_folder, out = tmp_path / "cache", tmp_path / "out"
    convert = ["convert", qwen_src, out, "--preset", "none", "--quiet"]
    assert "diffusers" in cli_imports(tmp_path, *convert, cache_folder=cache_folder)  # first time: a build
    for args in (["inspect", out], ["verify", out, "--quiet"], ["inspect", out, "--json"]):
        assert cli_imports(tmp_path, *args, cache_folder=tmp_path / "empty-cache") == [], args
    for args in (["inspect", qwen_src], ["check", out, "--target", "omni-fp8"]):
        assert cli_imports(tmp_path, *args, cache_folder=cache_folder) == [], args
    digest = tree_digest(out)
    assert cli_imports(tmp_path, *convert, "--force", cache_folder=cache_folder) == []
    again = tree_digest(out)
    assert {k: v.split(":")[0] for k, v in digest.items() if k != MANIFEST_NAME} == \
           {k: v.split(":")[0] for k, v in again.items() if k != MANIFEST_NAME}
