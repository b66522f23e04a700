"""Eager mode on a GPU: the short launch paths give the reference bits, CUDA graphs replay the eager
blocks exactly. Skipped without a CUDA GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_gpu import needs_fp8, pytestmark, rel_l2  # noqa: F401 - the GPU marks and the error measure

from omni_fp8 import Fp8Linear, disable_cuda_graphs, enable_cuda_graphs, load_transformer
from omni_fp8.converter.numerics import quantize_activation
from omni_fp8.runtime import kernels


@pytest.mark.parametrize("group", [0, 128])
@pytest.mark.parametrize("m", [1, 16, 333])
def test_repeated_launches_keep_the_reference_bits(m, group):
    """The second and later calls of a pattern skip Triton's binding: same bits as the first and
    as the reference, for new values, and for an input that is not 16-byte aligned."""
    from omni_fp8.runtime.triton_kernels import HAVE_TRITON, quantize_activation_cuda

    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    torch.manual_seed(m)
    base = (torch.randn(m * 1024 + 1, device="cuda") * 5).to(torch.bfloat16)
    for trial in range(3):
        x = base[:m * 1024].view(m, 1024) * (trial + 1)
        if trial == 2:
            x = base[1:].view(m, 1024)  # 2 bytes past an aligned address: another specialization
            assert x.data_ptr() % 16
        q, s = quantize_activation_cuda(x, group)
        ref_q, ref_s = quantize_activation(x.cpu(), group or None)
        assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8)), trial
        assert torch.equal(s.cpu(), ref_s), trial


@needs_fp8
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("m", [3, 64])
def test_eager_shortcut_equals_the_general_path(per_channel, m):
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(512, 384).to(torch.bfloat16), per_channel=per_channel).cuda()
    assert layer._eager is not None
    x = torch.randn(2, m, 512, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the second call takes the direct launches
        fast = layer(x)
        general = kernels.fp8_linear(x, layer.weight, layer.scale, layer.bias, None, layer._gemm_fn, layer.gemm_scale)
        assert torch.equal(fast, general)
    layer.fast_accum = True  # re-plans the GEMM
    assert layer._gemm_fn is kernels._rowwise_mm_fast
    assert rel_l2(layer(x), general) < 2e-2  # fast accumulation: close, not equal


@needs_fp8
def test_static_per_channel_shortcut_follows_row_counts_and_a_new_scale():
    """The row-wise activation scale is made once per row count: calls alternating between row
    counts, and a calibrated scale written in place, give the general path's bits."""
    from omni_fp8.converter.numerics import activation_scale

    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(512, 384).to(torch.bfloat16), per_channel=True,
                                  input_scale=activation_scale(torch.tensor(4.0))).cuda()
    assert layer._eager is not None
    for trial, m in enumerate([64, 200, 64, 64]):
        if trial == 3:
            with torch.no_grad():
                layer.input_scale.mul_(2)  # in place: the cached row scales must follow
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        general = kernels.fp8_linear(x, layer.weight, layer.scale, layer.bias, None, layer._gemm_fn,
                                     layer.gemm_scale, layer.input_scale)
        assert torch.equal(layer(x), general), (trial, m)


@needs_fp8
@pytest.mark.parametrize("n,k", [(384, 1536), (1536, 384)])  # K > N: scalar scales; else row-wise
@pytest.mark.parametrize("fast", [False, True])
def test_static_per_tensor_layer_eager_and_compiled(n, k, fast):
    """A static per-tensor layer takes the GEMM measured faster at its shape (scalar scales where
    K > N, row-wise elsewhere) with the layer's fast_accum: the eager shortcut and the general path
    give the same bits, and the compiled layer's code asks for the same accumulation (a compiled
    static layer once lost fast_accum, running exact accumulation)."""
    from omni_fp8.converter.numerics import activation_scale

    assert kernels.per_tensor_gemm_faster(n, k) == (k > n)
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(k, n).to(torch.bfloat16), input_scale=activation_scale(torch.tensor(4.0))).cuda()
    layer.fast_accum = fast
    x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)
        general = kernels.fp8_linear(x, layer.weight, layer.scale, layer.bias, None, layer._gemm_fn, layer.gemm_scale,
                                     layer.input_scale, fast)
        graphs = []

        def capture(gm, example_inputs):  # the graph torch.compile traced, before Inductor
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(layer, backend=capture, fullgraph=True)(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)(x)
        torch._dynamo.reset()
    assert torch.equal(eager, general)
    calls = [node for gm in graphs for node in gm.graph.nodes if node.target is torch._scaled_mm]
    assert len(calls) == 1 and calls[0].kwargs["use_fast_accum"] is fast
    assert rel_l2(compiled, eager) < 1e-2  # Inductor's division in the quantization may round differently


