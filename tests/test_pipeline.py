"""``Omni``, the cache backends and ``omni-fp8 text-to-image`` on whole tiny pipelines of both families.

The pipelines are diffusers' real ``QwenImagePipeline`` / ``ZImagePipeline`` with tiny random
components (``converter/demo.py``: the conftest fixtures ``qwen_pipeline`` / ``zimage_pipeline``,
saved in BF16). Images are 32x32 after 4-6 steps; most runs compute in FP32, which a CPU does
many times faster than BF16, so the whole file stays within about a minute and a half.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from omni_fp8 import Omni, OmniDiffusionSamplingParams, TeaCacheConfig, convert
from omni_fp8.converter.errors import ConfigError, SourceNotFoundError, UnsupportedSourceError
from omni_fp8.runtime.cli import main

pytest.importorskip("accelerate")

PROMPT = "A cat sitting on a windowsill"


def params(arch: str, **overrides) -> OmniDiffusionSamplingParams:
    """Small images, few steps, classifier-free guidance on (two transformer calls per Qwen step)."""
    values = {"num_inference_steps": 6, "height": 32, "width": 32, "seed": 0}
    values.update({"negative_prompt": " "} if arch == "qwen-image" else {"guidance_scale": 3.0})
    values.update(overrides)
    return OmniDiffusionSamplingParams(**values)


def pixels(output) -> np.ndarray:
    return np.asarray(output.images[0]).astype(np.float64) / 255


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a busy 2-core machine one thread runs their many small ops many
    times faster than two (the hand-offs cost more than the work)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- FP8 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,bound", [
    # Relative L2 of the 32x32 images' pixels, FP8 (default presets) against BF16, same seed,
    # 6 steps with CFG: measured 0.0041-0.0043 (Qwen-Image) and 0.0097-0.0113 (Z-Image) over
    # seeds 0-2 (PSNR 53 dB and 44-45 dB). Random tiny models: their images are near-uniform,
    # so this bounds the code path, not the quality of real models. Bounds leave ~35% headroom.
    ("qwen-image", 0.006), ("z-image", 0.015),
])
def test_bf16_and_fp8_on_the_same_seed(arch, bound, pipeline_folder):
    bf16 = Omni(pipeline_folder(arch), progress=False)
    fp8 = Omni(pipeline_folder(arch), quantization="fp8", progress=False)
    a, b = pixels(fp8.generate(PROMPT, params(arch))[0]), pixels(bf16.generate(PROMPT, params(arch))[0])
    assert 0 < rel_l2(a, b) < bound
    assert bf16.info()["quantization"] is None
    assert fp8.info()["quantization"]["quantization_config"]["quant_method"] == "fp8"
    assert type(fp8.pipeline.transformer.transformer_blocks[0].attn.to_q if arch == "qwen-image"
                else fp8.pipeline.transformer.layers[0].attention.to_q).__name__ == "Fp8Linear"


@pytest.mark.parametrize("arch", ["qwen-image", "z-image"])
def test_a_converted_folder_gives_the_images_of_load_time_quantization(arch, pipeline_folder, tmp_path):
    options = {"method": "fp8", "ignored_layers": ["to_out"]}  # a spec-style dict, beyond the preset
    convert(pipeline_folder(arch), tmp_path / "fp8", config=options, progress=False)
    converted = Omni(tmp_path / "fp8", dtype="fp32", progress=False)
    at_load = Omni(pipeline_folder(arch), quantization_config=options, dtype="fp32", progress=False)
    assert converted.info()["quantization"]["mode"] == "fp8-converted"
    assert at_load.info()["quantization"]["mode"] == "fp8"
    assert np.array_equal(pixels(converted.generate(PROMPT, params(arch))[0]),
                          pixels(at_load.generate(PROMPT, params(arch))[0]))
    # The folder's own conversion is what loads: options that describe another one are refused.
    Omni(tmp_path / "fp8", quantization_config=options, dtype="fp32", progress=False)
    with pytest.raises(ConfigError, match="disagrees with the converted folder"):
        Omni(tmp_path / "fp8", quantization_config={"ignored_layers": ["to_q"]}, progress=False)


@pytest.mark.parametrize("arch,cache", [("qwen-image", None), ("qwen-image", "tea_cache"), ("z-image", None)])
def test_fused_blocks_give_the_same_images(arch, cache, pipeline_folder):
    """Eager on the CPU the fused blocks run the same operations on the same values (bit-identical,
    tests/test_fused_blocks.py): the images are too, with a cache deciding around them."""
    options = {"quantization": "fp8", "dtype": "fp32", "cache_backend": cache, "progress": False}
    plain = Omni(pipeline_folder(arch), **options)
    fused = Omni(pipeline_folder(arch), fuse_blocks=True, **options)
    assert fused.info()["fuse_blocks"] is True and plain.info()["fuse_blocks"] is False
    assert any(hasattr(m, "to_qkv") for m in fused.pipeline.transformer.modules())
    assert np.array_equal(pixels(fused.generate(PROMPT, params(arch))[0]), pixels(plain.generate(PROMPT, params(arch))[0]))


def test_prompt_lists_and_several_images_per_prompt(zimage_pipeline):
    omni = Omni(zimage_pipeline, quantization="fp8", dtype="fp32", progress=False)
    prompts = ["a cat", "a dog"]
    out = omni.generate(prompts, params("z-image", num_images_per_prompt=2, negative_prompt="blurry"))
    assert [o.prompt for o in out] == prompts  # ZImagePipeline writes its chat template into its list, not ours
    assert [len(o.images) for o in out] == [2, 2] and out[0].images[0].size == (32, 32)
    assert not np.array_equal(np.asarray(out[0].images[0]), np.asarray(out[0].images[1]))  # own noise each
    assert out[0].timings is out[1].timings and out[0].timings.steps == 6
    again = omni.generate(prompts, params("z-image", num_images_per_prompt=2, negative_prompt="blurry"))
    assert np.array_equal(np.asarray(again[1].images[1]), np.asarray(out[1].images[1]))  # the seed decides


# --- caches -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen-image", "z-image"])
def test_tea_cache_skips_with_a_high_threshold_and_never_at_zero(arch, pipeline_folder):
    plain = Omni(pipeline_folder(arch), quantization="fp8", dtype="fp32", progress=False)
    reference = plain.generate(PROMPT, params(arch))[0]
    calls = 2 if arch == "qwen-image" else 1  # Qwen-Image runs the negative prompt as a second call
    never = Omni(pipeline_folder(arch), quantization="fp8", dtype="fp32", cache_backend="tea_cache",
                 cache_config={"rel_l1_thresh": 0}, progress=False).generate(PROMPT, params(arch))[0]
    assert never.timings.steps_skipped == 0 and never.timings.transformer_calls_skipped == 0
    assert np.array_equal(pixels(never), pixels(reference))
    eager = Omni(pipeline_folder(arch), quantization="fp8", dtype="fp32", cache_backend="tea_cache",
                 cache_config={"rel_l1_thresh": 10.0}, progress=False)
    for _ in range(2):  # the second generation starts from a reset state
        out = eager.generate(PROMPT, params(arch))[0]
        # Only the first and the last step compute; every other call reuses the cached residual.
        assert out.timings.steps_skipped == 4 and out.timings.transformer_calls_skipped == 4 * calls
        assert out.timings.transformer_calls == 6 * calls
    assert 0 < rel_l2(pixels(out), pixels(reference)) < 0.2
    assert np.isfinite(pixels(out)).all()


@pytest.mark.parametrize("backend,config", [
    ("first_block_cache", {"threshold": 5.0}),
    ("mag_cache", {"threshold": 5.0, "max_skip_steps": 10, "retention_ratio": 0.2}),
    ("taylorseer_cache", {"cache_interval": 2, "disable_cache_before_step": 2}),
])
def test_each_diffusers_cache_backend_runs_and_skips(backend, config, qwen_pipeline):
    reference = Omni(qwen_pipeline, quantization="fp8", dtype="fp32", progress=False).generate(PROMPT,
                                                                                               params("qwen-image"))
    omni = Omni(qwen_pipeline, quantization="fp8", dtype="fp32", cache_backend=backend, cache_config=config,
                progress=False)
    assert omni.info()["cache"]["backend"] == backend
    for _ in range(2):
        out = omni.generate(PROMPT, params("qwen-image"))[0]
        assert out.timings.steps_skipped > 0 and out.timings.transformer_calls_skipped > 0
        assert 0 < rel_l2(pixels(out), pixels(reference[0])) < 0.2


def test_mag_cache_defaults_are_qwen_images_calibrated_ratios(qwen_pipeline):
    omni = Omni(qwen_pipeline, dtype="fp32", cache_backend="mag_cache", progress=False)
    out = omni.generate(PROMPT, params("qwen-image", num_inference_steps=8))[0]
    config = omni.info()["cache"]["config"]
    assert config["threshold"] == 0.06 and config["max_skip_steps"] == 2 and config["num_inference_steps"] == 8
    assert out.timings.steps == 8


@pytest.mark.parametrize("kwargs,error,fragment", [
    ({"cache_backend": "no_cache"}, ConfigError, "unknown cache_backend 'no_cache'; use one of tea_cache"),
    ({"cache_backend": "pyramid_attention_broadcast"}, ConfigError, "one state per attention layer"),
    ({"cache_backend": "faster_cache"}, ConfigError, "positive and negative prompts in one batch"),
    ({"cache_backend": "sea_cache"}, ConfigError, "never skips"),
    ({"cache_backend": "tea_cache", "cache_config": {"threshold": 0.2}}, ConfigError,
     "unknown tea_cache option(s) 'threshold'; use coefficients, num_inference_steps, rel_l1_thresh"),
    ({"cache_backend": "tea_cache", "cache_config": {"rel_l1_thresh": -1}}, ConfigError, "finite number >= 0"),
    ({"cache_backend": "first_block_cache", "cache_config": {"threshold": "high"}}, ConfigError, "must be a number"),
    ({"cache_backend": "mag_cache", "cache_config": {"mag_ratios": None}}, ConfigError, "mag_ratios"),
    ({"cache_config": {"rel_l1_thresh": 0.2}}, ConfigError, "cache_config was given without cache_backend"),
    ({"compile": True, "cache_backend": "taylorseer_cache"}, ConfigError, "drop compile or pick another cache"),
    ({"quantization": "int8"}, ConfigError, "unknown quantization 'int8'"),
    ({"quantization_config": {"method": "fp8", "ignored_layer": ["img_mlp"]}}, ConfigError, "'ignored_layer'"),
    ({"dtype": "keep"}, ConfigError, "dtype 'keep'"),
    ({"enable_cpu_offload": "disk"}, ConfigError, "enable_cpu_offload must be"),
    ({"enable_cpu_offload": True, "group_offload": True}, ConfigError, "choose one"),
    ({"group_offload": {"offload_type": "block"}}, ConfigError, "'block_level' or 'leaf_level'"),
    ({"parallel": {"ulysses_degree": 2}}, ConfigError, "torchrun --nproc-per-node 2"),
    ({"parallel": {"ulyses_degree": 2}}, ConfigError, "unknown parallel option(s) 'ulyses_degree'"),
    ({"parallel": {"ulysses_degree": 1}}, ConfigError, "above 1"),
    ({"parallel": {"ulysses_degree": 2}, "compile": True}, ConfigError, "compile does not combine with parallel"),
    ({"revision": "main"}, ConfigError, "apply to Hub repo ids"),
    ({"device": "cuda:7"}, ConfigError, "device 'cuda:7'"),
    ({"attention_backend": "no-such"}, ConfigError, "attention_backend 'no-such'"),
    ({"cuda_graphs": "yes"}, ConfigError, "cuda_graphs must be True or False"),
    ({"cuda_graphs": True, "compile": True}, ConfigError, "does not combine with compile"),
    ({"cuda_graphs": True, "enable_cpu_offload": True}, ConfigError, "offloading"),
    ({"cuda_graphs": True, "device": "cpu"}, ConfigError, "cuda_graphs needs a CUDA device"),
    ({"fuse_blocks": 1}, ConfigError, "fuse_blocks must be True or False"),
    ({"fuse_blocks": True, "parallel": {"ulysses_degree": 2}}, ConfigError, "fuse_blocks does not combine with parallel"),
])
def test_bad_options_are_refused_by_name(qwen_pipeline, kwargs, error, fragment):
    with pytest.raises(error) as info:
        Omni(qwen_pipeline, progress=False, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_caches_that_do_not_serve_z_image_are_refused_with_the_reason(zimage_pipeline):
    for backend in ("first_block_cache", "mag_cache", "taylorseer_cache"):
        with pytest.raises(ConfigError, match=f"'{backend}' does not support ZImageTransformer2DModel: diffusers "
                                              r"0.42.1 offers its caches only on CacheMixin models.*takes tea_cache"):
            Omni(zimage_pipeline, cache_backend=backend, progress=False)


def test_caches_do_not_stack(qwen_pipeline):
    from omni_fp8 import apply_teacache

    omni = Omni(qwen_pipeline, dtype="fp32", cache_backend="first_block_cache", progress=False)
    with pytest.raises(ConfigError, match=r"already has a cache \(FirstBlockCacheConfig\)"):
        apply_teacache(omni.pipeline.transformer, TeaCacheConfig(rel_l1_thresh=0.2))
    omni = Omni(qwen_pipeline, dtype="fp32", cache_backend="tea_cache", progress=False)
    with pytest.raises(ConfigError, match="already has a cache"):
        apply_teacache(omni.pipeline.transformer, {"rel_l1_thresh": 0.2})


def test_tea_cache_hooks_come_off_cleanly(qwen_pipeline):
    from omni_fp8 import remove_teacache
    from omni_fp8.runtime.teacache import teacache_counts

    omni = Omni(qwen_pipeline, dtype="fp32", cache_backend="tea_cache", cache_config={"rel_l1_thresh": 10.0},
                progress=False)
    omni.generate(PROMPT, params("qwen-image"))
    assert teacache_counts(omni.pipeline.transformer) == (4, 8)
    remove_teacache(omni.pipeline.transformer)
    assert teacache_counts(omni.pipeline.transformer) == (0, 0)
    out = omni.generate(PROMPT, params("qwen-image"))[0]
    assert out.timings.transformer_calls_skipped == 0  # the blocks run on every call again


# --- sampling parameters, prompts, folders ------------------------------------------------------

@pytest.mark.parametrize("arch,overrides,fragment", [
    ("qwen-image", {"guidance_scale": 4.0}, "ignores guidance_scale for this model"),
    ("qwen-image", {"negative_prompt": None, "true_cfg_scale": 4.0}, "needs a negative_prompt"),
    ("qwen-image", {"height": 36}, "height 36 is not a multiple of 8"),
    ("z-image", {"true_cfg_scale": 4.0},
     "ZImagePipeline has no true_cfg_scale; its guidance is set with guidance_scale"),
    ("z-image", {"guidance_scale": 0.0, "negative_prompt": "blurry"}, "no effect with guidance_scale 0"),
    ("z-image", {"negative_prompt": ["a", "b"]}, "2 entries for 1 prompt(s)"),
])
def test_sampling_params_the_pipeline_would_ignore_are_refused(arch, overrides, fragment, pipeline_folder):
    omni = Omni(pipeline_folder(arch), dtype="fp32", progress=False)
    with pytest.raises(ConfigError) as info:
        omni.generate(PROMPT, params(arch, **overrides))
    assert fragment in str(info.value)


@pytest.mark.parametrize("values,fragment", [
    ({"num_inference_steps": 0}, "num_inference_steps must be a whole number >= 1"),
    ({"height": 32.5}, "height must be a whole number"),
    ({"seed": -1}, "seed must be a whole number >= 0"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a number >= 0"),
    ({"negative_prompt": 3}, "negative_prompt must be a string"),
])
def test_sampling_params_validate_themselves(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        OmniDiffusionSamplingParams(**values)


@pytest.mark.parametrize("prompt,fragment", [
    ("", "prompt is empty"),
    ([], "no prompt given"),
    (["a cat", "  "], "prompt 1 is empty"),
    (["a cat", 3], "prompt 1 is a int, not a string"),
    (None, "prompt must be a string or a list of strings"),
])
def test_bad_prompts(zimage_pipeline, prompt, fragment):
    omni = Omni(zimage_pipeline, dtype="fp32", progress=False)
    with pytest.raises(ConfigError, match=fragment):
        omni.generate(prompt, params("z-image"))


def test_folders_omni_cannot_run(qwen_pipeline, tmp_path):
    with pytest.raises(UnsupportedSourceError, match="a transformer folder .no model_index.json.; Omni needs a whole"):
        Omni(qwen_pipeline / "transformer", progress=False)
    with pytest.raises(SourceNotFoundError, match="no such folder, and not a Hub repo id"):
        Omni(tmp_path / "nothing", progress=False)


def test_hub_repo_ids_are_downloaded_by_diffusers(monkeypatch, qwen_pipeline):
    from diffusers import DiffusionPipeline

    asked = []
    monkeypatch.setattr(DiffusionPipeline, "download",
                        classmethod(lambda cls, repo, **kw: asked.append((repo, kw)) or str(qwen_pipeline)))
    omni = Omni("Qwen/Qwen-Image", revision="main", dtype="fp32", progress=False)
    assert asked == [("Qwen/Qwen-Image", {"revision": "main", "token": None})]
    assert omni.info()["folder"] == str(qwen_pipeline)

    def offline(cls, repo, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(offline))
    with pytest.raises(SourceNotFoundError, match="Qwen/Qwen-Image: could not download it .OSError: We couldn't"):
        Omni("Qwen/Qwen-Image", progress=False)


# --- offloading, compilation, several processes -------------------------------------------------

@pytest.fixture(scope="module")
def fp8_reference(qwen_pipeline):
    omni = Omni(qwen_pipeline, quantization="fp8", dtype="fp32", progress=False)
    return omni.generate(PROMPT, params("qwen-image"))[0]


@pytest.mark.parametrize("kwargs", [{"enable_cpu_offload": True}, {"group_offload": True},
                                    {"group_offload": {"offload_type": "leaf_level"}}])
def test_offloaded_pipelines_give_the_same_images(qwen_pipeline, fp8_reference, kwargs):
    # The onload device is the CPU here, so every mode must reproduce the plain run exactly.
    # (enable_sequential_cpu_offload is left to the GPU tests: with the CPU as execution device
    # accelerate fails on these pipelines' text encoders, with or without omni-fp8.)
    omni = Omni(qwen_pipeline, quantization="fp8", dtype="fp32", device="cpu", progress=False, **kwargs)
    assert omni.info()["offload"] == ("model" if "enable_cpu_offload" in kwargs else "group")
    for _ in range(2):
        assert np.array_equal(pixels(omni.generate(PROMPT, params("qwen-image"))[0]), pixels(fp8_reference))


def test_offload_hooks_wrap_the_cache_hooks(qwen_pipeline):
    """Block-level group offloading onloads a block in its hook: that hook must run before TeaCache's,
    which reads the first block's modulation weights (on a GPU they would still be on the CPU)."""
    expected = Omni(qwen_pipeline, quantization="fp8", dtype="fp32", cache_backend="tea_cache",
                    progress=False).generate(PROMPT, params("qwen-image"))[0]
    omni = Omni(qwen_pipeline, quantization="fp8", dtype="fp32", cache_backend="tea_cache", group_offload=True,
                progress=False)
    order = omni.pipeline.transformer.transformer_blocks[0]._diffusers_hook._hook_order
    assert order.index("omni_fp8_teacache_leader") < order.index("group_offloading")  # later = outer
    out = omni.generate(PROMPT, params("qwen-image"))[0]
    assert np.array_equal(pixels(out), pixels(expected))
    assert out.timings.steps_skipped == expected.timings.steps_skipped


