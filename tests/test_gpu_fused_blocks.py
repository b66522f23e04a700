"""``fuse_blocks_`` on a GPU: fused against unfused, eager, CUDA graphs and compiled. Skipped without CUDA.

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
from conftest import count_calls
from test_fused_blocks import diffusers_qk
from test_gpu import needs_fp8, pytestmark, qwen_cuda_inputs, rel_l2  # noqa: F401 - the GPU marks, helpers
from torch import nn

from omni_fp8 import Fp8Config, Fp8Linear, enable_cuda_graphs, fuse_blocks_, quantize_, unfuse_blocks_
from omni_fp8.converter.demo import tiny_qwen_image, tiny_z_image
from omni_fp8.runtime import kernels


def build(name: str, fp8: bool) -> nn.Module:
    model = (tiny_qwen_image if name == "qwen-image" else tiny_z_image)(seed=5).to("cuda", torch.bfloat16)
    if fp8:
        quantize_(model, Fp8Config(preset="none"))
    return model


def inputs(name: str, model: nn.Module, seed: int = 0) -> tuple[tuple, dict]:
    cfg = model.config
    if name == "qwen-image":
        # 32 text tokens: more than the 16 rows that take the FP8-weight GEMV instead of quantize + GEMM
        return (), qwen_cuda_inputs(cfg, text_tokens=32, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    latents = [torch.randn(cfg.in_channels, 1, 16, 16, device="cuda", generator=g).bfloat16()]
    caps = [torch.randn(12, cfg.cap_feat_dim, device="cuda", generator=g).bfloat16()]
    return (latents, torch.full((1,), 0.5, device="cuda").bfloat16(), caps), {"return_dict": False}


def no_worse_than_unfused(name: str, fused: torch.Tensor, unfused: torch.Tensor) -> None:
    """FP8 outputs: the fused GEMMs round their sums in another order and a per-token FP8 code
    flips where an activation moved by one BF16 step, which a random tiny model amplifies; what
    must hold is that fusing costs nothing against BF16, the numbers FP8 is judged by."""
    model = build(name, False)
    reference = run(model, *inputs(name, model))
    assert rel_l2(fused, reference) <= 1.1 * rel_l2(unfused, reference) + 1e-3
    assert rel_l2(fused, unfused) < 5e-2


def run(model, args_, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args_, **kwargs)[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out


@needs_fp8
@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
@pytest.mark.parametrize("m", [8, 300])
def test_fused_qkv_gemm_matches_three(scheme, m):
    from omni_fp8.runtime.fused_blocks import _fuse_linears

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
    """Fused against unfused eager (tolerance: the module docstring), then replayed as CUDA graphs."""
    model = build(name, fp8)
    args_, kwargs = inputs(name, model)
    unfused = run(model, args_, kwargs)
    fuse_blocks_(model)
    fused = run(model, args_, kwargs)
    if fp8:
        no_worse_than_unfused(name, fused, unfused)
    else:
        assert rel_l2(fused, unfused) < 1e-2
    enable_cuda_graphs(model)
    for _ in range(3):  # warm-up, capture, replay
        assert torch.equal(run(model, args_, kwargs), fused)
    from omni_fp8 import disable_cuda_graphs

    disable_cuda_graphs(model)
    unfuse_blocks_(model)
    assert torch.equal(run(model, args_, kwargs), unfused)


@pytest.mark.parametrize("name", ["qwen-image", "z-image"])
@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=needs_fp8)])
def test_fused_compiled_matches_unfused_compiled(name, fp8):
    """Compiled, the fused blocks' QK-norm and RoPE are the Triton kernel (torch's eager roundings)
    where the unfused ones are Inductor's (its own): BF16 within 1e-2; FP8 judged as in eager mode
    (``no_worse_than_unfused``: 0.030 between the two on one of these tiny random models, which
    FP8 amplifies, while both are as close to BF16)."""
    outs = []
    for fuse in (False, True):
        torch._dynamo.reset()
        model = build(name, fp8)
        args_, kwargs = inputs(name, model)
        if fuse:
            fuse_blocks_(model)
        model.compile_repeated_blocks(fullgraph=True)
        outs.append(run(model, args_, kwargs))
    torch._dynamo.reset()
    if fp8:
        no_worse_than_unfused(name, outs[1], outs[0])
    else:
        assert rel_l2(outs[1], outs[0]) < 1e-2


@pytest.mark.parametrize("b,rows,k", [(1, 4096, 3072), (1, 256, 3072), (2, 77, 3072), (1, 7, 64)])
@pytest.mark.parametrize("quantize", [False, pytest.param(True, marks=needs_fp8)])
def test_modulate_kernel_is_bit_exact(b, rows, k, quantize):
    """One launch against eager torch's three (``_modulate``) and the quantization kernel: every bit."""
    from omni_fp8.runtime.triton_kernels import HAVE_TRITON, modulate_cuda, quantize_activation_cuda

    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    torch.manual_seed(b * rows + k)
    x = torch.nn.functional.layer_norm(torch.randn(b, rows, k, device="cuda") * 3, (k,)).bfloat16()
    mod = (torch.randn(b, 6 * k, device="cuda") * 0.5).bfloat16()[:, : 3 * k]  # as chunk leaves it
    shift, scale, _ = mod.chunk(3, dim=-1)
    y, q, s = modulate_cuda(x, shift, scale, quantize)
    expected = x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    assert torch.equal(y, expected)
    if quantize:
        ref_q, ref_s = quantize_activation_cuda(expected.reshape(-1, k), 0)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)


