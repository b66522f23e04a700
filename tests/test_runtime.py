"""The runtime: converted and load-time FP8 give the same bits; Fp8Linear behaves like nn.Linear."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import same_bits
from torch import nn

from omni_fp8 import Fp8Linear, convert, load_transformer, quantize_
from omni_fp8.converter.errors import ConfigError, ModelMismatchError, UnsupportedSourceError
from omni_fp8.converter.numerics import quantize_weight
from omni_fp8.converter.source import MANIFEST_NAME


def qwen_inputs(model, *, seed: int = 0, batch: int = 1, dtype=torch.bfloat16) -> dict:
    """The keyword arguments QwenImagePipeline passes its transformer, for a 8x8-patch latent."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    h = w = 4
    return {
        "hidden_states": torch.randn(batch, h * w, cfg.in_channels, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, 7, cfg.joint_attention_dim, generator=g).to(dtype),
        "encoder_hidden_states_mask": torch.ones(batch, 7, dtype=torch.bool),
        "timestep": torch.full((batch,), 0.6, dtype=dtype),
        "img_shapes": [[(1, h, w)]] * batch,
        "return_dict": False,
    }


def run_qwen(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**qwen_inputs(model, **kw))[0]


def run_zimage(model, *, seed: int = 0, batch: int = 1, dtype=torch.float32) -> torch.Tensor:
    """As ZImagePipeline calls it: lists of [C, 1, H, W] latents and [L, D] caption features."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = [torch.randn(cfg.in_channels, 1, 8, 8, generator=g).to(dtype) for _ in range(batch)]
    cap = [torch.randn(12, cfg.cap_feat_dim, generator=g).to(dtype) for _ in range(batch)]
    with torch.no_grad():
        out = model(x, torch.full((batch,), 0.4, dtype=dtype), cap, return_dict=False)[0]
    return torch.stack(out)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert same_bits(sa[name], sb[name]), name
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()):
        assert na == nb and type(ma) is type(mb), na


FAMILIES = {"qwen": run_qwen, "zimage": run_zimage}


@pytest.mark.parametrize("family", ["qwen", "zimage"])
@pytest.mark.parametrize("block", [None, (32, 32)])
def test_converted_and_load_time_fp8_are_bit_identical(family, block, request, tmp_path):
    src = request.getfixturevalue(f"{family}_src")
    config = {"weight_block_size": block}
    convert(src, tmp_path / "fp8", config=config, progress=False)

    converted = load_transformer(tmp_path / "fp8", progress=False)
    at_load = load_transformer(src, quantization="fp8", quantization_config=config, progress=False)
    assert_same_model(converted, at_load)
    layers = [m for m in converted.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.block_size == block for m in layers)

    run = FAMILIES[family]
    assert torch.equal(run(converted), run(at_load))
    assert torch.equal(run(converted, batch=3, seed=1), run(at_load, batch=3, seed=1))


@pytest.mark.parametrize("family,block,bound", [
    # Relative L2 error of the transformer output against the unquantized model (BF16 Qwen-Image,
    # FP32 Z-Image), FP8 weights and per-token FP8 activations, default presets. Measured on these
    # random-weight tiny models over 3 seeds: qwen 0.049-0.056 per-tensor, 0.048-0.055 with 32x32
    # blocks; zimage 0.028-0.030 and 0.027-0.029. Bounds leave ~35% headroom.
    ("qwen", None, 0.075), ("qwen", (32, 32), 0.075), ("zimage", None, 0.04), ("zimage", (32, 32), 0.04),
])
def test_fp8_output_stays_close_to_high_precision(family, block, bound, request):
    src = request.getfixturevalue(f"{family}_src")
    reference = load_transformer(src, progress=False)
    assert not any(isinstance(m, Fp8Linear) for m in reference.modules())
    fp8 = load_transformer(src, quantization="fp8", quantization_config={"weight_block_size": block}, progress=False)
    run = FAMILIES[family]
    err = rel_l2(run(fp8), run(reference))
    assert 0 < err < bound, err


@pytest.mark.parametrize("block", [None, (32, 32)])
def test_quantize_in_memory_matches_loading(qwen_src, block):
    plain = load_transformer(qwen_src, progress=False)
    assert quantize_(plain, {"weight_block_size": block}) is plain
    assert_same_model(plain, load_transformer(qwen_src, quantization="fp8", quantization_config={"weight_block_size": block},
                                              progress=False))


def test_qwen_preset_keeps_the_edges_as_linear(qwen_src):
    model = load_transformer(qwen_src, quantization="fp8", progress=False)
    block = model.transformer_blocks[0]
    assert type(model.img_in) is nn.Linear and type(model.proj_out) is nn.Linear
    assert isinstance(block.img_mlp.net[0].proj, Fp8Linear) and isinstance(block.img_mlp.net[2], Fp8Linear)
    assert isinstance(block.attn.to_q, Fp8Linear) and isinstance(block.txt_mlp.net[2], Fp8Linear)
    assert type(model).__name__ == "QwenImageTransformer2DModel"
    assert model.dtype == torch.bfloat16  # diffusers reads the first floating parameter: not float8
    assert not model.training


def test_z_image_preset_keeps_the_timestep_embedder(zimage_src):
    model = load_transformer(zimage_src, quantization="fp8", progress=False)
    assert type(model.t_embedder.mlp[0]) is nn.Linear
    assert isinstance(model.layers[0].attention.to_q, Fp8Linear)
    assert model.layers[0].attention.to_q.bias is None  # Z-Image's projections have no bias


def test_z_image_without_preset_still_runs(zimage_src):
    # Its forward casts the timestep input to t_embedder.mlp[0].weight.dtype: the plan finds that
    # in the model's code and keeps the layer, so even preset "none" gives a working model.
    model = load_transformer(zimage_src, quantization="fp8", quantization_config={"preset": "none"}, progress=False)
    assert type(model.t_embedder.mlp[0]) is nn.Linear and isinstance(model.t_embedder.mlp[2], Fp8Linear)
    assert run_zimage(model).isfinite().all()


def test_unaligned_linears_stay_linear_and_run(tmp_path):
    from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image

    src = save_checkpoint(tiny_qwen_image(joint_attention_dim=40), tmp_path / "src")
    model = load_transformer(src, quantization="fp8", quantization_config={"preset": "none"}, progress=False)
    assert type(model.txt_in) is nn.Linear
    assert run_qwen(model).isfinite().all()


def test_dtype_casts_only_what_stays_high_precision(zimage_src):
    model = load_transformer(zimage_src, quantization="fp8", dtype=torch.bfloat16, progress=False)
    layer = model.layers[0].feed_forward.w1
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert model.t_embedder.mlp[0].weight.dtype == torch.bfloat16
    assert run_zimage(model, dtype=torch.bfloat16).dtype == torch.bfloat16
    older = load_transformer(zimage_src, quantization="fp8", torch_dtype=torch.bfloat16, progress=False)
    assert_same_model(older, model)  # diffusers' older name works too
    with pytest.raises(ConfigError, match="disagree; give dtype only"):
        load_transformer(zimage_src, dtype=torch.float16, torch_dtype=torch.bfloat16, progress=False)


def test_pipeline_folder_with_subfolder(qwen_pipeline, tmp_path):
    convert(qwen_pipeline, tmp_path / "fp8", progress=False)
    a = load_transformer(tmp_path / "fp8", subfolder="transformer", progress=False)
    b = load_transformer(qwen_pipeline, subfolder="transformer", quantization="fp8", progress=False)
    assert_same_model(a, b)


def test_a_diffusers_pipeline_runs_with_the_fp8_transformer(qwen_pipeline, tmp_path):
    """The user's whole path: convert a pipeline folder, load it with diffusers, generate."""
    from diffusers import QwenImagePipeline

    convert(qwen_pipeline, tmp_path / "fp8", progress=False)
    transformer = load_transformer(tmp_path / "fp8", subfolder="transformer", progress=False)
    pipe = QwenImagePipeline.from_pretrained(tmp_path / "fp8", transformer=transformer, dtype=torch.bfloat16)
    reference = QwenImagePipeline.from_pretrained(qwen_pipeline, dtype=torch.bfloat16)
    assert pipe.transformer is transformer

    def generate(p, output_type):
        return p("a cat on a windowsill", num_inference_steps=3, height=32, width=32, output_type=output_type,
                 max_sequence_length=64, generator=torch.Generator().manual_seed(0)).images

    image, ref = generate(pipe, "pt"), generate(reference, "pt")
    assert image.shape == ref.shape == (1, 3, 32, 32) and image.isfinite().all()
    latents, ref_latents = generate(pipe, "latent"), generate(reference, "latent")
    # Relative L2 error against the BF16 pipeline, measured on this tiny random model: 0.022 on
    # the final latents after 3 steps, 0.0078 on the decoded image. Bounds: about 1.5x.
    assert rel_l2(latents, ref_latents) < 0.035
    assert rel_l2(image, ref) < 0.012


