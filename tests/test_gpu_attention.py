"""FP8 attention kernels on a GPU (bench/fp8_attention.py): the Triton kernel and cuDNN's FP8 SDPA
at the real shapes. Skipped without CUDA.

Tolerances, and why:

* Triton kernel against its algorithm emulated in torch (tests/attention_emulation.py, torch's
  E4M3 cast): the same roundings, except that the GPU's exp2 and division are approximate and
  Hopper's FP8 MMAs accumulate with fewer bits than float32, so a probability near an E4M3
  rounding boundary can round the other way: relative L2 below 2e-2 (0.011 measured at the
  real shapes on an H200; the FP8 error itself is ~5e-2 on these inputs), and the kernel's
  error against exact attention within 10% of the emulation's;
* cuDNN (per-tensor scales) against exact attention: at most twice the error of the per-tensor
  emulation plus 5e-2, room for cuDNN's own probability rounding and, on Hopper, its E4M3 output;
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from attention_emulation import emulate_kernel
from test_gpu import pytestmark, rel_l2  # noqa: F401 - the GPU marks

import fp8_attention as A  # bench/, on the path through attention_emulation

needs_fp8_attention = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= A.FP8_MIN_CAPABILITY),
    reason="needs a GPU with FP8 tensor cores (compute capability 8.9+)")
needs_triton = pytest.mark.skipif(not A.HAVE_TRITON, reason="triton not installed")
needs_cudnn = pytest.mark.skipif(importlib.util.find_spec("cudnn") is None,
                                 reason="nvidia-cudnn-frontend not installed")

# (B, L, masked keys at the end, H, D): Qwen-Image 1024x1024 (4096 + 256 tokens), Z-Image
# 1024x1024 with a padded caption, and a small odd one
SHAPES = [(1, 4352, 0, 24, 128), (1, 4224, 24, 30, 128), (2, 333, 50, 4, 64)]


def inputs(b, n, pad, h, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", generator=g).bfloat16() for _ in range(3))
    mask = None
    if pad:
        mask = torch.ones(b, n, dtype=torch.bool, device="cuda")
        mask[:, n - pad:] = False
    return q, k, v, mask


def exact(q, k, v, mask):
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            s = (q[b, :, h].float() @ k[b, :, h].float().T) * q.shape[-1] ** -0.5
            if mask is not None:
                s = s.masked_fill(~mask[b][None, :], float("-inf"))
            out[b, :, h] = torch.softmax(s, -1) @ v[b, :, h].float()
    return out


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@needs_fp8_attention
@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_kernel_against_its_algorithm(shape):
    q, k, v, mask = inputs(*shape)
    reference = exact(q, k, v, mask)
    for block_n, stages in ((64, 3), (128, 2)):  # a config fixed, so the emulation knows the key blocks
        out = A.triton_fp8_attention(q, k, v, mask, q.shape[-1] ** -0.5,
                                     {"BLOCK_M": 128, "BLOCK_N": block_n, "num_warps": 8, "num_stages": stages})
        emulated = emulate_kernel(q, k, v, mask, block_n)
        assert rel_l2(out, emulated) < 2e-2, block_n
        assert abs(rel_l2(out, reference) - rel_l2(emulated, reference)) < 0.1 * rel_l2(emulated, reference)
    # the public call (autotuned config) against the lab's numerics, which it matches statistically
    out = A.fp8_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert rel_l2(out, reference) < 1.1 * rel_l2(A.fp8_attention_reference(q, k, v, mask), reference)


@needs_fp8_attention
@needs_triton
def test_triton_prep_is_bit_exact_against_torch():
    q, k, v, _ = inputs(2, 333, 0, 4, 128)
    qc, kc, vt, amax = A.triton_prepare(q, k, v)
    for t, c, transposed in ((q, qc, False), (k, kc, False), (v, vt, True)):
        x = t.float().transpose(1, 2)  # [B, H, L, D]
        scale = A.fp8_scale(x.abs().amax(dim=(2, 3), keepdim=True))
        codes = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        got = (c.transpose(1, 2) if transposed else c).view(torch.uint8)[:, :333].reshape(2, 4, 333, 128)
        assert torch.equal(got, codes)


@needs_fp8_attention
@needs_cudnn
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_cudnn_backend(shape):
    q, k, v, mask = inputs(*shape)
    out = A.fp8_attention(q, k, v, mask, backend="cudnn")
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    reference = exact(q, k, v, mask)
    emulated = A.fp8_attention_reference(q, k, v, mask, mode="tensor")
    assert rel_l2(out, reference) < 2 * rel_l2(emulated, reference) + 5e-2
    assert torch.equal(A.fp8_attention(q, k, v, mask, backend="cudnn"), out)  # the cached graph, same result


@needs_fp8_attention
@needs_cudnn
def test_cudnn_refuses_masks_that_are_not_a_prefix():
    q, k, v, mask = inputs(1, 256, 10, 2, 128)
    mask[:, 3] = False
    with pytest.raises(A.ConfigError, match="keep a prefix of each item's keys"):
        A.fp8_attention(q, k, v, mask, backend="cudnn")
