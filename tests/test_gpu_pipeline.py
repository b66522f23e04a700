"""``Omni`` on GPUs: FP8 kernels end to end, compilation, offloading, context parallelism on 2 GPUs.

Skipped without a CUDA GPU (CI has none); the two-GPU tests skip with fewer than two. The
pipelines are the tiny ones of ``test_pipeline.py`` (conftest fixtures), run in BF16 on the GPU.
The bounds are generous first bounds (these tests had not run on a GPU when written): what they
guard is that every path runs, uses the FP8 kernels and stays near the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omni_fp8 import Omni, OmniDiffusionSamplingParams
from omni_fp8.runtime import kernels
from conftest import count_calls
from test_pipeline import PROMPT
from test_pipeline import params as pipeline_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_fp8 = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.device_has_fp8("cuda")), reason="needs a GPU with FP8 GEMMs"
)
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 GPUs")

def params(arch: str, **overrides) -> OmniDiffusionSamplingParams:
    return pipeline_params(arch, **{"height": 64, "width": 64, **overrides})


def image(out) -> np.ndarray:
    return np.asarray(out.images[0]).astype(np.int64)


@pytest.fixture
def emulated(monkeypatch):
    """How many FP8 Linear calls fell back to the emulation (must stay 0 on an FP8 GPU)."""
    return count_calls(monkeypatch, kernels, "_emulated")


@needs_fp8
@pytest.mark.parametrize("arch", ["qwen-image", "z-image"])
def test_omni_runs_the_fp8_kernels_end_to_end(arch, pipeline_folder, emulated):
    bf16 = image(Omni(pipeline_folder(arch), device="cuda", progress=False).generate(PROMPT, params(arch))[0])
    omni = Omni(pipeline_folder(arch), quantization="fp8", device="cuda", cache_backend="tea_cache",
                cache_config={"rel_l1_thresh": 0}, progress=False)
    out = omni.generate(PROMPT, params(arch))[0]
    assert emulated["n"] == 0
    assert out.timings.steps == 6 and out.timings.denoise_s > 0
    assert np.abs(image(out) - bf16).mean() <= 4  # 8-bit levels; FP8 against BF16
    on_cpu = Omni(pipeline_folder(arch), quantization="fp8", device="cpu", progress=False)
    cpu = image(on_cpu.generate(PROMPT, params(arch))[0])
    assert np.abs(image(out) - cpu).mean() <= 4  # the CPU emulation and the GPU kernels


@needs_fp8
@pytest.mark.parametrize("arch", ["qwen-image", "z-image"])
@pytest.mark.parametrize("cache", [None, "tea_cache", "first_block_cache"])
@pytest.mark.parametrize("mode,tolerance", [("compile", 3), ("cuda_graphs", 0)])  # graphs replay eager exactly
def test_compiled_and_graphed_pipelines_match_eager(arch, cache, mode, tolerance, pipeline_folder, emulated):
    if cache == "first_block_cache" and arch == "z-image":
        pytest.skip("diffusers' caches do not serve Z-Image")
    kwargs = {"quantization": "fp8", "device": "cuda", "progress": False, "cache_backend": cache,
              "cache_config": {"rel_l1_thresh": 0.5} if cache == "tea_cache" else None}
    eager = Omni(pipeline_folder(arch), **kwargs).generate(PROMPT, params(arch))[0]
    torch._dynamo.reset()
    fast = Omni(pipeline_folder(arch), **{mode: True}, **kwargs)
    for _ in range(2):
        out = fast.generate(PROMPT, params(arch))[0]
        assert np.abs(image(out) - image(eager)).mean() <= tolerance
        assert out.timings.steps_skipped == eager.timings.steps_skipped
    assert emulated["n"] == 0


@needs_fp8
@pytest.mark.parametrize("kwargs", [{"enable_cpu_offload": True}, {"enable_cpu_offload": "sequential"},
                                    {"group_offload": True}, {"group_offload": {"offload_type": "leaf_level",
                                                                                "use_stream": True}}])
@pytest.mark.parametrize("cache", [None, "tea_cache"])
def test_offloaded_pipelines_on_the_gpu(qwen_pipeline, kwargs, cache, emulated):
    # With a cache, the offload hooks must bring a block to the GPU before the cache's hook reads
    # its weights (TeaCache runs the first block's modulation): Omni puts them outermost.
    common = {"quantization": "fp8", "device": "cuda", "progress": False, "cache_backend": cache,
              "cache_config": {"rel_l1_thresh": 0.5} if cache else None}
    expected = Omni(qwen_pipeline, **common).generate(PROMPT, params("qwen-image"))[0]
    omni = Omni(qwen_pipeline, **common, **kwargs)
    for _ in range(2):
        assert np.abs(image(omni.generate(PROMPT, params("qwen-image"))[0]) - image(expected)).max() <= 1
    assert emulated["n"] == 0


def _two_gpu_run(tmp_path: Path, cases: list[dict]) -> dict:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    worker = Path(__file__).with_name("parallel_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(worker),
                           str(tmp_path / "out.npz"), str(tmp_path / "cases.json")],
                          capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(tmp_path / "out.npz"))


@needs_fp8
@two_gpus
@pytest.mark.parametrize("parallel", [{"ulysses_degree": 2}, {"ring_degree": 2}])
def test_two_gpus_give_the_images_of_one(qwen_pipeline, zimage_pipeline, tmp_path, parallel):
    """FP8 + TeaCache split over two GPUs: the same skipped steps, images within 16/255 at most
    and 2/255 on average of one GPU's. (Ring: one prompt without a CFG batch, see guard_ring_masks.)"""
    cases = []
    for arch, path in (("qwen-image", qwen_pipeline), ("z-image", zimage_pipeline)):
        sample = {k: v for k, v in vars(params(arch)).items() if v is not None}
        if "ring_degree" in parallel and arch == "z-image":
            sample["guidance_scale"] = 0.0  # Z-Image's CFG batch carries an attention mask
        single = {"quantization": "fp8", "cache_backend": "tea_cache", "cache_config": {"rel_l1_thresh": 0.5}}
        cases.append({"folder": str(path), "omni": {**single, "parallel": parallel}, "params": sample,
                      "prompt": PROMPT, "single": single})
    results = _two_gpu_run(tmp_path, cases)
    for i, case in enumerate(cases):
        one = Omni(case["folder"], device="cuda", progress=False, **case["single"]).generate(
            PROMPT, OmniDiffusionSamplingParams(**case["params"]))[0]
        diff = np.abs(image(one) - results[f"image{i}"].astype(np.int64))
        assert diff.max() <= 16 and diff.mean() <= 2, (case["folder"], diff.max(), diff.mean())
        assert int(results[f"skipped{i}"]) == one.timings.steps_skipped


@two_gpus
def test_cli_under_torchrun_writes_one_image(qwen_pipeline, tmp_path):
    out = tmp_path / "cat.png"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "omni_fp8.runtime.cli", "text-to-image", "--model", str(qwen_pipeline), "--quantization",
                           "fp8", "--ulysses-degree", "2", "--prompt", PROMPT, "--num-inference-steps", "4",
                           "--height", "64", "--width", "64", "--seed", "0", "--output", str(out), "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(proc.stdout)  # rank 0 alone prints
    assert data["parallel"]["ulysses_degree"] == 2 and data["outputs"][0]["paths"] == [str(out)]
    assert out.is_file() and not list(tmp_path.glob(".cat.png*"))
