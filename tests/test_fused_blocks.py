"""``fuse_blocks_`` on the CPU: the fused processors against diffusers' own, both families.

Tolerances, and why:

* eager, BF16 or FP8 (emulated): **bit-identical**. The fused processor runs the same operations
  on the same values (RoPE is the same complex multiplication, the casts into the joint buffer
  are the casts ``type_as`` did, FP8 parts keep their codes and their scale on every row); only
  the projections' GEMMs are wider, and a wider GEMM sums each output element over K in the same
  order on the CPU;
* RoPE's real form (used under ``torch.compile``) against the complex one: the same two float32
  products and one sum or difference per element; an FMA may merge a product and the sum (GPUs
  do), so the bound is a few float32 ulps of the largest term, far below one BF16 ulp;
* compiled, BF16: fused against unfused compiled, **bit-identical** on the CPU (Inductor emits the
  same arithmetic for both RoPE forms here);
* compiled, FP8: within 2% relative L2. Inductor fuses the activation quantization into its
  producer differently when one GEMM instead of three reads the activation (float32 or
  BF16-rounded input), and an FP8 rounding that flips then moves the output; the FP8-vs-BF16
  error of these tiny models is about 5%, so 2% is "the same FP8 result", not a bug's size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from omni_fp8 import Fp8Config, Fp8Linear, fuse_blocks_, quantize_, unfuse_blocks_
from omni_fp8.converter.demo import tiny_qwen_image, tiny_z_image
from omni_fp8.converter.errors import ConfigError
from omni_fp8.runtime.fused_blocks import (
    FusedQwenImageAttnProcessor,
    FusedZImageAttnProcessor,
    _Modulate,
    _rope_complex,
    _rope_real,
    _Stacked,
)


def inputs(name: str, model: nn.Module, seed: int = 0, batch: int = 1) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if name == "qwen-image":
        return (), {
            "hidden_states": torch.randn(batch, 16, cfg.in_channels, generator=g).bfloat16(),
            "encoder_hidden_states": torch.randn(batch, 7, cfg.joint_attention_dim, generator=g).bfloat16(),
            "encoder_hidden_states_mask": torch.ones(batch, 7, dtype=torch.bool),
            "timestep": torch.full((batch,), 0.6).bfloat16(),
            "img_shapes": [[(1, 4, 4)]] * batch,
            "return_dict": False,
        }
    latents = [torch.randn(cfg.in_channels, 1, 8, 8, generator=g).bfloat16() for _ in range(batch)]
    caps = [torch.randn(7 + i, cfg.cap_feat_dim, generator=g).bfloat16() for i in range(batch)]
    return (latents, torch.full((batch,), 0.6).bfloat16(), caps), {"return_dict": False}


def run(model: nn.Module, args_: tuple, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args_, **kwargs)[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out


def build(name: str, scheme: str) -> nn.Module:
    model = (tiny_qwen_image if name == "qwen-image" else tiny_z_image)(seed=3).to(torch.bfloat16)
    if scheme == "tensor":
        quantize_(model, Fp8Config(preset="none"))
    elif scheme in ("channel", "block32", "block128"):  # the attention's Linears: what fusing changes
        for module_name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and (".attn." in module_name or ".attention." in module_name):
                block = {"block32": (32, 32), "block128": (128, 128)}.get(scheme)
                model.set_submodule(module_name, Fp8Linear.from_linear(module, block, per_channel=scheme == "channel"))
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v).clone() for k, v in model.state_dict().items()}


FAMILIES = [("qwen-image", FusedQwenImageAttnProcessor), ("z-image", FusedZImageAttnProcessor)]


@pytest.mark.parametrize("name,processor", FAMILIES)
@pytest.mark.parametrize("scheme", ["bf16", "tensor", "channel", "block32", "block128"])
def test_fused_eager_is_bit_identical_and_unfuses_exactly(name, processor, scheme):
    model = build(name, scheme)
    args_, kwargs = inputs(name, model)
    reference, before = run(model, args_, kwargs), state(model)
    assert fuse_blocks_(model) is model
    attentions = [m for m in model.modules() if hasattr(m, "to_qkv")]
    assert attentions and all(type(a.processor) is processor for a in attentions)
    assert not any(hasattr(a, "to_q") for a in attentions)
    fused = attentions[0].to_qkv
    if scheme == "bf16":
        assert type(fused) is nn.Linear and fused.out_features == 3 * attentions[0].to_out[0].in_features
    elif scheme == "block128":  # 64- and 96-row parts do not end on a 128-row block: kept apart
        assert isinstance(fused, _Stacked)
    else:
        assert isinstance(fused, Fp8Linear) and fused.scheme == ("fp8_block" if scheme == "block32" else "fp8_channel")
    if name == "qwen-image":  # the one-kernel modulation (CUDA only: here diffusers' _modulate runs)
        modulations = [b.__dict__.get("_modulate") for b in model.transformer_blocks]
        assert all(isinstance(m, _Modulate) for m in modulations)
        assert all(m.quantize == (scheme in ("tensor", "channel")) for m in modulations)
    assert torch.equal(run(model, args_, kwargs), reference)
    fuse_blocks_(model)  # a second call changes nothing
    assert torch.equal(run(model, args_, kwargs), reference)

    unfuse_blocks_(model)
    assert not any("_modulate" in m.__dict__ for m in model.modules())
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(type(a.processor).__name__ != processor.__name__ for a in model.modules() if hasattr(a, "processor"))
    assert torch.equal(run(model, args_, kwargs), reference)


@pytest.mark.parametrize("name", ["qwen-image", "z-image"])
def test_fused_batch_of_two(name):
    """Two images: the joint output's slices are not contiguous and the masks differ per sample."""
    model = build(name, "tensor")
    args_, kwargs = inputs(name, model, batch=2)
    reference = run(model, args_, kwargs)
    fuse_blocks_(model)
    assert torch.equal(run(model, args_, kwargs), reference)


