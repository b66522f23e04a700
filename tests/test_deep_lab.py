"""The deep lab DiT's script (bench/quality_lab/deep.py) end to end on a tiny model, on the CPU.

A 2-block, width-32 model trains 3 steps on random images, is saved, and every policy and
control is sampled, scored and traced block by block; the real-size FLOP and byte accounting is
checked against Qwen-Image's shapes. The figures of the GPU run are in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from quality_lab import deep, lab  # noqa: E402

BLOCKS = 2
TINY = ["--blocks", str(BLOCKS), "--heads", "1", "--samples", "8", "--sample-steps", "2", "--record-samples", "4",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("deeplab")
    images = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.MonkeyPatch.context() as mp:  # no Fashion-MNIST needed: random images train as well
        mp.setattr(lab, "fashion_mnist", lambda split="train": (images, torch.arange(64) % 10))
        assert deep.main(["all", "--out", str(out), "--steps", "3", "--batch", "4", *TINY]) == 0
    return out, json.loads((out / "deep.json").read_text())


def test_every_part_ran(run):
    out, data = run
    assert data["complete"] and data["errors"] == {}, data["errors"]
    assert data["train"]["steps"] == 3 and len(data["train"]["loss_curve"]) == 1
    names = {name.split(":")[0] for name in data["policies"]}
    assert names == {p.key for p in deep.POLICIES} | {"g"} | set(deep.CONTROLS)
    for name, m in data["policies"].items():
        assert math.isfinite(m["psnr"]) and isinstance(m["passes"], bool), name
    assert (out / "deep.txt").read_text().count("\n| ") > len(names)
    assert {"config.json", "class_tokens.safetensors"} <= {f.name for f in (out / "model").iterdir()}


def test_per_block_errors(run):
    _, data = run
    for name, m in data["policies"].items():
        if name in deep.CONTROLS or m.get("attention"):  # FP8 attention patches the reference's too
            assert "depth" not in m
            continue
        depth = m["depth"]
        assert len(depth["compound"]) == len(depth["local"]) == BLOCKS, name
        assert all(v >= 0 and math.isfinite(v) for v in depth["compound"] + depth["local"]), name


def test_fp8_attention_policies_sample_through_the_emulation(run):
    _, data = run
    scored = {name.split(":")[0]: m for name, m in data["policies"].items() if m.get("attention")}
    assert set(scored) == {"f+attn-tensor", "f+attn-head", "f+attn-sage"}
    assert all(m["psnr"] > 20 and m["output_error"] > 0 for m in scored.values())


def test_real_size_accounting(run):
    """At Qwen-Image's shapes: every Linear in FP8 is all the FLOPs; keeping img_mlp everywhere (the
    preset) leaves about a third in FP8; fewer kept img_mlp blocks, more FP8."""
    _, data = run
    real = {name.split(":")[0]: m["real"] for name, m in data["policies"].items() if "real" in m}
    flops = {k: v["fp8_flops_fraction"] for k, v in real.items()}
    assert flops["a"] == flops["b"] == flops["c"] == 1.0
    assert 0.3 < flops["d"] < 0.45
    assert flops["a"] > flops["f"] > flops["e2"] > flops["e4"] > flops["d"]
    assert real["a"]["weight_gb"] < real["f"]["weight_gb"] < real["d"]["weight_gb"] < 2 * real["a"]["weight_gb"]
    assert real["d"]["kept_linears"] == 60 * 2 + 6  # fc1 and fc2 of every block, and the six embedder/output Linears


def test_evaluate_reloads_and_keeps_to_the_deadline(run):
    out, _ = run
    assert deep.main(["evaluate", "--out", str(out), "--deadline", "0", "--no-suggest", *TINY]) == 0
    data = json.loads((out / "deep.json").read_text())
    assert data["complete"] and "train" in data  # the training record survives a re-evaluation
    assert all(m == {"skipped": "past --deadline"} for m in data["policies"].values())


def test_refuses_to_overwrite_a_model(run, capsys):
    out, _ = run
    assert deep.main(["train", "--out", str(out), *TINY]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_scaled_groups_map_lab_blocks_to_real_depth():
    kept = deep.scaled_groups(["img_in", "transformer_blocks.23.img_mlp"], from_blocks=24)
    assert kept(24) == ["img_in", "transformer_blocks.23.img_mlp"]
    assert kept(60) == ["img_in", "transformer_blocks.57.img_mlp", "transformer_blocks.58.img_mlp",
                        "transformer_blocks.59.img_mlp"]
    assert deep.edge_blocks(24, 2) == [0, 1, 22, 23] and deep.edge_blocks(2, 4) == [0, 1]


def test_static_policies_add_rows_to_an_earlier_evaluation(run, tmp_path):
    """``evaluate --policies`` with static keys: calibrated on the calibration set, merged into deep.json."""
    import shutil

    out, before = run
    copy = tmp_path / "deeplab"
    shutil.copytree(out, copy)
    assert deep.main(["evaluate", "--out", str(copy), "--policies", "a-s,b-s,f-s", *TINY]) == 0
    data = json.loads((copy / "deep.json").read_text())
    assert data["errors"] == {}, data["errors"]
    keys = {name.split(":")[0] for name in data["policies"]}
    assert {"a-s", "b-s", "f-s"} <= keys and {p.key for p in deep.POLICIES} <= keys  # the earlier rows stay
    for key in ("a-s", "b-s", "f-s"):
        m = next(v for k, v in data["policies"].items() if k.startswith(key + ":"))
        assert math.isfinite(m["psnr"]) and m["config"]["activation_scheme"] == "static", key
    assert data["calibration"]["classes"] == [0, 2, 4, 6, 8]