@pytest.mark.parametrize("backend", ["tea_cache", "first_block_cache", "mag_cache"])
def test_compiled_blocks_under_a_cache_trace_whole(qwen_pipeline, fp8_reference, backend, monkeypatch):
    """With a cache, each block's own forward is compiled (fullgraph) and the cache's hooks run
    around it: diffusers' compile_repeated_blocks would also trace the hooks' Python decisions,
    which stop a fullgraph compile. Dynamo's eager backend checks the tracing (no graph break)
    without Inductor's minutes of CPU code generation; test_gpu.py compiles for real."""
    import functools

    import omni_fp8.runtime.pipeline as pipeline
    import torch

    torch._dynamo.reset()
    traced = []
    compile_ = functools.partial(torch.compile, backend=lambda gm, inputs: traced.append(gm) or gm.forward)
    monkeypatch.setattr(pipeline.torch, "compile", compile_)
    config = {"rel_l1_thresh": 0.5} if backend == "tea_cache" else None
    omni = Omni(qwen_pipeline, quantization="fp8", dtype="fp32", compile=True, cache_backend=backend,
                cache_config=config, progress=False)
    out = omni.generate(PROMPT, params("qwen-image"))[0]
    assert traced and omni.info()["compile"]
    assert out.timings.transformer_calls == 12 and np.isfinite(pixels(out)).all()
    torch._dynamo.reset()