def test_foreign_vllm_style_folder_without_manifest(qwen_src, tmp_path):
    """Another tool's fp8 folder: no manifest, scalar scales stored as [1]."""
    from safetensors.torch import load_file, save_file

    convert(qwen_src, tmp_path / "ours", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    tensors = {}
    for path in (tmp_path / "ours").glob("*.safetensors"):
        tensors.update(load_file(path))
    tensors = {k: (v.reshape(1) if k.endswith("weight_scale") else v) for k, v in tensors.items()}
    save_file(tensors, foreign / "diffusion_pytorch_model.safetensors")
    (foreign / "config.json").write_text((tmp_path / "ours" / "config.json").read_text())
    assert_same_model(load_transformer(foreign, progress=False), load_transformer(tmp_path / "ours", progress=False))


class TestFp8Linear:
    def test_from_linear_uses_the_converter_numerics(self):
        torch.manual_seed(0)
        linear = nn.Linear(64, 32).to(torch.bfloat16)
        layer = Fp8Linear.from_linear(linear, block_size=(16, 32))
        q, s = quantize_weight(linear.weight.detach(), (16, 32))
        assert same_bits(layer.weight, q) and same_bits(layer.weight_scale_inv, s)
        assert same_bits(layer.bias, linear.bias.detach())
        assert repr(layer) == "Fp8Linear(in_features=64, out_features=32, bias=True, scheme=fp8_block, block_size=16x32)"

    @pytest.mark.parametrize("shape", [(64,), (1, 64), (5, 64), (2, 7, 64), (2, 3, 4, 64)])
    def test_any_rank_matches_linear(self, shape):
        torch.manual_seed(1)
        linear = nn.Linear(64, 48)
        layer = Fp8Linear.from_linear(linear)
        x = torch.randn(shape)
        y, ref = layer(x), linear(x)
        assert y.shape == ref.shape and y.dtype == x.dtype
        assert rel_l2(y, ref) < 0.06

    def test_to_dtype_keeps_fp8_weights_and_float32_scales(self):
        layer = Fp8Linear.from_linear(nn.Linear(32, 16))
        weight = layer.weight.clone()
        layer.to(torch.bfloat16)
        assert same_bits(layer.weight, weight) and layer.weight_scale.dtype == torch.float32
        assert layer.bias.dtype == torch.bfloat16
        layer.half()
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.bias.dtype == torch.float16
        layer.to("cpu")
        assert layer(torch.randn(3, 32, dtype=torch.float16)).dtype == torch.float16

    def test_state_dict_round_trip(self):
        torch.manual_seed(2)
        layer = Fp8Linear.from_linear(nn.Linear(32, 16), block_size=(16, 16))
        state = layer.state_dict()
        assert set(state) == {"weight", "weight_scale_inv", "bias"}
        fresh = Fp8Linear(32, 16, block_size=(16, 16))
        fresh.load_state_dict(state)
        x = torch.randn(4, 32)
        assert torch.equal(fresh(x), layer(x))

    @pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
    def test_compiles_without_graph_breaks(self, backend):
        torch.manual_seed(3)
        layer = Fp8Linear.from_linear(nn.Linear(64, 32))
        x = torch.randn(2, 5, 64)
        compiled = torch.compile(layer, fullgraph=True, backend=backend)  # fullgraph: a break is an error
        assert torch.equal(compiled(x), layer(x))

    def test_force_fp8_gemm_on_a_device_without_fp8(self):
        with pytest.raises(ConfigError, match=r"force_fp8_kernels: cpu has no FP8 matmul"):
            Fp8Linear.from_linear(nn.Linear(32, 16), force_fp8_gemm=True)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"quantization": "int8"}, ConfigError, r"unknown quantization 'int8'; supported: 'fp8'"),
    ({"quantization": "fp8", "quantization_config": {"ignored_layer": ["x"]}}, ConfigError, r"unknown quantization_config key\(s\) 'ignored_layer'"),
    ({"quantization": "fp8", "quantization_config": {"weight_block_size": [100, 128]}}, ConfigError, "bad weight_block_size"),
    ({"quantization": "fp8", "force_fp8_kernels": True}, ConfigError, r"force_fp8_kernels: cpu has no FP8 matmul"),
])
def test_load_errors(qwen_src, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_transformer(qwen_src, progress=False, **kwargs)


def test_explicit_config_must_match_the_converted_folder(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "fp8", config={"preset": "none"}, progress=False)
    load_transformer(tmp_path / "fp8", quantization_config={"preset": "none"}, progress=False)  # agrees
    with pytest.raises(ConfigError, match=r"disagrees with the converted folder on 10 layer\(s\): the folder quantizes time_text_embed"):
        load_transformer(tmp_path / "fp8", quantization_config={"ignored_layers": ["img_mlp"]}, progress=False)
    with pytest.raises(ConfigError, match=r"asks for weight_block_size \(128, 128\) but the folder was converted with None"):
        load_transformer(tmp_path / "fp8", quantization_config={"preset": "none", "weight_block_size": [128, 128]}, progress=False)


def _edit(folder, fn):
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, path)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    names = {}
    for path in folder.glob("*.safetensors"):
        names.update(dict.fromkeys(load_file(path), path.name))
    data["weight_map"] = names
    index.write_text(json.dumps(data))