@needs_fp8
def test_fused_modulation_hands_its_quantization_to_the_projections(monkeypatch):
    """Per Qwen-Image block, the four Linears reading modulated activations (image and text QKV,
    both MLP inputs) find them quantized: four quantization launches fewer per block."""
    model = build("qwen-image", True)
    args_, kwargs = inputs("qwen-image", model)
    calls = count_calls(monkeypatch, kernels, "_quantize_for_gemm")
    unfused = run(model, args_, kwargs)
    before = calls["n"]
    fuse_blocks_(model)
    calls["n"] = 0
    fused = run(model, args_, kwargs)
    assert calls["n"] == before - 4 * len(model.transformer_blocks)
    no_worse_than_unfused("qwen-image", fused, unfused)


def _qk_case(layout: str):
    """Real widths: Qwen-Image (24 heads of 128, a 256-token text stream and a 1024-token image
    stream, views of fused QKV outputs, eps 1e-6) or Z-Image (30 heads, one stream of 1280 tokens in
    a batch of 2, per-item frequencies, eps 1e-5)."""
    from diffusers.models.normalization import RMSNorm

    torch.manual_seed(0)
    heads, d, eps, seqs, batch = (24, 128, 1e-6, (256, 1024), 1) if layout == "qwen-image" else (30, 128, 1e-5, (1280,), 2)
    streams = []
    for s in seqs:
        q, k, v = (t.unflatten(-1, (heads, d)) for t in (torch.randn(batch, s, 3 * heads * d, device="cuda") * 4)
                   .bfloat16().split(heads * d, dim=-1))
        norms = [RMSNorm(d, eps=eps).to("cuda", torch.bfloat16) for _ in range(2)]
        for n in norms:
            n.weight.data = (1 + 0.5 * torch.randn(d, device="cuda")).bfloat16()
        shape = (s, d // 2) if layout == "qwen-image" else (batch, s, d // 2)
        freqs = torch.polar(torch.ones(shape, device="cuda"), torch.rand(shape, device="cuda") * 100)
        streams.append((q, k, v, *norms, freqs))
    return streams, eps


@pytest.mark.parametrize("layout", ["qwen-image", "z-image"])
def test_qk_norm_rope_kernel_against_diffusers(layout, monkeypatch):
    """The one-launch QK-norm/RoPE against diffusers' eager modules on this GPU, for each way of
    fusing RoPE's products (``_ROPE_FMA``): the shipped one must be the closest to torch, and it
    may differ from torch only where the variance's float32 sum, ordered differently, moved a
    value by one BF16 step. The counts are in the assertion message."""
    from omni_fp8.runtime import triton_kernels as tk

    if not tk.HAVE_TRITON:
        pytest.skip("triton not installed")
    streams, eps = _qk_case(layout)
    with torch.no_grad():
        freqs_axis = 1 if layout == "qwen-image" else 2
        expected = [torch.cat([diffusers_qk(s[i], s[3 + i], s[5].unsqueeze(freqs_axis)).bfloat16()
                               for s in streams], 1) for i in (0, 1)]
        counts = {}
        shipped = tk._ROPE_FMA
        for mode in (0, 1, 2):
            monkeypatch.setattr(tk, "_ROPE_FMA", mode)
            out = tk.qk_norm_rope_cuda([s[0] for s in streams], [s[1] for s in streams],
                                       [s[2] for s in streams] if layout == "qwen-image" else [],
                                       [s[3].weight for s in streams], [s[4].weight for s in streams],
                                       [torch.view_as_real(s[5]) for s in streams], eps)
            counts[mode] = sum(int((o != e).sum()) for o, e in zip(out, expected))
            if mode == shipped:
                chosen = out
    total = sum(e.numel() for e in expected)
    worst = max(((o.float() - e.float()).abs() / e.float().abs().clamp(min=1.0)).max().item()
                for o, e in zip(chosen, expected))
    print(f"qk_norm_rope {layout}: values unlike torch's per _ROPE_FMA mode {counts} of {total}; "
          f"largest difference {worst:.2e} (relative, absolute below 1)")
    assert counts[shipped] == min(counts.values()), (counts, total)
    assert counts[shipped] <= 1e-3 * total, (counts, total)
    # Where they differ, by one BF16 step (2^-8 relative) at most; absolute below 1, where RoPE's
    # difference of two products cancels (the normed values are of order 1).
    assert worst <= 2.0 ** -7, (counts, total, worst)
    if layout == "qwen-image":
        assert torch.equal(chosen[2], torch.cat([s[2] for s in streams], 1))


@pytest.mark.parametrize("name", ["qwen-image", "z-image"])
def test_fused_processors_use_the_qk_kernel_eager_and_compiled(name, monkeypatch):
    """Each fused attention runs QK-norm and RoPE as the one kernel, in eager mode and inside a
    fullgraph-compiled block (as the custom op), and the outputs stay those of the unfused model."""
    from omni_fp8.runtime import fused_blocks
    from omni_fp8.runtime import triton_kernels as tk

    if not tk.HAVE_TRITON:
        pytest.skip("triton not installed")
    model = build(name, False)
    args_, kwargs = inputs(name, model)
    unfused = run(model, args_, kwargs)
    fuse_blocks_(model)
    attentions = sum(1 for m in model.modules() if hasattr(m, "to_qkv"))
    eager_calls = count_calls(monkeypatch, fused_blocks, "qk_norm_rope_cuda")
    eager = run(model, args_, kwargs)
    assert eager_calls["n"] == attentions
    assert rel_l2(eager, unfused) < 1e-2
    op_calls = count_calls(monkeypatch, tk, "qk_norm_rope_cuda")  # what the custom op runs
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True)
    compiled = run(model, args_, kwargs)
    torch._dynamo.reset()
    assert op_calls["n"] >= attentions and eager_calls["n"] == attentions  # the op, not the eager branch
    assert rel_l2(compiled, eager) < 1e-2
