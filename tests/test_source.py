"""Resolving and validating sources: layouts, indexes, pickles, damaged files, configs."""

from __future__ import annotations

import json

import pytest
import torch

from omni_fp8.converter.errors import (
    CorruptCheckpointError,
    PickleCheckpointError,
    SourceNotFoundError,
    UnsupportedSourceError,
)
from omni_fp8.converter.source import INDEX_NAME, open_source


def test_transformer_folder(qwen_src):
    source = open_source(qwen_src)
    assert source.kind == "transformer" and source.model_dir == qwen_src.resolve()
    assert source.class_name == "QwenImageTransformer2DModel"
    assert len(source.shards) == 4 and source.subfolder == ""
    index = json.loads((qwen_src / INDEX_NAME).read_text())
    assert {t.name for t in source.tensors} == set(index["weight_map"])


def test_single_file_fp32_folder(zimage_src):
    source = open_source(zimage_src)
    assert len(source.shards) == 1 and source.class_name == "ZImageTransformer2DModel"
    assert {t.dtype for t in source.tensors} == {"F32"}


def test_pipeline_folder_finds_its_transformer(qwen_pipeline):
    source = open_source(qwen_pipeline)
    assert source.kind == "pipeline" and source.subfolder == "transformer"
    carried = source.passthrough_files()
    assert "model_index.json" in carried and "README.md" in carried
    assert "vae/config.json" in carried and "scheduler/scheduler_config.json" in carried
    assert "text_encoder/config.json" in carried and "tokenizer/tokenizer.json" in carried
    assert not any(p.startswith("transformer/") for p in carried)


def test_missing_folder(tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"no such folder; give a diffusers pipeline folder"):
        open_source(tmp_path / "nope")


@pytest.mark.parametrize("text", ["nope", "./Qwen/Qwen-Image", "a/b/c", "org/na me", "org/-name"])
def test_neither_a_folder_nor_a_repo_id(text):
    """Only ``org/name`` goes to the Hub (tests/test_hub.py); anything else is a missing folder, offline."""
    with pytest.raises(SourceNotFoundError, match=r"no such folder; give a diffusers pipeline folder"):
        open_source(text)


def test_folder_without_config(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(SourceNotFoundError, match=r"config.json not found"):
        open_source(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel"}))
    torch.save({"w": torch.ones(2)}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match=r"only pickle checkpoints found \(diffusion_pytorch_model.bin\); omni-fp8 never unpickles"):
        open_source(tmp_path)


def test_pickle_file_given_directly(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04junk")
    with pytest.raises(PickleCheckpointError):
        open_source(path)


@pytest.mark.parametrize("config,why", [
    ("{not json", "config.json is not valid JSON"),
    ("[1, 2]", "config.json must be a JSON object"),
    ('{"num_layers": 2}', "config.json has no '_class_name'"),
])
def test_malformed_config(copy_of, qwen_src, config, why):
    folder = copy_of(qwen_src)
    (folder / "config.json").write_text(config)
    with pytest.raises(CorruptCheckpointError, match=why):
        open_source(folder)


def test_truncated_shard_is_found_before_anything_is_converted(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    shard = sorted(folder.glob("*-00003-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name}: not a valid safetensors file: .*truncated"):
        open_source(folder)


def test_index_naming_a_file_outside_the_folder(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    index = json.loads((folder / INDEX_NAME).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../etc/passwd"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=r"points to '../../etc/passwd', outside the model folder"):
        open_source(folder)


def test_index_naming_a_missing_shard(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    shard = sorted(folder.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(SourceNotFoundError, match=rf"{shard.name}: shard named by {INDEX_NAME} is missing"):
        open_source(folder)


def test_index_and_shard_disagree(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["ghost.weight"] = sorted(set(index["weight_map"].values()))[0]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=r"the index maps 'ghost.weight' .* but the file lacks it"):
        open_source(folder)


def test_several_weight_files_without_index(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    (folder / INDEX_NAME).unlink()
    with pytest.raises(CorruptCheckpointError, match=r"4 safetensors files .* but no .*index.json"):
        open_source(folder)


def test_already_quantized_source_is_refused(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSourceError, match="already quantized"):
        open_source(folder)


def test_pipeline_without_transformer(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UnsupportedSourceError, match=r"has no 'transformer' component \(it has vae\)"):
        open_source(tmp_path)


def test_a_file_that_is_not_a_folder(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("hello")
    with pytest.raises(UnsupportedSourceError, match=r"README.md: not a folder; give a diffusers pipeline folder"):
        open_source(path)


def test_subfolder_outside_the_source(qwen_src):
    with pytest.raises(UnsupportedSourceError, match=r"'../..' is not a folder inside"):
        open_source(qwen_src, subfolder="../..")