@needs_fp8
def test_eager_shortcut_follows_a_move():
    layer = Fp8Linear.from_linear(nn.Linear(256, 256).to(torch.bfloat16)).cuda()
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    before = layer(x)
    layer.weight.data = layer.weight.data.cpu().cuda()  # what group offloading does: new storage
    assert torch.equal(layer(x), before)
    layer.to("cpu")
    assert layer._eager is None and torch.allclose(layer(x.cpu()).float(), before.cpu().float(), atol=0.05, rtol=0.05)


def _qwen_inputs(model, seed: int, tokens: int = 64, text: int = 16) -> dict:
    cfg = model.config
    g = torch.Generator(device="cuda").manual_seed(seed)
    side = int(tokens ** 0.5)
    return {
        "hidden_states": torch.randn(1, tokens, cfg.in_channels, device="cuda", generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, text, cfg.joint_attention_dim, device="cuda", generator=g).bfloat16(),
        "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.bool, device="cuda"),
        "timestep": torch.full((1,), 0.3 + 0.1 * seed, device="cuda").bfloat16(),
        "img_shapes": [[(1, side, side)]],
        "return_dict": False,
    }


@pytest.mark.parametrize("quantization", ["fp8", None])
def test_cuda_graphs_replay_the_eager_blocks_exactly(qwen_src, quantization):
    model = load_transformer(qwen_src, quantization=quantization, device="cuda", progress=False,
                             dtype=torch.bfloat16, quantization_config={"preset": "none"} if quantization else None)
    with torch.no_grad():
        eager = [model(**_qwen_inputs(model, seed))[0] for seed in range(4)]
        other = model(**_qwen_inputs(model, 9, tokens=16, text=8))[0]
        enable_cuda_graphs(model)
        graphed = [model(**_qwen_inputs(model, seed))[0] for seed in range(4)]  # warm-up, capture, replays
        graphed_other = [model(**_qwen_inputs(model, 9, tokens=16, text=8))[0] for _ in range(3)]  # its own graphs
        hooks = [b._diffusers_hook.hooks["omni_fp8_cuda_graph"] for b in model.transformer_blocks]
        assert all(len(h.graphs) == 2 and h.eager_reason is None for h in hooks)
        for a, b in zip(eager, graphed):
            assert torch.equal(a, b)
        assert all(torch.equal(other, g) for g in graphed_other)
        kept = graphed[2]
        model(**_qwen_inputs(model, 7))  # a later replay must not overwrite what the caller kept
        assert torch.equal(kept, eager[2])
        # The weights move (what offloading does): captured again at the new addresses.
        for block in model.transformer_blocks:
            for p in block.parameters():
                p.data = p.data.clone()
        assert torch.equal(model(**_qwen_inputs(model, 1))[0], eager[1])
        disable_cuda_graphs(model)
        assert torch.equal(model(**_qwen_inputs(model, 1))[0], eager[1])


def test_cuda_graphs_serve_z_image(zimage_src):
    model = load_transformer(zimage_src, quantization="fp8", device="cuda", progress=False, dtype=torch.bfloat16)
    cfg = model.config
    g = torch.Generator(device="cuda").manual_seed(0)
    x = [torch.randn(cfg.in_channels, 1, 16, 16, device="cuda", generator=g).bfloat16()]
    cap = [torch.randn(12, cfg.cap_feat_dim, device="cuda", generator=g).bfloat16()]
    t = torch.full((1,), 0.5, device="cuda").bfloat16()
    with torch.no_grad():
        eager = model(x, t, cap, return_dict=False)[0][0]
        enable_cuda_graphs(model)
        for _ in range(3):
            assert torch.equal(model(x, t, cap, return_dict=False)[0][0], eager)


def test_cuda_graphs_refuse_what_they_cannot_serve(qwen_src):
    from omni_fp8 import OmniFp8Error

    with pytest.raises(OmniFp8Error, match="repeated transformer blocks"):
        enable_cuda_graphs(nn.Linear(4, 4))
    model = load_transformer(qwen_src, quantization="fp8", device="cuda", progress=False)
    with torch.enable_grad():  # autograd on: eager, never captured
        enable_cuda_graphs(model)
        for _ in range(3):
            model(**_qwen_inputs(model, 0))
    assert all(not b._diffusers_hook.hooks["omni_fp8_cuda_graph"].graphs for b in model.transformer_blocks)


def test_calibrate_refuses_blocks_replayed_as_cuda_graphs(qwen_src):
    """A replayed graph runs no Linear's forward, so calibration would observe nothing."""
    from omni_fp8 import calibrate
    from omni_fp8.converter.errors import ConfigError

    model = load_transformer(qwen_src, device="cuda", dtype=torch.bfloat16, progress=False)
    calls = [_qwen_inputs(model, 0)]
    enable_cuda_graphs(model)
    with pytest.raises(ConfigError, match="disable_cuda_graphs first"):
        calibrate(model, calls, progress=False)
    disable_cuda_graphs(model)
    assert calibrate(model, calls, progress=False).calls == 1
