"""diffusers' own loaders and savers with FP8 models: from_pretrained, pipelines, save_pretrained, dequantize.

Everything goes through diffusers' real code paths (``ModelMixin.from_pretrained``,
``DiffusionPipeline.from_pretrained``, ``PipelineQuantizationConfig``, ``save_pretrained``) with
the quantizer that ``import omni_fp8`` registers; the reference is ``load_transformer``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_runtime import assert_same_model, rel_l2, run_qwen, run_zimage
from torch import nn

import omni_fp8
from omni_fp8 import Fp8Config, Fp8Linear, convert, load_transformer, quantize_, verify
from omni_fp8.converter.errors import ConfigError, CorruptScaleError, OmniFp8Error
from omni_fp8.converter.source import MANIFEST_NAME

pytest.importorskip("accelerate")  # diffusers needs it for every quantized from_pretrained

FAMILIES = {"qwen": ("QwenImageTransformer2DModel", "qwen_src", run_qwen),
            "zimage": ("ZImageTransformer2DModel", "zimage_src", run_zimage)}


def model_class(family):
    import diffusers

    return getattr(diffusers, FAMILIES[family][0])


def run(family, model):
    return FAMILIES[family][2](model, dtype=torch.bfloat16)


@pytest.mark.parametrize("family", ["qwen", "zimage"])
@pytest.mark.parametrize("block", [None, (32, 32)])
def test_from_pretrained_of_a_converted_folder_equals_load_transformer(family, block, request, tmp_path):
    src = request.getfixturevalue(FAMILIES[family][1])
    out = tmp_path / "fp8"
    convert(src, out, config={"weight_block_size": block}, dtype=torch.bfloat16, progress=False)
    theirs = model_class(family).from_pretrained(out)
    ours = load_transformer(out, progress=False)
    assert_same_model(theirs, ours)
    assert theirs.is_quantized and type(theirs.hf_quantizer).__name__ == "Fp8Quantizer"
    assert theirs.dtype == torch.bfloat16 and isinstance(next(iter(
        m for m in theirs.modules() if isinstance(m, Fp8Linear))), Fp8Linear)
    assert theirs.get_memory_footprint() == ours.get_memory_footprint()
    assert torch.equal(run(family, theirs), run(family, ours))


@pytest.mark.parametrize("family", ["qwen", "zimage"])
def test_from_pretrained_quantizes_on_the_fly_with_the_converters_decisions(family, request):
    src = request.getfixturevalue(FAMILIES[family][1])
    config = Fp8Config(ignored_layers=["to_out"], weight_block_size=(32, 32))
    theirs = model_class(family).from_pretrained(src, quantization_config=config, dtype=torch.bfloat16)
    ours = load_transformer(src, quantization="fp8", quantization_config=config, dtype=torch.bfloat16, progress=False)
    assert_same_model(theirs, ours)
    assert theirs.config.quantization_config["ignored_layers"] == ours.config.quantization_config["ignored_layers"]


def test_pipelines_load_converted_folders_and_quantize_through_pipeline_quantization_config(qwen_pipeline, tmp_path):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig, QwenImagePipeline

    convert(qwen_pipeline, tmp_path / "fp8", progress=False)
    reference = load_transformer(tmp_path / "fp8", subfolder="transformer", dtype=torch.bfloat16, progress=False)
    for cls in (DiffusionPipeline, QwenImagePipeline):
        pipe = cls.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
        assert_same_model(pipe.transformer, reference)
    quantized = DiffusionPipeline.from_pretrained(
        qwen_pipeline, dtype=torch.bfloat16,
        quantization_config=PipelineQuantizationConfig(quant_mapping={"transformer": Fp8Config()}))
    assert_same_model(quantized.transformer, reference)
    image = quantized("a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=64, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and image.isfinite().all()


def made(how, qwen_src, tmp_path):
    """An FP8 model made each way a user can make one."""
    from diffusers import QwenImageTransformer2DModel

    out = tmp_path / "fp8"
    if how in ("converted", "from_pretrained"):
        convert(qwen_src, out, config={"weight_block_size": [32, 32]}, progress=False)
    if how == "converted":
        return load_transformer(out, progress=False)
    if how == "from_pretrained":
        return QwenImageTransformer2DModel.from_pretrained(out)
    if how == "load-time":
        return load_transformer(qwen_src, quantization="fp8", progress=False)
    if how == "on-the-fly":
        return QwenImageTransformer2DModel.from_pretrained(qwen_src, quantization_config=Fp8Config())
    model = load_transformer(qwen_src, progress=False)
    return quantize_(model, {"ignored_layers": ["txt_mlp"]})


@pytest.mark.parametrize("how", ["converted", "from_pretrained", "load-time", "on-the-fly", "quantize_"])
def test_save_pretrained_round_trips_bit_exactly_and_verifies(how, qwen_src, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    model = made(how, qwen_src, tmp_path)
    saved = tmp_path / "saved"
    model.save_pretrained(saved, max_shard_size="200KB")
    assert verify(saved).ok, verify(saved).problems
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["is_checkpoint_fp8_serialized"] is True
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    assert manifest["source"]["type"] == "saved"
    for reloaded in (load_transformer(saved, progress=False), QwenImageTransformer2DModel.from_pretrained(saved)):
        assert_same_model(reloaded, model)
        assert torch.equal(run_qwen(reloaded), run_qwen(model))
    assert "Folder:" in omni_fp8.converter.report.folder_text(saved, manifest)
    model.save_pretrained(saved)  # again into the same folder: still verified
    assert verify(saved).ok


def test_without_omni_fp8_diffusers_refuses_instead_of_loading_wrong(qwen_src, tmp_path):
    saved = tmp_path / "saved"
    load_transformer(qwen_src, quantization="fp8", progress=False).save_pretrained(saved)
    code = ("import sys; from diffusers import QwenImageTransformer2DModel as M; "
            f"M.from_pretrained({str(saved)!r}); sys.exit(0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Unknown quantization type, got fp8" in proc.stderr, proc.stderr[-2000:]


def test_pipeline_save_pretrained_writes_a_verified_transformer(qwen_pipeline, tmp_path):
    from diffusers import DiffusionPipeline

    convert(qwen_pipeline, tmp_path / "fp8", progress=False)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "saved")
    assert verify(tmp_path / "saved" / "transformer").ok
    again = DiffusionPipeline.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert_same_model(again.transformer, pipe.transformer)


def test_dequantize_gives_plain_linears_and_forgets_fp8(qwen_src, tmp_path):
    model = load_transformer(qwen_src, quantization="fp8", progress=False)
    expected = run_qwen(model)
    model.dequantize()
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    assert not model.is_quantized and not hasattr(model, "hf_quantizer")
    assert rel_l2(run_qwen(model), expected) < 0.05  # FP8 weights, now without FP8 activations
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not (tmp_path / "plain" / MANIFEST_NAME).exists()


def test_save_refuses_pickles_and_foreign_manifests(qwen_src, tmp_path):
    model = load_transformer(qwen_src, quantization="fp8", progress=False)
    with pytest.raises(ConfigError, match="writes safetensors without a variant"):
        model.save_pretrained(tmp_path / "a", safe_serialization=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / MANIFEST_NAME).write_text("{}")
    with pytest.raises(OmniFp8Error, match="exists and is not an omni-fp8 manifest; it was left as it is"):
        model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / MANIFEST_NAME).read_text() == "{}"


@pytest.mark.parametrize("kwargs,match", [
    ({"torch_dtype": torch.int8}, "torch_dtype torch.int8 is not a compute dtype"),
    ({"device_map": "auto"}, "device_map='auto' is not supported for FP8 models"),
])
def test_from_pretrained_refusals(qwen_src, tmp_path, kwargs, match):
    from diffusers import QwenImageTransformer2DModel

    convert(qwen_src, tmp_path / "fp8", progress=False)
    with pytest.raises(ConfigError, match=match):
        QwenImageTransformer2DModel.from_pretrained(tmp_path / "fp8", **kwargs)


def test_from_pretrained_checks_scales_as_load_transformer_does(qwen_src, tmp_path):
    from diffusers import QwenImageTransformer2DModel
    from test_hostile import rewrite

    convert(qwen_src, tmp_path / "fp8", progress=False)
    rewrite(tmp_path / "fp8", "transformer_blocks.0.attn.to_k.weight_scale", torch.tensor(float("nan")))
    with pytest.raises(CorruptScaleError, match="to_k.weight_scale holds nan"):
        QwenImageTransformer2DModel.from_pretrained(tmp_path / "fp8")


def test_registration_is_lazy_and_idempotent():
    code = ("import sys, omni_fp8; assert 'diffusers.quantizers.auto' not in sys.modules; "
            "omni_fp8.runtime.registration.install(); "
            "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q, AUTO_QUANTIZATION_CONFIG_MAPPING as C; "
            "assert Q['fp8'].__name__ == 'Fp8Quantizer' and C['fp8'] is omni_fp8.Fp8Config; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_fp8_models_refuse_dtype_casts_like_every_quantized_diffusers_model(qwen_src):
    model = load_transformer(qwen_src, quantization="fp8", progress=False)
    with pytest.raises(ValueError, match="Casting a quantized model to a new `dtype` is unsupported"):
        model.to(torch.float16)
    assert isinstance(model.to("cpu"), nn.Module)


def test_a_registration_that_fails_warns_instead_of_breaking_the_import():
    from omni_fp8.runtime import registration

    def broken(module):
        raise AttributeError("no AUTO_QUANTIZER_MAPPING")

    with pytest.warns(RuntimeWarning, match=r"omni-fp8 could not register with diffusers .*load_transformer"):
        registration._run("diffusers.quantizers.auto", broken, None)