def test_missing_or_misshapen_scales(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "fp8", progress=False)
    (tmp_path / "fp8" / MANIFEST_NAME).unlink()
    name = "transformer_blocks.1.attn.to_k.weight_scale"
    _edit(tmp_path / "fp8", lambda t: t.pop(name, None))
    with pytest.raises(ModelMismatchError, match=rf"transformer_blocks.1.attn.to_k.weight is FP8 but {name} is missing"):
        load_transformer(tmp_path / "fp8", progress=False)
    _edit(tmp_path / "fp8", lambda t: t.update({name: torch.ones(3)}) if "transformer_blocks.1.attn.to_k.weight" in t else None)
    with pytest.raises(ModelMismatchError, match=rf"{name} is F32\[3\], expected F32 \[\] or \[1\] or \[64\] or \[64, 1\] for a \[64, 64\] weight"):
        load_transformer(tmp_path / "fp8", progress=False)


def test_edited_config_is_caught_by_the_manifest(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "fp8", progress=False)
    path = tmp_path / "fp8" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["ignored_layers"] = []
    path.write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match="quantization_config differs from .*fp8_manifest.json"):
        load_transformer(tmp_path / "fp8", progress=False)


def test_other_quantization_methods_are_refused(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedSourceError, match="quantized with 'bitsandbytes', not an FP8 layout omni-fp8 reads"):
        load_transformer(folder, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_load_and_fp8_gemm_close_to_emulation(qwen_src):
    from omni_fp8.runtime import device_has_fp8

    cpu = load_transformer(qwen_src, quantization="fp8", quantization_config={"preset": "none"}, progress=False)
    gpu = load_transformer(qwen_src, quantization="fp8", quantization_config={"preset": "none"}, device="cuda", progress=False)
    layer = gpu.transformer_blocks[0].attn.to_q
    assert layer.weight.is_cuda and (layer._gemm_fn is not None) == device_has_fp8("cuda")
    inputs = qwen_inputs(cpu)
    with torch.no_grad():
        ref = cpu(**inputs)[0]
        out = gpu(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()})[0].cpu()
    # Measured 0.031 on an H200: this tiny model has at most 16 tokens per stream, so on the GPU
    # every Linear takes the FP8-weight GEMV with BF16 activations, where the CPU emulation also
    # quantizes the activations (its error is the larger one); plus summation order.
    assert rel_l2(out, ref) < 0.05


