"""LoRA on FP8 transformers through diffusers and peft: load, scale, disable, several adapters,
fuse / unfuse, unload, for both families, against the same LoRA on the BF16 model."""

from __future__ import annotations

import pytest
import torch
from conftest import same_bits
from test_runtime import rel_l2, run_qwen, run_zimage

from omni_fp8 import Fp8Linear, load_transformer, quantize_
from omni_fp8.converter.demo import tiny_pipeline
from omni_fp8.converter.errors import ConfigError

peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

TARGETS = {"qwen": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "img_mlp.net.2", "txt_mlp.net.0.proj"],
           "zimage": ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]}
SOURCES = {"qwen": "qwen_src", "zimage": "zimage_src"}
RUN = {"qwen": run_qwen, "zimage": run_zimage}


def lora_state_dict(model, targets, *, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A random LoRA for ``model`` in peft's key format, made with peft itself (B is not zero)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    scratch = inject_adapter_in_model(config, type(model).from_config(model.config), adapter_name="x")
    state = get_peft_model_state_dict(scratch, adapter_name="x")
    return {k: v.to(torch.bfloat16) * 3.0 for k, v in state.items()}  # an effect of about half the output


def models(family, request, preset=None):
    src = request.getfixturevalue(SOURCES[family])
    bf16 = load_transformer(src, dtype=torch.bfloat16, progress=False)
    fp8 = load_transformer(src, quantization="fp8", quantization_config={"preset": preset}, dtype=torch.bfloat16,
                           progress=False)
    return bf16, fp8


def run(family, model):
    return RUN[family](model, dtype=torch.bfloat16)


def fp8_weights(model):
    return {n.removesuffix(".base_layer"): (m.weight.detach().clone(), m.scale.detach().clone())
            for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


@pytest.mark.parametrize("family", ["qwen", "zimage"])
def test_lora_on_fp8_equals_fp8_base_plus_the_bf16_delta(family, request):
    bf16, fp8 = models(family, request)
    state = lora_state_dict(bf16, TARGETS[family], seed=1)
    base_bf16, base_fp8 = run(family, bf16), run(family, fp8)
    for model in (bf16, fp8):
        model.load_lora_adapter(state, prefix=None, adapter_name="style")
    wrapped = [m for m in fp8.modules() if type(m).__name__ == "Fp8LoraLinear"]
    assert wrapped and all(isinstance(m.get_base_layer(), Fp8Linear) for m in wrapped)
    assert all(m.lora_A["style"].weight.dtype == torch.bfloat16 for m in wrapped)  # adapters in the compute dtype
    with_bf16, with_fp8 = run(family, bf16), run(family, fp8)
    effect_bf16, effect_fp8 = with_bf16 - base_bf16, with_fp8 - base_fp8
    assert rel_l2(effect_bf16, base_bf16) > 0.05  # the LoRA changes the output noticeably
    # Measured on these tiny random models: the LoRA's effect on the FP8 base differs from its
    # effect on the BF16 base by 0.02-0.06 (relative L2), and FP8+LoRA is as far from BF16+LoRA
    # as FP8 is from BF16 (0.02-0.06). Bounds at about 2x.
    assert rel_l2(effect_fp8, effect_bf16) < 0.12
    assert rel_l2(with_fp8, with_bf16) < 2 * rel_l2(base_fp8, base_bf16) + 0.02


@pytest.mark.parametrize("family", ["qwen", "zimage"])
def test_scales_several_adapters_disable_fuse_unfuse_unload(family, request):
    _, fp8 = models(family, request, preset="none")  # every targeted layer FP8: round trips must be exact
    base_out, base_weights = run(family, fp8), fp8_weights(fp8)
    fp8.load_lora_adapter(lora_state_dict(fp8, TARGETS[family], seed=1), prefix=None, adapter_name="a")
    fp8.load_lora_adapter(lora_state_dict(fp8, TARGETS[family], seed=2), prefix=None, adapter_name="b")
    fp8.set_adapters(["a"], weights=[1.0])
    only_a = run(family, fp8)
    fp8.set_adapters(["a"], weights=[0.5])
    half_a = run(family, fp8)
    assert 0.05 < rel_l2(half_a, base_out) < rel_l2(only_a, base_out)
    fp8.set_adapters(["a"], weights=[0.0])
    assert torch.equal(run(family, fp8), base_out)
    fp8.set_adapters(["a", "b"], weights=[1.0, 0.7])
    both = run(family, fp8)
    fp8.disable_lora()
    assert torch.equal(run(family, fp8), base_out)  # the FP8 base, untouched
    fp8.enable_lora()
    assert torch.equal(run(family, fp8), both)

    fp8.fuse_lora(lora_scale=1.0, adapter_names=["a", "b"])
    fused = run(family, fp8)
    # Fusing re-quantizes base + delta with the shared numerics: one FP8 rounding of the weights.
    assert rel_l2(fused, both) < 0.08, rel_l2(fused, both)
    changed = fp8_weights(fp8)
    assert any(not same_bits(changed[n][0], base_weights[n][0]) for n in base_weights)
    fp8.unfuse_lora()
    restored = fp8_weights(fp8)
    assert all(same_bits(restored[n][0], base_weights[n][0]) and same_bits(restored[n][1], base_weights[n][1])
               for n in base_weights)  # bit-exact, not subtracted back
    assert torch.equal(run(family, fp8), both)

    fp8.unload_lora()
    assert not any(type(m).__name__ == "Fp8LoraLinear" for m in fp8.modules())
    assert torch.equal(run(family, fp8), base_out)


def test_lora_loaded_before_quantize_fuses_into_fp8(qwen_src):
    model = load_transformer(qwen_src, dtype=torch.bfloat16, progress=False)
    model.load_lora_adapter(lora_state_dict(model, TARGETS["qwen"], seed=3), prefix=None, adapter_name="a")
    quantize_(model)
    wrapped = [m for m in model.modules() if type(m).__name__ == "Fp8LoraLinear"]
    assert wrapped and all(m.lora_A["a"].weight.dtype == torch.bfloat16 for m in wrapped)  # adapters not quantized
    unfused = run_qwen(model)
    model.fuse_lora()
    assert rel_l2(run_qwen(model), unfused) < 0.05
    model.unfuse_lora()
    assert rel_l2(run_qwen(model), unfused) < 0.01  # see above: peft's BF16 unmerge rounds


def test_pipeline_lora_api_with_an_fp8_transformer(qwen_src, tmp_path):
    from diffusers import QwenImagePipeline
    from peft.utils import get_peft_model_state_dict  # noqa: F401  (peft's format is what diffusers saves)

    transformer = load_transformer(qwen_src, quantization="fp8", dtype=torch.bfloat16, progress=False)
    state = lora_state_dict(transformer, TARGETS["qwen"], seed=4)
    QwenImagePipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=state)
    pipe = tiny_pipeline("qwen-image", transformer=load_transformer(qwen_src, dtype=torch.bfloat16,
                                                                       progress=False))
    pipe.transformer = transformer

    def generate():
        return pipe("a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    before = generate()
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="style")
    styled = generate()
    assert rel_l2(styled, before) > 0.01
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert rel_l2(generate(), before) < 1e-3
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    pipe.fuse_lora()
    assert rel_l2(generate(), styled) < 0.05
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert rel_l2(generate(), before) < 0.01  # peft's BF16 unmerge of the kept layers rounds


def test_dora_is_refused_in_one_line(qwen_src):
    from peft import LoraConfig

    model = load_transformer(qwen_src, quantization="fp8", dtype=torch.bfloat16, progress=False)
    with pytest.raises(ConfigError, match="not supported on FP8 layers"):
        model.add_adapter(LoraConfig(r=4, target_modules=["to_q"], use_dora=True))