@pytest.mark.parametrize("name", ["qwen-image", "z-image"])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_static_parts_fuse_with_their_one_input_scale(name, strategy):
    """q/k/v read one input, so calibration gives them one input scale: the fused layer keeps it (no
    modulation codes, which are per token); parts whose scales differ stay apart."""
    from omni_fp8 import calibrate, record_inputs

    model = build(name, "bf16")
    args_, kwargs = inputs(name, model)
    with record_inputs(model) as calls:
        run(model, args_, kwargs)
    quantize_(model, {"preset": "none", "weight_strategy": strategy, "activation_scheme": "static",
                      "calibration": calibrate(model, calls, progress=False)})
    reference, before = run(model, args_, kwargs), state(model)
    fuse_blocks_(model)
    fused = [m.to_qkv for m in model.modules() if hasattr(m, "to_qkv")]
    assert fused and all(isinstance(f, Fp8Linear) and f.static for f in fused)
    if name == "qwen-image":
        assert not any(b.__dict__["_modulate"].quantize for b in model.transformer_blocks)
    assert torch.equal(run(model, args_, kwargs), reference)
    unfuse_blocks_(model)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())

    attn = next(m for m in model.modules() if hasattr(m, "to_q"))
    with torch.no_grad():
        attn.to_k.input_scale.mul_(2)  # another tool's checkpoint may calibrate parts apart
    reference = run(model, args_, kwargs)
    fuse_blocks_(model)
    assert isinstance(attn.to_qkv, _Stacked) and torch.equal(run(model, args_, kwargs), reference)


def test_mixed_precision_parts_stay_apart_with_the_same_result():
    """A preset that kept to_v in BF16: the three cannot share a layer, the result is the same."""
    model = build("qwen-image", "bf16")
    for i, block in enumerate(model.transformer_blocks):
        for part in ("to_q", "to_k"):
            setattr(block.attn, part, Fp8Linear.from_linear(getattr(block.attn, part)))
    args_, kwargs = inputs("qwen-image", model)
    reference, before = run(model, args_, kwargs), state(model)
    fuse_blocks_(model)
    assert isinstance(model.transformer_blocks[0].attn.to_qkv, _Stacked)
    assert type(model.transformer_blocks[0].attn.to_added_qkv) is nn.Linear
    assert torch.equal(run(model, args_, kwargs), reference)
    unfuse_blocks_(model)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())


def test_real_rope_matches_the_complex_one():
    torch.manual_seed(0)
    x = (torch.randn(2, 300, 4, 128) * 3).bfloat16()
    angles = torch.randn(300, 64) * 50
    freqs = torch.polar(torch.ones_like(angles), angles).unsqueeze(1)
    real, complex_ = _rope_real(x, torch.view_as_real(freqs)), _rope_complex(x, freqs)
    bound = 4 * torch.finfo(torch.float32).eps * x.float().abs().max()  # a few ulps: FMA vs two roundings
    assert (real - complex_).abs().max() <= bound
    assert torch.equal(real.bfloat16(), complex_.bfloat16())


