"""End to end: convert real (tiny) diffusers checkpoints and check every byte that comes out."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import load_tensors, reference_fp8, same_bits, tree_digest
from safetensors import safe_open

from omni_fp8 import Fp8Config, convert, read_manifest, verify
from omni_fp8.converter.numerics import dequantize_weight
from omni_fp8.converter.source import INDEX_NAME, MANIFEST_NAME


def check_output(src: Path, out: Path, block: tuple[int, int] | None, *, keep_dtype: torch.dtype | None = None) -> dict:
    """Every promise about a converted folder, checked against the source with the safetensors library."""
    source = load_tensors(src)
    output = load_tensors(out)
    manifest = read_manifest(out)
    entries = {e["name"]: e for e in manifest["tensors"]}
    assert set(output) == set(entries)

    # The index maps every tensor to the shard that holds it.
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(output)
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, "pt") as f:
            assert name in f.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in output.values())

    # config.json: the source's, plus vLLM's quantization_config.
    config = json.loads((out / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == json.loads((src / "config.json").read_text())
    assert qc["quant_method"] == "fp8" and qc["is_checkpoint_fp8_serialized"] is True
    assert qc["weight_block_size"] == (list(block) if block else None)
    assert qc == manifest["quantization_config"]

    quantized = 0
    for name, w in source.items():
        entry = entries[name]
        assert entry["source_dtype"] == {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[w.dtype]
        assert entry["shape"] == list(w.shape)
        if entry["scheme"] == "kept":
            assert entry["reason"] in ("not-linear", "unaligned") or entry["reason"].startswith("ignored:")
            expected = w if keep_dtype is None or not w.is_floating_point() else w.to(keep_dtype)
            assert same_bits(output[name], expected), name  # byte-identical
            continue
        quantized += 1
        scale_name = name + ("_scale_inv" if block else "_scale")
        assert entry["scheme"] == ("fp8_block" if block else "fp8_tensor") and entry["scale"] == scale_name
        q_ref, s_ref = reference_fp8(w, block)
        assert same_bits(output[name], q_ref), name
        assert same_bits(output[scale_name], s_ref), name
        assert entries[scale_name]["shard"] == entry["shard"]  # a weight and its scale share a shard
        deq = dequantize_weight(output[name], output[scale_name], block)
        rel = ((deq - w.float()).norm() / w.float().norm()).item()
        assert rel < 0.04, (name, rel)  # E4M3 keeps 3 mantissa bits: ~2.5% on Gaussian weights
    assert quantized == manifest["totals"]["linears_quantized"] > 0

    # Every file is listed with its size and hash; nothing else is in the folder.
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest["files"]) == files
    for rel, rec in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify(out).ok
    return manifest


@pytest.mark.parametrize("block", [None, (32, 32), (128, 128)])
def test_qwen_image_bf16(qwen_src, tmp_path, block):
    before = tree_digest(qwen_src)
    result = convert(qwen_src, tmp_path / "out", config=Fp8Config(weight_block_size=block), progress=False)
    manifest = check_output(qwen_src, tmp_path / "out", block)
    assert tree_digest(qwen_src) == before  # the source is never modified
    assert manifest["options"]["preset"] == "qwen-image"
    assert manifest["source"] == {"type": "local", "path": str(qwen_src.resolve()), "kind": "transformer",
                                  "component": "", "class_name": "QwenImageTransformer2DModel"}
    assert manifest["totals"]["source_bytes"] == sum(
        t.numel() * t.element_size() for t in load_tensors(qwen_src).values())
    assert result.output_bytes < 0.7 * result.source_bytes  # the preset keeps img_mlp and the edges
    assert "Linears in FP8" in result.summary_line()


def test_z_image_fp32_source_keeps_fp32_and_casts_on_request(zimage_src, tmp_path):
    convert(zimage_src, tmp_path / "keep", progress=False)
    manifest = check_output(zimage_src, tmp_path / "keep", None)
    kept = [e for e in manifest["tensors"] if e["scheme"] == "kept"]
    assert {e["dtype"] for e in kept} == {"F32"}

    convert(zimage_src, tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    manifest = check_output(zimage_src, tmp_path / "bf16", None, keep_dtype=torch.bfloat16)
    assert {e["dtype"] for e in manifest["tensors"] if e["scheme"] == "kept"} == {"BF16"}
    assert manifest["options"]["dtype"] == "bfloat16"


def test_fp16_source(tmp_path):
    from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image

    src = save_checkpoint(tiny_qwen_image(seed=5), tmp_path / "fp16", dtype=torch.float16)
    convert(src, tmp_path / "out", config={"preset": "none"}, progress=False)
    check_output(src, tmp_path / "out", None)


def test_pipeline_output_is_a_complete_pipeline(qwen_pipeline, tmp_path):
    before = tree_digest(qwen_pipeline)
    out = tmp_path / "Qwen-Image-fp8"
    convert(qwen_pipeline, out, progress=False)
    assert tree_digest(qwen_pipeline) == before
    manifest = read_manifest(out)
    assert manifest["component"] == "transformer"
    assert (out / "model_index.json").read_bytes() == (qwen_pipeline / "model_index.json").read_bytes()
    others = sorted(p.relative_to(qwen_pipeline).as_posix() for p in qwen_pipeline.rglob("*")
                    if p.is_file() and not p.relative_to(qwen_pipeline).as_posix().startswith("transformer/"))
    assert {"model_index.json", "README.md", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
            "text_encoder/config.json", "vae/config.json"} <= set(others)
    assert sorted(manifest["carried_over"]) == others
    for rel in others:
        assert (out / rel).read_bytes() == (qwen_pipeline / rel).read_bytes()
        assert manifest["carried_over"][rel] in ("link", "copy")
        if manifest["carried_over"][rel] == "link":
            assert (out / rel).stat().st_ino == (qwen_pipeline / rel).stat().st_ino
    assert all(e["shard"].startswith("transformer/") for e in manifest["tensors"])
    assert verify(out).ok
    # The converted transformer inside is exactly what converting the folder alone gives.
    convert(qwen_pipeline / "transformer", tmp_path / "alone", progress=False)
    check_output(qwen_pipeline / "transformer", tmp_path / "alone", None)
    assert load_tensors(out / "transformer").keys() == load_tensors(tmp_path / "alone").keys()
    for name, t in load_tensors(tmp_path / "alone").items():
        assert same_bits(load_tensors(out / "transformer")[name], t)


def test_small_shards_never_split_a_weight_from_its_scale(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "out", max_shard_size="40KB", progress=False)
    manifest = check_output(qwen_src, tmp_path / "out", None)
    shards = {e["shard"] for e in manifest["tensors"]}
    assert len(shards) > 5
    assert all(Path(s).name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)


def test_verify_reports_changed_missing_and_extra_files(qwen_src, tmp_path):
    out = tmp_path / "out"
    convert(qwen_src, out, progress=False)
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "config.json").unlink()
    (out / "stray.txt").write_text("x")
    report = verify(out)
    assert not report.ok
    assert report.problems == [
        "config.json: missing",
        f"{shard.name}: SHA-256 differs from the manifest (the file was changed)",
        "stray.txt: not in the manifest",
    ]


@pytest.mark.parametrize("edit,why", [
    (lambda m: m.update(format="something-else"), "not an omni-fp8 manifest"),
    (lambda m: m.update(format_version=99), "manifest format_version 99 is not 1; upgrade omni-fp8"),
])
def test_foreign_or_future_manifests_are_refused(qwen_src, tmp_path, edit, why):
    from omni_fp8.converter.errors import CorruptCheckpointError

    convert(qwen_src, tmp_path / "out", progress=False)
    path = tmp_path / "out" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=why):
        read_manifest(tmp_path / "out")