def test_static_folders_without_input_scales_are_refused(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "fp8", progress=False)
    (tmp_path / "fp8" / MANIFEST_NAME).unlink()
    path = tmp_path / "fp8" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["activation_scheme"] = "static"
    path.write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match=r"activation_scheme is static but .*\.input_scale is missing"):
        load_transformer(tmp_path / "fp8", progress=False)


def test_block_size_in_config_that_the_shards_do_not_have(qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "fp8", progress=False)
    (tmp_path / "fp8" / MANIFEST_NAME).unlink()
    path = tmp_path / "fp8" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]
    path.write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match=r"weight_scale_inv is missing \(it has weight_scale: config.json's weight_block_size"):
        load_transformer(tmp_path / "fp8", progress=False)


def test_checkpoint_tensors_the_model_does_not_have_or_lacks(copy_of, qwen_src):
    folder = copy_of(qwen_src)
    _edit(folder, lambda t: t.update({"ghost.weight": torch.ones(2)}) if "proj_out.weight" in t else None)
    with pytest.raises(ModelMismatchError, match=r"the checkpoint has 1 tensor\(s\) that QwenImageTransformer2DModel built from config.json does not \(ghost.weight\)"):
        load_transformer(folder, progress=False)
    _edit(folder, lambda t: (t.pop("ghost.weight", None), t.pop("txt_norm.weight", None)))
    with pytest.raises(ModelMismatchError, match=r"the checkpoint lacks 1 tensor\(s\) of QwenImageTransformer2DModel \(txt_norm.weight\)"):
        load_transformer(folder, progress=False)