@pytest.mark.parametrize("scheme", ["bf16", "tensor"])
def test_fused_compiles_fullgraph(scheme):
    """``compile_repeated_blocks(fullgraph=True)``: no graph break in the fused processor, no complex op."""
    import warnings

    outputs = []
    for fuse in (False, True):
        torch._dynamo.reset()
        model = build("qwen-image", scheme)
        args_, kwargs = inputs("qwen-image", model)
        kwargs["encoder_hidden_states_mask"] = None  # the processors alone (fusing drops a full mask: its own test)
        if fuse:
            fuse_blocks_(model)
        model.compile_repeated_blocks(fullgraph=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs.append(run(model, args_, kwargs))
        if fuse:
            assert not [w for w in caught if "complex" in str(w.message)]
    torch._dynamo.reset()
    unfused, fused = outputs
    if scheme == "bf16":
        assert torch.equal(fused, unfused)
    else:
        assert ((fused.float() - unfused.float()).norm() / unfused.float().norm()).item() < 0.02


def test_a_text_mask_that_masks_nothing_is_dropped_once_per_mask():
    """Qwen-Image's all-True text mask becomes None before the model runs (SDPA's fast kernel):
    exactly the fused model without a mask, and within BF16 rounding of the unfused model with
    the mask (SDPA takes another kernel); the mask is read from the device once per tensor and
    version; a mask with padding is kept; unfusing removes the hook."""
    from omni_fp8.runtime.fused_blocks import _MASK_HOOK

    def close(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2

    model = build("qwen-image", "bf16")
    args_, kwargs = inputs("qwen-image", model, batch=2)
    full = kwargs["encoder_hidden_states_mask"]
    padded = full.clone()
    padded[1, 5:] = False
    masked = run(model, args_, kwargs)
    masked_padded = run(model, args_, {**kwargs, "encoder_hidden_states_mask": padded})
    fuse_blocks_(model)
    fuse_blocks_(model)  # again: one hook
    dropper = model._forward_pre_hooks[model.__dict__[_MASK_HOOK].id]
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("encoder_hidden_states_mask")),
                                    with_kwargs=True)
    unmasked = run(model, args_, {**kwargs, "encoder_hidden_states_mask": None})
    assert close(unmasked, masked)
    for _ in range(3):
        assert torch.equal(run(model, args_, kwargs), unmasked)
    assert dropper.reads == 1 and seen[1:] == [None] * 3
    assert close(run(model, args_, {**kwargs, "encoder_hidden_states_mask": padded}), masked_padded)
    assert dropper.reads == 2 and seen[-1] is padded
    with torch.no_grad():
        padded[1, 5:] = True  # written in place: read again, now full
    assert torch.equal(run(model, args_, {**kwargs, "encoder_hidden_states_mask": padded}), unmasked)
    assert dropper.reads == 3 and seen[-1] is None
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "encoder_hidden_states",
                                                         "encoder_hidden_states_mask")}
    assert torch.equal(run(model, (kwargs["hidden_states"], kwargs["encoder_hidden_states"], full), rest), unmasked)
    unfuse_blocks_(model)
    assert _MASK_HOOK not in model.__dict__ and len(model._forward_pre_hooks) == 1  # the test's own
    run(model, args_, kwargs)
    assert seen[-1] is full


def test_refuses_lora_adapters_before_changing_anything():
    from peft import LoraConfig

    model = build("qwen-image", "bf16")
    model.add_adapter(LoraConfig(r=4, target_modules=["to_k"]))
    with pytest.raises(ConfigError, match=r"transformer_blocks\.0\.attn\.to_k carries LoRA adapters; fuse them"):
        fuse_blocks_(model)
    assert all(hasattr(b.attn, "to_q") and not hasattr(b.attn, "to_qkv") for b in model.transformer_blocks)


def test_refuses_models_without_these_attentions():
    with pytest.raises(ConfigError, match="fuse_blocks_: Sequential has no Qwen-Image or Z-Image attention"):
        fuse_blocks_(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="takes a diffusers transformer"):
        fuse_blocks_("transformer")  # type: ignore[arg-type]


def test_keeps_the_attention_backend_and_parallel_config():
    model = build("z-image", "bf16")
    attn = model.layers[0].attention
    attn.processor._attention_backend, attn.processor._parallel_config = "native", "config"
    fuse_blocks_(model)
    assert (attn.processor._attention_backend, attn.processor._parallel_config) == ("native", "config")
    unfuse_blocks_(model)
    assert (attn.processor._attention_backend, attn.processor._parallel_config) == ("native", "config")


