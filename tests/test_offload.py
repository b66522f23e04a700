"""FP8 transformers under diffusers' and accelerate's offloading, on the CPU (CI has no GPU).

Every mode moves weights a different way (model offload: ``.to()``; sequential: new Parameters
per call; group offload: ``.data`` assignment), and ``Fp8Linear`` must follow the weight each
time. Here the onload device is the CPU, so outputs must equal the non-offloaded model exactly;
``test_gpu.py`` checks on a GPU that the FP8 kernels (not the emulation) run in every mode.
"""

from __future__ import annotations

import pytest
import torch
from test_runtime import run_qwen, run_zimage

from omni_fp8 import Fp8Linear, load_transformer
from omni_fp8.converter.demo import tiny_pipeline

pytest.importorskip("accelerate")

CPU = torch.device("cpu")
RUN = {"qwen": run_qwen, "zimage": run_zimage}
SOURCES = {"qwen": "qwen_src", "zimage": "zimage_src"}


def offload(model, mode: str) -> None:
    from accelerate import cpu_offload

    if mode == "sequential":  # what enable_sequential_cpu_offload does to each component
        cpu_offload(model, execution_device=CPU, offload_buffers=len(model._parameters) > 0)
    elif mode == "group-block":
        model.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="block_level",
                                   num_blocks_per_group=1)
    elif mode == "group-leaf":
        model.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="leaf_level")


@pytest.mark.parametrize("family", ["qwen", "zimage"])
@pytest.mark.parametrize("mode", ["sequential", "group-block", "group-leaf"])
def test_offloaded_fp8_transformer_equals_the_plain_one(family, mode, request):
    src = request.getfixturevalue(SOURCES[family])

    def fresh():
        return load_transformer(src, quantization="fp8", dtype=torch.bfloat16, progress=False)

    expected = RUN[family](fresh(), dtype=torch.bfloat16)
    model = fresh()
    offload(model, mode)
    for _ in range(2):  # the second call finds its weights moved again
        assert torch.equal(RUN[family](model, dtype=torch.bfloat16), expected)
    assert any(isinstance(m, Fp8Linear) for m in model.modules())


def test_pipeline_model_cpu_offload_with_an_fp8_transformer(qwen_src):
    def pipeline():
        pipe = tiny_pipeline("qwen-image", transformer=load_transformer(qwen_src, dtype=torch.bfloat16,
                                                                       progress=False))
        pipe.transformer = load_transformer(qwen_src, quantization="fp8", dtype=torch.bfloat16, progress=False)
        return pipe

    def generate(pipe):
        return pipe("a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    expected = generate(pipeline())
    pipe = pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe), expected)
    assert torch.equal(generate(pipe), expected)


def test_the_gemm_plan_follows_the_weight_and_is_not_redone_while_it_stays(qwen_src):
    model = load_transformer(qwen_src, quantization="fp8", dtype=torch.bfloat16, progress=False)
    layer = next(m for m in model.modules() if isinstance(m, Fp8Linear))
    calls = []
    original = layer._place
    layer._place = lambda *a: (calls.append(1), original(*a))[1]
    run_qwen(model)
    run_qwen(model)
    assert calls == []  # nothing moved: no re-planning per call
    layer.weight.data = layer.weight.data.clone()  # what group offloading does on onload
    layer.weight_scale.data = layer.weight_scale.data.clone()
    run_qwen(model)
    assert calls == [1]
    # The GEMM's scale layout is a real buffer from the start (offloading hooks move every buffer
    # they see when set up; a None one crashed them), on the weight's device.
    assert layer.gemm_scale.device == layer.weight.device