def test_context_parallel_on_two_cpu_processes_matches_one(qwen_pipeline, zimage_pipeline, tmp_path):
    """Two ranks over Gloo (Ulysses attention), FP8 + TeaCache: the diffusers plan for Qwen-Image,
    ours for Z-Image, TeaCache's all-reduced decision: the same skipped steps, and the same images
    within 8/255 at most and 1.5/255 on average. Measured: Qwen-Image identical; Z-Image 4-5/255
    at most, 0.5-0.7/255 on average (unquantized, it is identical: FP8 rounding turns the last-bit
    differences of matrix products over half the rows into visible ones)."""
    cases = []
    for arch, path in (("qwen-image", qwen_pipeline), ("z-image", zimage_pipeline)):
        omni = {"quantization": "fp8", "dtype": "fp32", "cache_backend": "tea_cache",
                "cache_config": {"rel_l1_thresh": 0.5}}
        sample = {k: v for k, v in vars(params(arch)).items() if v is not None}
        cases.append({"folder": str(path), "omni": {**omni, "parallel": {"ulysses_degree": 2}}, "params": sample,
                      "prompt": PROMPT, "single": omni})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    worker = Path(__file__).with_name("parallel_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(worker),
                           str(tmp_path / "out.npz"), str(tmp_path / "cases.json"), "--cpu"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = np.load(tmp_path / "out.npz")
    for i, case in enumerate(cases):
        one = Omni(case["folder"], progress=False, **case["single"]).generate(PROMPT, OmniDiffusionSamplingParams(
            **case["params"]))[0]
        diff = np.abs(np.asarray(one.images[0]).astype(int) - results[f"image{i}"].astype(int))
        assert diff.max() <= 8 and diff.mean() <= 1.5, (diff.max(), diff.mean())
        assert int(results[f"skipped{i}"]) == one.timings.steps_skipped > 0


def test_ring_attention_needs_a_backend_with_log_sum_exp():
    import torch
    from omni_fp8.runtime.parallel import attention_backend, parse_parallel

    parallel = parse_parallel({"ring_degree": 2})
    assert attention_backend(parallel, torch.device("cuda")) == "_native_cudnn"
    assert attention_backend(parse_parallel({"ulysses_degree": 2}), torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="ring attention needs an attention backend that returns log-sum-exp"):
        attention_backend(parallel, torch.device("cpu"))


def test_ring_attention_refuses_batches_with_an_attention_mask(qwen_pipeline, zimage_pipeline):
    # diffusers' ring loop would apply each rank's mask slice to every rank's keys: refused, not wrong.
    from omni_fp8.runtime.parallel import guard_ring_masks

    qwen = Omni(qwen_pipeline, dtype="fp32", progress=False)
    guard_ring_masks(qwen.pipeline.transformer)
    qwen.generate(PROMPT, params("qwen-image"))  # one prompt, CFG as a second call: no mask
    with pytest.raises(ConfigError, match="ring attention cannot run this batch"):
        qwen.generate(["a cat", "a cat on a red windowsill at dawn"], params("qwen-image"))
    z_image = Omni(zimage_pipeline, dtype="fp32", progress=False)
    guard_ring_masks(z_image.pipeline.transformer)
    z_image.generate(PROMPT, params("z-image", guidance_scale=0.0))
    with pytest.raises(ConfigError, match="use ulysses_degree"):
        z_image.generate(PROMPT, params("z-image"))  # the CFG batch pads the shorter caption


# --- the command line ---------------------------------------------------------------------------

def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_writes_a_png_and_prints_timings(qwen_pipeline, tmp_path):
    from PIL import Image

    out = tmp_path / "cat.png"
    result = cli("text-to-image", "--model", qwen_pipeline, "--quantization", "fp8", "--ignored-layers", "img_mlp",
                 "--prompt", PROMPT, "--negative-prompt", " ", "--num-inference-steps", 4, "--height", 32,
                 "--width", 32, "--seed", 0, "--dtype", "fp32", "--cache-backend", "tea_cache", "--cache-config",
                 '{"rel_l1_thresh": 10}', "--output", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"wrote {out} (32x32, seed 0)"
    assert "QwenImagePipeline (fp8, tea_cache, cpu): load" in lines[1] and "4 steps" in lines[1]
    assert "2 skipped by tea_cache" in lines[1]
    assert Image.open(out).size == (32, 32) and not list(tmp_path.glob(".cat.png*"))
    again = cli("text-to-image", "--model", qwen_pipeline, "--prompt", PROMPT, "--output", out)
    assert again.exit_code == 1 and again.stderr.strip() == (
        f"error: {out}: already exists; pass --force to replace it, or choose another --output.")


def test_cli_json_several_prompts(zimage_pipeline, tmp_path):
    result = cli("text-to-image", "--model", zimage_pipeline, "--prompt", "a cat", "--prompt", "a dog",
                 "--num-images-per-prompt", 2, "--num-inference-steps", 3, "--height", 32, "--width", 32,
                 "--guidance-scale", 0, "--dtype", "fp32", "--output", tmp_path / "img.webp", "--fuse-blocks", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --json: no progress bars
    data = json.loads(result.stdout)
    assert data["pipeline"] == "ZImagePipeline" and data["quantization"] is None and data["dtype"] == "float32"
    assert data["fuse_blocks"] is True
    assert [o["paths"] for o in data["outputs"]] == [[str(tmp_path / "img-0.webp"), str(tmp_path / "img-1.webp")],
                                                     [str(tmp_path / "img-2.webp"), str(tmp_path / "img-3.webp")]]
    assert data["timings"]["steps"] == 3 and isinstance(data["seed"], int)
    assert all(Path(p).is_file() for o in data["outputs"] for p in o["paths"])


@pytest.mark.parametrize("args,fragment", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "a", "--cache-config", "{rel_l1_thresh: 1}"], "--cache-config is not valid JSON"),
    (["--prompt", "a", "--cache-backend", "sea_cache"], "cache_backend 'sea_cache' is not supported"),
    (["--prompt", "a", "--weight-block-size", "100,100"], "bad weight_block_size"),
    (["--prompt", "a", "--output", "cat.bmpx"], "unknown image type '.bmpx'"),
    (["--prompt", "a", "--ulysses-degree", "2"], "torchrun --nproc-per-node 2"),
    (["--prompt", "a", "--num-inference-steps", "0"], "num_inference_steps must be a whole number >= 1"),
    (["--prompt", "a", "--cuda-graphs", "--compile"], "does not combine with compile"),
])
def test_cli_bad_options_and_prompts_are_one_line_errors(qwen_pipeline, tmp_path, args, fragment, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("text-to-image", "--model", qwen_pipeline, *args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not list(tmp_path.iterdir())


def test_cli_usage_errors_exit_2(qwen_pipeline):
    assert cli("text-to-image", "--model", qwen_pipeline).exit_code == 2  # no --prompt
    both = cli("text-to-image", "--model", qwen_pipeline, "--prompt", "a", "--enable-cpu-offload",
               "--sequential-cpu-offload")
    assert both.exit_code == 2 and "give one" in both.stderr


def test_make_tiny_pipeline_script(tmp_path, monkeypatch):
    import runpy

    script = str(Path(__file__).parents[1] / "bench" / "make_tiny_pipeline.py")
    monkeypatch.setattr(sys, "argv", [script, str(tmp_path / "z"), "--arch", "z-image"])
    runpy.run_path(script, run_name="__main__")
    index = json.loads((tmp_path / "z" / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"} <= set(index)
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        runpy.run_path(script, run_name="__main__")


def test_import_omni_fp8_stays_light():
    code = ("import sys, omni_fp8; omni_fp8.Omni; omni_fp8.OmniDiffusionSamplingParams; "
            "assert not any(m == 'diffusers' or m.startswith(('diffusers.', 'transformers')) for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith(('diffusers', 'transformers')))[:5]; "
            "omni_fp8.TeaCacheConfig; assert 'diffusers.hooks' in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]



# --- the GPU benchmarks, smoke-run on the CPU with the tiny pipelines -----------------------------

BENCH = Path(__file__).parents[1] / "bench"


def test_pipeline_speed_bench_runs(tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["pipeline_speed.py", "--tiny", "--device", "cpu", "--model", "qwen-image",
                                      "--size", "32", "--steps", "3", "--repeat", "1", "--folder",
                                      str(tmp_path / "p"), "--out", str(tmp_path / "r.json")])
    monkeypatch.syspath_prepend(str(BENCH))
    runpy.run_path(str(BENCH / "pipeline_speed.py"), run_name="__main__")
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["variant"] for r in rows] == ["bf16", "fp8", "fp8+tea_cache"]
    assert rows[2]["steps_skipped"] is not None and "| fp8+tea_cache |" in capsys.readouterr().out


def test_context_parallel_bench_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           str(BENCH / "context_parallel.py"), "--tiny", "--device", "cpu", "--model", "z-image",
                           "--image-size", "32", "--image-steps", "3", "--size", "32", "--warmup", "1", "--repeat",
                           "1", "--folder", str(tmp_path / "z"), "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["variant"] for r in result["images"]] == ["bf16", "fp8", "fp8+tea_cache"]
    assert all(r["ok"] for r in result["images"] + result["steps"]) and len(result["steps"]) == 2