INTERPRETED_MODULATE = r"""
import torch
from omni_fp8.runtime.triton_kernels import modulate_cuda

def truncated(t):  # Triton 3.6's interpreter stores float32 as BF16 by truncation, not rounding
    return (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32)


torch.manual_seed(0)
for b, rows, k in [(1, 37, 96), (2, 5, 3072), (2, 1, 64)]:
    x = torch.randn(b, rows, k).bfloat16()
    mod = (torch.randn(b, 6 * k) * 0.5).bfloat16()[:, : 3 * k]  # chunk views: row stride 6k
    shift, scale, _ = mod.chunk(3, dim=-1)
    y, q, s = modulate_cuda(x, shift, scale, True)
    # x * (1 + scale) rounded to BF16 in the kernel's integer arithmetic (torch's rounding), then
    # + shift stored by the interpreter (truncated)
    expected = truncated((x * (1 + scale[:, None])).float() + shift.float()[:, None])
    assert torch.equal(y.float(), expected), (b, rows, k)
    amax = y.float().abs().amax(-1, keepdim=True).reshape(-1, 1)
    assert torch.equal(s, torch.where(amax == 0, 1.0, torch.clamp(amax / 448, min=2.0 ** -126))), (b, rows, k)
    assert q.shape == (b * rows, k) and s.shape == (b * rows, 1)
print("ok")
"""


def test_modulate_kernel_in_the_triton_interpreter():
    """The kernel's indexing (rows per sample, the modulation's row stride, masking past K) and
    its scales, run by Triton's CPU interpreter. The kernel rounds its product to BF16 with integer
    arithmetic, which the interpreter runs exactly; the interpreter's own casts are not the GPU's
    (BF16 stores truncated, E4M3 off by a binade), so the reference truncates the final store and
    the FP8 codes are left to
    tests/test_gpu_fused_blocks.py, which checks every bit against torch."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed (CPU-only install)")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_MODULATE], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def diffusers_qk(x: torch.Tensor, norm: nn.Module, freqs: torch.Tensor) -> torch.Tensor:
    """What diffusers computes for a query or key: its RMSNorm module, then RoPE as complex
    multiplication (``freqs`` broadcast against ``[..., D/2]``); float32, before the BF16 cast."""
    y = norm(x)
    return torch.view_as_real(torch.view_as_complex(y.float().reshape(*y.shape[:-1], -1, 2)) * freqs).flatten(-2)


INTERPRETED_QK_NORM_ROPE = r"""
import sys
import torch
from diffusers.models.normalization import RMSNorm
from omni_fp8.runtime.triton_kernels import qk_norm_rope_cuda
sys.path.insert(0, "tests")
from test_fused_blocks import diffusers_qk as reference

def truncated(t):  # Triton 3.6's interpreter stores float32 as BF16 by truncation, not rounding
    return (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32)