def test_load_quantized_refuses_wrong_tensors():
    layer = Fp8Linear(32, 16)
    with pytest.raises(ValueError, match="cannot take"):
        layer.load_quantized(torch.zeros(16, 32), torch.ones(()), None)
    with pytest.raises(ValueError, match="cannot take"):
        layer.load_quantized(torch.zeros(8, 32, dtype=torch.float8_e4m3fn), torch.ones(()), None)


def test_copies_and_pickles_of_fp8_layers_make_their_own_plan(tmp_path):
    import copy

    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = layer(x)
    twin = copy.deepcopy(layer)
    assert twin._placed_for is None and torch.equal(twin(x), expected)
    assert twin.weight.data_ptr() != layer.weight.data_ptr()
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert torch.equal(loaded(x), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_graphs_without_a_gpu_is_a_one_line_error(qwen_src):
    from omni_fp8 import enable_cuda_graphs

    model = load_transformer(qwen_src, quantization="fp8", progress=False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        enable_cuda_graphs(model)
    with pytest.raises(ConfigError, match="takes a torch model, not str"):
        enable_cuda_graphs("transformer")
    with pytest.raises(ConfigError, match="Linear names no repeated transformer blocks"):
        enable_cuda_graphs(nn.Linear(4, 4))


def test_cuda_graphs_go_inside_caches_or_not_at_all(qwen_src):
    from omni_fp8 import apply_teacache, enable_cuda_graphs

    model = load_transformer(qwen_src, quantization="fp8", progress=False)
    apply_teacache(model)
    hooks = {id(b): dict(b._diffusers_hook.hooks) for b in model.transformer_blocks if hasattr(b, "_diffusers_hook")}
    with pytest.raises(ConfigError, match="enable CUDA graphs first, then caches"):
        enable_cuda_graphs(model)
    after = {id(b): dict(b._diffusers_hook.hooks) for b in model.transformer_blocks if hasattr(b, "_diffusers_hook")}
    assert after == hooks  # nothing registered on any block


def test_fast_accumulation_is_a_setting_that_replans():
    layer = Fp8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = layer(x)
    layer.fast_accum = True
    assert layer.fast_accum and torch.equal(layer(x), expected)  # the CPU emulation has one accumulation
    assert layer._placed_for == layer._where()
