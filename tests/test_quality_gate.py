"""The quality gate on the trained lab DiT: it must pass FP8 and fail what is really damaged.

Every variant samples the fixed evaluation set on the CPU (FP8 through Fp8Linear's CPU path, which
quantizes weights and activations as the GPU does) and is scored against the BF16 lab model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from quality_lab import gate, lab  # noqa: E402

SAMPLES, STEPS = 128, 20


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    assert lab.DIT_DIR.is_dir() and lab.CNN_WEIGHTS.is_file(), "the lab fixtures are committed with the tests"
    return gate.run(SAMPLES, STEPS, with_policies=False)


@pytest.mark.parametrize("variant", ["fp32 (noise floor)", "fp8 per-tensor W8A8", "fp8 block 128x128 W8A8"])
def test_good_variants_pass(results, variant):
    assert results[variant]["passes"], gate.table(results)


@pytest.mark.parametrize("variant", ["e5m2 W8A8 (bad control)", "int4 weights (bad control)"])
def test_bad_controls_fail(results, variant):
    assert not results[variant]["passes"], gate.table(results)


def test_the_metrics_order_the_controls(results):
    floor, fp8 = results["fp32 (noise floor)"], results["fp8 per-tensor W8A8"]
    worst_bad = min(results["e5m2 W8A8 (bad control)"]["perceptual"], results["int4 weights (bad control)"]["perceptual"])
    assert floor["perceptual"] < fp8["perceptual"] < worst_bad
    assert floor["psnr"] > fp8["psnr"]


def test_fp8_halves_the_weights(results):
    bf16 = results["bf16 (reference)"]["weight_bytes"]
    assert results["fp8 per-tensor W8A8"]["weight_bytes"] < 0.6 * bf16