torch.manual_seed(0)
b, h, d = 2, 3, 32
with torch.no_grad():
    # Qwen-Image: a text and an image stream, views of fused projections (row stride 3*h*d),
    # frequencies per position, the value copied into the joint buffer too
    seqs = [5, 7]
    parts = [torch.randn(b, s, 3 * h * d).bfloat16().split(h * d, dim=-1) for s in seqs]
    q, k, v = ([p[i].unflatten(-1, (h, d)) for p in parts] for i in range(3))
    norms = [RMSNorm(d, eps=1e-6).bfloat16() for _ in range(4)]
    for n in norms:
        n.weight.copy_(1 + 0.3 * torch.randn(d))
    freqs = [torch.polar(torch.ones(s, d // 2), torch.randn(s, d // 2)) for s in seqs]
    out = qk_norm_rope_cuda(q, k, v, [norms[0].weight, norms[2].weight], [norms[1].weight, norms[3].weight],
                            [torch.view_as_real(f) for f in freqs], 1e-6)
    assert [t.shape for t in out] == [(b, 12, h, d)] * 3
    for got, which in zip(out[:2], (0, 1)):
        expected = torch.cat([reference((q, k)[which][i], norms[2 * i + which], freqs[i][:, None]) for i in range(2)], 1)
        assert torch.equal(got.float(), truncated(expected)), which
    assert torch.equal(out[2], torch.cat(v, 1))
    # Z-Image: one stream, frequencies per batch item and position, no value
    q, k = torch.randn(b, 9, h, d).bfloat16(), torch.randn(b, 9, h, d).bfloat16()
    f = torch.polar(torch.ones(b, 9, d // 2), torch.randn(b, 9, d // 2))
    out = qk_norm_rope_cuda([q], [k], [], [norms[0].weight], [norms[1].weight], [torch.view_as_real(f)], 1e-6)
    assert len(out) == 2
    assert torch.equal(out[0].float(), truncated(reference(q, norms[0], f[:, :, None])))
    assert torch.equal(out[1].float(), truncated(reference(k, norms[1], f[:, :, None])))
print("ok")
"""


def test_qk_norm_rope_kernel_in_the_triton_interpreter():
    """The QK-norm/RoPE kernel's indexing (two streams into one joint buffer at their offsets,
    strided views of a fused projection, heads padded to a power of two, per-batch frequencies)
    and its roundings, against diffusers' RMSNorm and complex RoPE, run by Triton's CPU
    interpreter: every value equal once the interpreter's truncating BF16 store is applied to the
    reference. On the GPU, tests/test_gpu_fused_blocks.py compares it with torch there."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed (CPU-only install)")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_QK_NORM_ROPE], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


INTERPRETED_PROCESSORS = r"""
import sys
import torch
sys.path.insert(0, "tests")
from test_fused_blocks import build, inputs, run
from omni_fp8 import fuse_blocks_
from omni_fp8.runtime import fused_blocks, triton_kernels

# The kernel's own conditions want a CUDA tensor; the interpreter runs it on these CPU ones.
calls = []
fused_blocks.qk_norm_rope_supports = lambda *args: True
real = fused_blocks.qk_norm_rope_cuda
fused_blocks.qk_norm_rope_cuda = lambda *args: calls.append(1) or real(*args)
for name in ("qwen-image", "z-image"):
    model = build(name, "bf16")
    args_, kwargs = inputs(name, model, batch=2)
    unfused = run(model, args_, kwargs)
    fuse_blocks_(model)
    calls.clear()
    fused = run(model, args_, kwargs)
    attentions = sum(1 for m in model.modules() if hasattr(m, "to_qkv"))
    assert len(calls) == attentions, (name, len(calls), attentions)
    error = ((fused.float() - unfused.float()).norm() / unfused.float().norm()).item()
    assert error < 1e-2, (name, error)  # the interpreter stores BF16 truncated: a step off, now and then
print("ok")
"""


def test_fused_processors_hand_the_kernel_their_streams_in_the_triton_interpreter():
    """The processors' side of the QK kernel (which stream's q, k, v, norm weights, eps and
    frequencies go where, text before image, a batch of two) on the CPU: the kernel run by
    Triton's interpreter inside both fused models gives the unfused models' outputs."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed (CPU-only install)")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_PROCESSORS], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_qk_norm_rope_kernel_is_not_used_where_it_does_not_apply():
    """On the CPU, with autograd, without RoPE or with a norm that is not diffusers' RMSNorm the
    processors compute the norms and RoPE as diffusers does (the GPU kernel is not asked)."""
    from diffusers.models.normalization import RMSNorm

    from omni_fp8.runtime import fused_blocks

    q = torch.randn(1, 4, 2, 32, dtype=torch.bfloat16)
    norm = RMSNorm(32, eps=1e-6).bfloat16()
    freqs = torch.polar(torch.ones(4, 16), torch.randn(4, 16))
    with torch.no_grad():
        assert fused_blocks._qk_norm_rope([(q, q, q, norm, norm, freqs)], with_v=True) is None  # CPU
        assert fused_blocks._qk_norm_rope([(q, q, q, norm, norm, None)], with_v=True) is None
        assert fused_blocks._qk_norm_rope([(q, q, q, nn.LayerNorm(32), norm, freqs)], with_v=True) is None


def test_saving_a_fused_fp8_model_is_refused_until_unfused(tmp_path):
    model = build("qwen-image", "tensor")
    fuse_blocks_(model)
    with pytest.raises(ConfigError, match=r"transformer_blocks\.0\.attn\.to_qkv is a fused projection .*unfuse_blocks_"):
        model.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    unfuse_blocks_(model)
    model.save_pretrained(tmp_path / "unfused")
    assert (tmp_path / "unfused" / "fp8_manifest.json").exists()


def test_refuses_a_model_with_offloading_hooks():
    """Hooks set up before fusing would never move the fused layers: refused before any change."""
    model = build("qwen-image", "bf16")
    model.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(ConfigError, match=r"has offloading hooks \(group_offloading\); call fuse_blocks_ before"):
        fuse_blocks_(model)
    assert all(hasattr(b.attn, "to_q") for b in model.transformer_blocks)
