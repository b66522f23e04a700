"""bench/profile_step.py on the CPU: the smoke mode end to end, and the kernel-name rules the GPU run uses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import profile_step  # noqa: E402


@pytest.mark.parametrize("model", ["qwen-image", "z-image"])
def test_profile_step_smoke_on_cpu(tmp_path, model, capsys):
    out = tmp_path / "profile.json"
    profile_step.main(["--tiny", "--device", "cpu", "--model", model, "--blocks", "2", "--variant", "bf16",
                       "--variant", "fused-tensor", "--mode", "eager", "--repeat", "1", "--profile-repeat", "1",
                       "--json", str(out)])
    result = json.loads(out.read_text())[0]
    assert [(r["variant"], r["mode"]) for r in result["runs"]] == [("bf16", "eager"), ("fused-tensor", "eager")]
    for run in result["runs"]:
        assert set(run["categories"]) == set(profile_step.CATEGORIES)
        assert run["kernel_ms"] == pytest.approx(sum(run["categories"].values()))
        # found in the profiled blocks (the full-depth figure extrapolates two CPU timings, whose
        # difference a busy machine can make negative)
        with_blocks = run["measured"]["with"]["categories"]
        assert with_blocks["gemm"] > 0 and with_blocks["attention"] > 0
        assert any("scaled_dot_product" in op for op in run["sdpa_ops"])  # the backend that ran, by name
        assert run["depth"] == (60 if model == "qwen-image" else 30) and run["blocks"] == 2
        measured = run["measured"]
        # scaled to full depth: outside + (with - outside) * depth / blocks
        w, o = measured["with"]["categories"]["gemm"], measured["outside"]["categories"]["gemm"]
        assert run["categories"]["gemm"] == pytest.approx(o + (w - o) * run["depth"] / 2)
    assert "ms per pass" in capsys.readouterr().out


@pytest.mark.parametrize("kernel,label,category", [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", None, "gemm"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", None, "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", None, "gemm"),
    ("_quantize_rows", "linear", "fp8 quant"),
    ("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_eq_gelu_0", None, "fp8 quant"),
    ("_fp8_weight_gemv", "linear", "fp8 gemv"),
    ("_modulate_rows", None, "modulation"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", None, "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", None, "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", None, "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::complex<float>>>", None, "rope"),
    ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", "rope", "rope"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", None, "norm"),
    ("void at::native::reduce_kernel<512, 1, MeanOps<float>>", "norm", "norm"),
    ("triton_per_fused_add_mean_mul_pow_rsqrt_1", None, "norm"),
    ("triton_poi_fused_mul_stack_sub_2", None, "rope"),
    ("triton_poi_fused_cat_3", None, "copies"),
    ("triton_poi_fused_add_mul_4", None, "modulation"),
    ("void at::native::CatArrayBatchedCopy<at::native::OpaqueType<2u>, unsigned int, 4, 64, 64>", None, "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", None, "modulation"),
    ("void at::native::vectorized_elementwise_kernel<4, MulFunctor<float>>", "modulation", "modulation"),
    # static FP8 under torch.compile: the producer writes the codes; Inductor names it after the GEMM it feeds
    ("triton_poi_fused__scaled_mm__to_copy_clamp_div_mul_silu_t_view_6", None, "fp8 quant"),
    ("triton_red_fused__scaled_mm__to_copy_add_clamp_div_mean_mul_pow_rsqrt_split_t_tanh_unsqueeze_view_5", None,
     "fp8 quant"),
    # QK-norm and RoPE, named after the attention they feed
    ("triton_red_fused__scaled_dot_product_cudnn_attention__to_copy_add_mean_mul_permute_pow_rsqrt_select_2", None,
     "norm"),
    ("_qk_norm_rope", None, "norm"),
])
def test_kernel_names_fall_in_their_category(kernel, label, category):
    assert profile_step.classify(kernel, label) == category
