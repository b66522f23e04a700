"""The FP8-attention emulation of the quality lab (bench/quality_lab/attention.py): its numerics
and that the lab DiT samples through it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from quality_lab import attention  # noqa: E402


def qkv(seed: int = 0, b: int = 2, h: int = 3, n: int = 100, d: int = 32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) * s for s in (1.0, 2.0, 0.5))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", attention.MODES)
def test_emulated_fp8_attention_is_close_to_sdpa_with_and_without_masks(mode):
    q, k, v = qkv()
    mask = torch.ones(2, 1, 1, 100, dtype=torch.bool)
    mask[1, ..., 80:] = False  # the second sample's last tokens are padding
    additive = torch.zeros(2, 1, 1, 100).masked_fill(~mask, float("-inf"))
    fp8 = attention.fp8_sdpa(mode)
    for m in (None, mask, additive):
        exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert 0 < rel(fp8(q, k, v, attn_mask=m), exact) < 0.08  # E4M3: 3 mantissa bits in Q, K, V and P


def test_sage_mode_ignores_a_shift_of_the_keys():
    """Softmax rows do not change when every key moves by the same vector: Sage subtracts the mean,
    so a large shared offset (which would flatten a per-tensor scale) costs nothing."""
    q, k, v = qkv(1)
    fp8 = attention.fp8_sdpa("sage")
    shifted = k + 40 * torch.randn(1, 3, 1, 32)
    assert rel(fp8(q, shifted, v), fp8(q, k, v)) < 1e-3  # float32 rounding of the offset flips a few codes
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel(attention.fp8_sdpa("tensor")(q, shifted, v), exact) > 3 * rel(fp8(q, shifted, v), exact)


def test_the_context_patches_sdpa_and_restores_it():
    original = torch.nn.functional.scaled_dot_product_attention
    with attention.fp8_attention("head"):
        assert torch.nn.functional.scaled_dot_product_attention is not original
    assert torch.nn.functional.scaled_dot_product_attention is original
    with pytest.raises(ValueError, match="unknown FP8 attention mode"):
        attention.fp8_sdpa("row")(*qkv())


def test_the_lab_samples_through_it(capsys):
    results = attention.run(samples=4, steps=2, modes=("tensor",))
    assert set(results) == {"W8A8 Linears, BF16 attention", "FP8 attention (tensor), BF16 Linears",
                            "FP8 attention (tensor) + W8A8 Linears"}
    assert all(m["psnr"] > 20 for m in results.values())
