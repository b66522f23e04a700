"""``fuse_attention_`` on a GPU: fused against unfused, eager, CUDA graphs and compiled. Skipped without CUDA.

Tolerances, and why: the fused projections are one GEMM of three times the width, which
cuBLASLt may run with another kernel (another summation order over K, or split-K) than the
three narrow ones, so outputs can differ by a BF16 rounding of some elements (rel. L2 ~1e-3);
over two blocks of a random-weight model that stays below 1e-2. FP8 amplifies a flip of an
activation's rounding, so compiled FP8 gets the FP8 bound used elsewhere in the tests (2e-2 on
outputs whose FP8-vs-BF16 error is ~5e-2). CUDA graphs replay the fused eager block exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omni_fp8 import Fp8Config, Fp8Linear, enable_cuda_graphs, fuse_attention_, quantize_, unfuse_attention_
from omni_fp8.converter.demo import tiny_qwen_image, tiny_z_image
from omni_fp8.runtime import kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_fp8 = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.device_has_fp8("cuda")), reason="needs a GPU with FP8 GEMMs"
)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def build(name: str, fp8: bool) -> nn.Module:
    model = (tiny_qwen_image if name == "qwen-image" else tiny_z_image)(seed=5).to("cuda", torch.bfloat16)
    if fp8:
        quantize_(model, Fp8Config(preset="none"))
    return model


def inputs(name: str, model: nn.Module, seed: int = 0) -> tuple[tuple, dict]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    cfg = model.config
    if name == "qwen-image":
        return (), {
            "hidden_states": torch.randn(1, 64, cfg.in_channels, device="cuda", generator=g).bfloat16(),
            "encoder_hidden_states": torch.randn(1, 16, cfg.joint_attention_dim, device="cuda", generator=g).bfloat16(),
            "encoder_hidden_states_mask": torch.ones(1, 16, dtype=torch.bool, device="cuda"),
            "timestep": torch.full((1,), 0.5, device="cuda").bfloat16(),
            "img_shapes": [[(1, 8, 8)]],
            "return_dict": False,
        }
    latents = [torch.randn(cfg.in_channels, 1, 16, 16, device="cuda", generator=g).bfloat16()]
    caps = [torch.randn(12, cfg.cap_feat_dim, device="cuda", generator=g).bfloat16()]
    return (latents, torch.full((1,), 0.5, device="cuda").bfloat16(), caps), {"return_dict": False}


def run(model, args_, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args_, **kwargs)[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out


@needs_fp8
@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
@pytest.mark.parametrize("m", [8, 300])
def test_fused_qkv_gemm_matches_three(scheme, m):
    from omni_fp8.runtime.fused_attention import _fuse_linears

    torch.manual_seed(0)
    block = (128, 128) if scheme == "block" else None
    layers = [Fp8Linear.from_linear(nn.Linear(1024, 1024).to(torch.bfloat16), block, per_channel=scheme == "channel").cuda()
              for _ in range(3)]
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    fused = _fuse_linears(layers, ("to_q", "to_k", "to_v"))
    assert isinstance(fused, Fp8Linear) and fused._gemm_fn is not None
    with torch.no_grad():
        kernels.forget_shared_activation()
        three = torch.cat([layer(x) for layer in layers], dim=-1)
        assert rel_l2(fused(x), three) < 5e-3


@pytest.mark.parametrize("name", ["qwen-image", "z-image"])
@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=needs_fp8)])
def test_fused_eager_and_cuda_graphs(name, fp8):
    model = build(name, fp8)
    args_, kwargs = inputs(name, model)
    unfused = run(model, args_, kwargs)
    fuse_attention_(model)
    fused = run(model, args_, kwargs)
    assert rel_l2(fused, unfused) < 1e-2
    enable_cuda_graphs(model)
    for _ in range(3):  # warm-up, capture, replay
        assert torch.equal(run(model, args_, kwargs), fused)
    from omni_fp8 import disable_cuda_graphs

    disable_cuda_graphs(model)
    unfuse_attention_(model)
    assert torch.equal(run(model, args_, kwargs), unfused)


@pytest.mark.parametrize("name", ["qwen-image", "z-image"])
@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=needs_fp8)])
def test_fused_compiled_matches_unfused_compiled(name, fp8):
    outs = []
    for fuse in (False, True):
        torch._dynamo.reset()
        model = build(name, fp8)
        args_, kwargs = inputs(name, model)
        if fuse:
            fuse_attention_(model)
        model.compile_repeated_blocks(fullgraph=True)
        outs.append(run(model, args_, kwargs))
    torch._dynamo.reset()
    assert rel_l2(outs[1], outs[0]) < (2e-2 if fp8 else 1e-2)
