"""GPU kernels against the reference numerics. Skipped without a CUDA GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omni_fp8 import Fp8Linear, load_transformer
from omni_fp8.converter.numerics import quantize_activation
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


def qwen_cuda_inputs(cfg, text_tokens: int = 16, seed: int = 0) -> dict:
    """One seeded Qwen-Image call on the GPU: 64 image tokens, ``text_tokens`` text tokens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 64, cfg.in_channels, device="cuda", generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, text_tokens, cfg.joint_attention_dim, device="cuda",
                                             generator=g).bfloat16(),
        "encoder_hidden_states_mask": torch.ones(1, text_tokens, dtype=torch.bool, device="cuda"),
        "timestep": torch.full((1,), 0.5, device="cuda").bfloat16(),
        "img_shapes": [[(1, 8, 8)]],
        "return_dict": False,
    }


@pytest.mark.parametrize("m,k", [(1, 3072), (7, 64), (4096, 3072), (333, 12288), (3, 5)])
@pytest.mark.parametrize("amax", [1.0, 0.01, 1e-30])
def test_triton_static_quantization_is_bit_exact(m, k, amax):
    """One launch against the numerics module's four ops, values beyond the calibrated range included
    (they saturate), for BF16 and float32 activations."""
    from omni_fp8.converter.numerics import activation_scale, quantize_activation_static
    from omni_fp8.runtime.triton_kernels import HAVE_TRITON, quantize_activation_static_cuda

    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    torch.manual_seed(m * k)
    scale = activation_scale(torch.tensor(amax), name="x").cuda()
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(m, k, device="cuda") * amax * 0.6).to(dtype)
        ours = quantize_activation_static_cuda(x, scale)
        assert torch.equal(ours.view(torch.uint8), quantize_activation_static(x, scale).view(torch.uint8))


@pytest.mark.parametrize("m,k", [(1, 3072), (7, 64), (4096, 3072), (333, 12288), (256, 3584)])
@pytest.mark.parametrize("group", [None, 128])
def test_triton_activation_quantization_is_bit_exact(m, k, group):
    from omni_fp8.runtime.triton_kernels import HAVE_TRITON, quantize_activation_cuda

    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    torch.manual_seed(m + k)
    x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).to(torch.bfloat16)
    x[0, :] = 0  # an all-zero token gets scale 1
    if m > 2:  # a token of BF16 subnormals: the scale's floor (2**-126), as the reference has it
        x[1, :] = torch.tensor(1e-40, dtype=torch.bfloat16)
        x[2, : k // 2] = torch.tensor(3e-36, dtype=torch.bfloat16)
    q, s = quantize_activation_cuda(x, group or 0)
    ref_q, ref_s = quantize_activation(x.cpu(), group)
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(s.cpu(), ref_s)
    if group:
        assert s.stride() == (1, m)  # column-major, as the block-scaled GEMM takes it
        qp, sp = quantize_activation_cuda(x, group, pad_rows_to=16)  # rows padded in the same launch
        rows = -(-m // 16) * 16
        assert qp.shape == (rows, k) and sp.shape == (rows, s.shape[1]) and sp.stride() == (1, rows)
        assert torch.equal(qp[:m].view(torch.uint8), q.view(torch.uint8)) and torch.equal(sp[:m], s)
        assert not qp[m:].view(torch.uint8).any() and (sp[m:] == 1).all()


@needs_fp8
@pytest.mark.parametrize("block", [None, (128, 128), "channel"])
@pytest.mark.parametrize("m", [1, 16, 1000])
def test_fp8_gemm_matches_the_emulation(block, m):
    torch.manual_seed(0)
    linear = nn.Linear(1024, 768).to(torch.bfloat16)
    if block == "channel":
        layer = Fp8Linear.from_linear(linear, per_channel=True).cuda()
        block = None
    else:
        layer = Fp8Linear.from_linear(linear, block_size=block).cuda()
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    if block is not None and layer._gemm_fn is None:
        pytest.skip("no block-scaled FP8 GEMM on this GPU")
    assert layer._gemm_fn is not None
    fast = layer(x)
    if m <= 16:  # the FP8-weight GEMV: BF16 activations, so the reference is weight-only
        reference = x.float() @ layer.dequantized_weight().t() + layer.bias.float()
    else:
        reference = kernels._emulated(x, layer.weight, layer.scale, layer.bias, layer.block_size)
    assert fast.dtype == torch.bfloat16
    # Measured 0.0041 on an H200: the BF16 output rounding and Hopper's FP8 tensor cores, which
    # accumulate with fewer bits than float32 between cuBLAS's promotions.
    assert rel_l2(fast, reference) < 1e-2


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("block", [None, (128, 128), "channel"])
@pytest.mark.parametrize("n,k", [(18432, 3072), (256, 1000), (320, 384)])
def test_fp8_weight_gemv_matches_the_weight_only_reference(m, block, n, k):
    from omni_fp8.converter.numerics import dequantize_weight, quantize_weight
    from omni_fp8.runtime.triton_kernels import HAVE_TRITON, fp8_weight_gemv

    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    torch.manual_seed(m + n)
    per_row = block == "channel"
    block = None if per_row else block
    q, s = quantize_weight(torch.randn(n, k, device="cuda") * 0.02, block, per_channel=per_row)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = fp8_weight_gemv(x, q, s, bias, block)
    reference = x.float() @ dequantize_weight(q, s, block).t() + bias.float()
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert rel_l2(y, reference) < 1e-2  # BF16 rounding of the output only


@needs_fp8
def test_shared_quantization_sees_in_place_changes():
    torch.manual_seed(1)
    a = Fp8Linear.from_linear(nn.Linear(256, 256).to(torch.bfloat16)).cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)  # > 16 rows: the quantizing GEMM path
    first = a(x)
    x.mul_(2)  # bumps the version: the cached quantization must not be reused
    assert not torch.equal(a(x), first)
    assert torch.equal(a(x.clone()), a(x))


@needs_fp8
@pytest.mark.parametrize("block", [None, (128, 128)])
def test_compiled_model_has_no_graph_breaks(qwen_src, block):
    model = load_transformer(qwen_src, quantization="fp8", quantization_config={"preset": "none", "weight_block_size": block},
                             device="cuda", progress=False)
    cfg = model.config
    inputs = qwen_cuda_inputs(cfg)
    with torch.no_grad():
        eager = model(**inputs)[0]
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=True)  # diffusers' regional compile; a graph break raises
        compiled = model(**inputs)[0]
    # Measured 0.019 / 0.015 on an H200 (this tiny random model): Inductor keeps the BF16 model's
    # elementwise chains in float32 where eager rounds to BF16 after each op. The quantization
    # itself gives the same bits either way (test above).
    assert rel_l2(compiled, eager) < 5e-2


@pytest.mark.parametrize("block", [None, (128, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_quantization_on_the_gpu_gives_the_cpu_bits(block, dtype):
    """quantize_ on a GPU model must equal converting on a CPU."""
    from omni_fp8.converter.numerics import quantize_weight

    torch.manual_seed(5)
    w = (torch.randn(768, 1000) * 0.02).to(dtype)  # K=1000: a partial edge block
    q, s = quantize_weight(w, block)
    q_gpu, s_gpu = quantize_weight(w.cuda(), block)
    assert torch.equal(q_gpu.cpu().view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(s_gpu.cpu(), s)


# --- Offloading: every mode must run the FP8 kernels after moving the weights to the GPU ------

def _qwen_gpu_inputs(model, device="cuda"):
    """64 image + 16 text tokens: more than 16 rows, so the FP8 GEMM (not only the GEMV) runs."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 64, cfg.in_channels, generator=g).bfloat16().to(device),
        "encoder_hidden_states": torch.randn(1, 16, cfg.joint_attention_dim, generator=g).bfloat16().to(device),
        "encoder_hidden_states_mask": torch.ones(1, 16, dtype=torch.bool, device=device),
        "timestep": torch.full((1,), 0.5).bfloat16().to(device),
        "img_shapes": [[(1, 8, 8)]],
        "return_dict": False,
    }


def _run_gpu(family, model):
    with torch.no_grad():
        if family == "qwen":
            return model(**_qwen_gpu_inputs(model))[0].float().cpu()
        g = torch.Generator().manual_seed(0)
        cfg = model.config
        x = [torch.randn(cfg.in_channels, 1, 16, 16, generator=g).bfloat16().cuda()]
        cap = [torch.randn(24, cfg.cap_feat_dim, generator=g).bfloat16().cuda()]
        return torch.stack(model(x, torch.full((1,), 0.4).bfloat16().cuda(), cap, return_dict=False)[0]).float().cpu()


def _apply_offload(model, mode):
    from accelerate import cpu_offload, cpu_offload_with_hook

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    if mode == "model":  # what enable_model_cpu_offload puts on each component
        cpu_offload_with_hook(model, execution_device=cuda)
    elif mode == "sequential":  # what enable_sequential_cpu_offload does
        cpu_offload(model, execution_device=cuda, offload_buffers=len(model._parameters) > 0)
    else:
        level, stream = mode.split("-")[1], mode.endswith("stream")
        model.enable_group_offload(onload_device=cuda, offload_device=cpu, offload_type=f"{level}_level",
                                   num_blocks_per_group=1 if level == "block" else None, use_stream=stream)


@needs_fp8
@pytest.mark.parametrize("family", ["qwen", "zimage"])
@pytest.mark.parametrize("mode", ["model", "sequential", "group-block", "group-leaf", "group-block-stream",
                                  "group-leaf-stream"])
def test_every_offload_mode_runs_the_fp8_kernels(family, mode, request, monkeypatch):
    pytest.importorskip("accelerate")
    src = request.getfixturevalue({"qwen": "qwen_src", "zimage": "zimage_src"}[family])
    kwargs = {"quantization": "fp8", "quantization_config": {"preset": "none"}, "dtype": torch.bfloat16,
              "progress": False}
    expected = _run_gpu(family, load_transformer(src, device="cuda", **kwargs))
    model = load_transformer(src, **kwargs)  # on the CPU, as offloading starts
    calls = {"fp8_gemm": 0, "emulated": 0}
    real_emulated = kernels._emulated

    def counting_emulated(*args, **kw):
        calls["emulated"] += 1
        return real_emulated(*args, **kw)

    def on_call(layer, inputs, output):  # after the forward: the plan it ran with
        calls["fp8_gemm"] += inputs[0].is_cuda and layer._gemm_fn is not None

    monkeypatch.setattr(kernels, "_emulated", counting_emulated)
    for layer in model.modules():
        if isinstance(layer, Fp8Linear):
            layer.register_forward_hook(on_call)
    _apply_offload(model, mode)
    for _ in range(2):
        out = _run_gpu(family, model)
        assert rel_l2(out, expected) < 1e-3
    assert calls["fp8_gemm"] > 0 and calls["emulated"] == 0, calls


@needs_fp8
@pytest.mark.parametrize("block", [None, (128, 128), "channel"])
@pytest.mark.parametrize("m", [1, 17, 1000])
def test_static_fp8_gemm_matches_the_emulation(block, m):
    """A calibrated input_scale: the per-tensor GEMM (scalar scales both sides), or the row-wise /
    1x128 GEMM with the one scale repeated, against the float32 emulation of the same numerics."""
    from omni_fp8.converter.numerics import activation_scale

    torch.manual_seed(0)
    linear = nn.Linear(1024, 768).to(torch.bfloat16)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    scale = activation_scale(x.abs().amax().float().cpu() * 0.8)  # some values saturate
    per_channel = block == "channel"
    block = None if per_channel else block
    layer = Fp8Linear.from_linear(linear, block_size=block, per_channel=per_channel, input_scale=scale).cuda()
    if block is not None and layer._gemm_fn is None:
        pytest.skip("no block-scaled FP8 GEMM on this GPU")
    assert layer._gemm_fn is not None and layer.input_scale.is_cuda
    fast = layer(x)
    through_dispatch = kernels.fp8_linear(x, layer.weight, layer.scale, layer.bias, layer.block_size, layer._gemm_fn,
                                          layer.gemm_scale, layer.input_scale)
    if m <= 16:  # the FP8-weight GEMV: BF16 activations, as for dynamic layers
        reference = x.float() @ layer.dequantized_weight().t() + layer.bias.float()
    else:
        reference = kernels._emulated(x, layer.weight, layer.scale, layer.bias, layer.block_size, layer.input_scale)
    assert fast.dtype == torch.bfloat16
    assert rel_l2(fast, reference) < 1e-2 and rel_l2(through_dispatch, reference) < 1e-2


@needs_fp8
def test_static_model_compiles_without_graph_breaks_and_matches_eager(qwen_src):
    from omni_fp8 import calibrate

    model = load_transformer(qwen_src, device="cuda", dtype=torch.bfloat16, progress=False)
    cfg = model.config
    inputs = qwen_cuda_inputs(cfg)
    scales = calibrate(model, [inputs], progress=False)
    model = load_transformer(qwen_src, quantization="fp8", device="cuda", progress=False, quantization_config={
        "preset": "none", "activation_scheme": "static", "calibration": scales})
    on_cpu = load_transformer(qwen_src, quantization="fp8", progress=False, quantization_config={
        "preset": "none", "activation_scheme": "static", "calibration": scales})
    with torch.no_grad():
        eager = model(**inputs)[0]
        reference = on_cpu(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()})[0]
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=True)
        compiled = model(**inputs)[0]
    assert rel_l2(eager.cpu(), reference) < 5e-2  # GPU kernels vs the CPU emulation, same scales
    assert rel_l2(compiled, eager) < 5e-2
