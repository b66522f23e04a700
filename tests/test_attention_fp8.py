"""FP8 attention kernels of the speed lab (bench/fp8_attention.py) on the CPU: the reference, the
Triton kernel in Triton's interpreter, the speed bench.

Tolerances, and why:

* ``fp8_attention_reference`` against the quality lab's emulation: **identical** (one function);
* the kernel's algorithm (tests/attention_emulation.py: probabilities rounded unnormalised
  against the running maximum, as FlashAttention does) against the lab's (normalised
  probabilities rounded): not the same roundings, so compared by their error against exact
  attention, which must be no worse than the lab's (within 5%);
* the Triton kernel in the interpreter against that emulation, run with the interpreter's own
  E4M3 cast (Triton 3.6's interpreter rounds half up, can drop a binade on a carry, and truncates
  float32 -> BF16): FP8 codes and scales **identical**; outputs within one BF16 ulp of every
  element (the interpreter truncates the output to BF16; the float32 sums differ only in order,
  far below an ulp). On a GPU (tests/test_gpu_attention.py) the same comparison runs with torch's
  cast.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from attention_emulation import emulate_kernel, rel_l2  # puts bench/ on the path
from omni_fp8.converter.errors import ConfigError

import fp8_attention as fp8_attention_module
from fp8_attention import fp8_attention, fp8_attention_reference
from quality_lab import attention as lab


def qkv(b=2, lq=37, lk=37, h=2, d=64, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, lq, h, d, generator=g) * spread).bfloat16()
    k = (torch.randn(b, lk, h, d, generator=g) * spread).bfloat16()
    v = torch.randn(b, lk, h, d, generator=g).bfloat16()
    return q, k, v


def exact(q, k, v, mask=None):
    m = None if mask is None else mask[:, None, None, :]
    t = [x.float().transpose(1, 2) for x in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*t, attn_mask=m).transpose(1, 2)


# --- the reference ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["head", "tensor"])
def test_the_reference_is_the_lab_emulation(mode):
    q, k, v = qkv()
    mask = torch.rand(2, 37, generator=torch.Generator().manual_seed(1)) > 0.3
    ours = fp8_attention_reference(q, k, v, mask, mode)
    labs = lab.fp8_sdpa(mode)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask[:, None, None, :])
    assert torch.equal(ours, labs.transpose(1, 2))
    assert lab.quantize_qkv is fp8_attention_module.quantize_qkv  # one definition


@pytest.mark.parametrize("spread", [1.0, 2.5])
def test_the_kernels_rounding_is_as_good_as_the_labs(spread):
    """Rounding exp2(s - m) * 448 per block (the kernel) instead of the normalised probability
    (the lab): E4M3 is relative, so the error against exact attention is the same or smaller."""
    q, k, v = qkv(b=1, lq=1024, lk=1024, h=2, d=128, spread=spread)
    reference = exact(q, k, v)
    lab_error = rel_l2(fp8_attention_reference(q, k, v), reference)
    kernel_error = rel_l2(emulate_kernel(q, k, v, None, 128), reference)
    assert 0.02 < lab_error < 0.2
    assert kernel_error < 1.05 * lab_error, (kernel_error, lab_error)


def test_masks_and_their_shapes():
    q, k, v = qkv()
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 20:] = False
    out = fp8_attention(q, k, v, mask, backend="reference")
    assert torch.equal(out, fp8_attention(q, k, v, mask[:, None, None, :], backend="reference"))
    assert rel_l2(out, exact(q, k, v, mask)) < 0.1
    assert rel_l2(out[1], exact(q[1:], k[1:, :20], v[1:, :20])[0]) < 0.1  # masked keys are ignored
    assert out.dtype == torch.bfloat16 and out.shape == q.shape


@pytest.mark.parametrize("call,error,fragment", [
    (lambda q, k, v: fp8_attention(q, k, v, backend="triton"), ConfigError,
     "needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper or newer); got a cpu tensor"),
    (lambda q, k, v: fp8_attention(q, k, v, backend="flash"), ConfigError, "unknown FP8 attention backend 'flash'"),
    (lambda q, k, v: fp8_attention(q, k, v, torch.zeros(2, 37), backend="reference"), ValueError,
     "boolean key-padding mask"),
    (lambda q, k, v: fp8_attention(q, k, v, torch.ones(2, 1, 37, 37, dtype=torch.bool), backend="reference"),
     ValueError, "boolean key-padding mask"),
    (lambda q, k, v: fp8_attention(q, k[:, :, :1], v, backend="reference"), ValueError, "do not match"),
    (lambda q, k, v: fp8_attention(q.to(torch.int8), k, v, backend="reference"), ValueError, "one dtype"),
])
def test_bad_calls_are_refused_in_one_line(call, error, fragment):
    with pytest.raises(error) as info:
        call(*qkv())
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_compiles_as_one_op():
    q, k, v = qkv()
    compiled = torch.compile(lambda q, k, v: fp8_attention(q, k, v, backend="reference") * 2, fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(q, k, v), fp8_attention(q, k, v, backend="reference") * 2)


# --- the Triton kernel, in Triton's CPU interpreter --------------------------------------------

INTERPRETED = r"""
import numpy as np
import torch
import triton.language as tl
import triton.runtime.interpreter as interpreter

# NumPy >= 2.4 refuses int() of a one-element array, which Triton 3.6's interpreter uses for
# loop bounds read from scalar arguments; take the element instead.
_patch = interpreter._patch_lang_tensor
def _patched(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interpreter._patch_lang_tensor = _patched

from attention_emulation import emulate_kernel, interpreter_e4m3, kernel_codes
import fp8_attention as A

# The interpreter's tl.dot decodes E4M3 its own way: it must agree with torch on every code.
codes = np.arange(256, dtype=np.uint8)
finite = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().isfinite().numpy()
decoded = interpreter._convert_float(codes, tl.float8e4nv, tl.float16, None).view(np.float16).astype(np.float32)
assert np.array_equal(decoded[finite], torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()[finite])

g = torch.Generator().manual_seed(0)
for b, l, h, d, masked, block_m, block_n in [(1, 77, 2, 64, False, 32, 32), (2, 77, 2, 64, True, 64, 32),
                                             (1, 200, 2, 128, False, 32, 64), (2, 130, 2, 128, True, 32, 64),
                                             (2, 50, 3, 32, True, 32, 32)]:
    q = torch.randn(b, l, h, d, generator=g).bfloat16()
    k = (torch.randn(b, l, h, d, generator=g) * 2).bfloat16()
    v = torch.randn(b, l, h, d, generator=g).bfloat16()
    mask = None
    if masked:
        mask = torch.rand(b, l, generator=g) > 0.3
        mask[:, :block_n + 3] = False  # a whole block of keys masked, the first
    qc, kc, vt, amax = A.triton_prepare(q, k, v)
    assert qc.shape == (b * h, 128 * -(-l // 128), d) and vt.shape == (b * h, d, 128 * -(-l // 128))
    for t, c, transposed in ((q, qc, False), (k, kc, False), (v, vt, True)):
        expected, scale = kernel_codes(t, interpreter_e4m3)
        got = (c.float().transpose(1, 2) if transposed else c.float())
        assert torch.equal(got[:, :l].reshape(b, h, l, d), expected), (b, l, h, d, "codes")
        assert (got[:, l:] == 0).all()
    assert torch.equal(A.fp8_scale(amax).reshape(3, b, h), torch.stack(
        [kernel_codes(t, interpreter_e4m3)[1].reshape(b, h) for t in (q, k, v)]))
    out = torch.empty_like(q)
    A.triton_attention_prepared(qc, kc, vt, amax, l, mask, out, d ** -0.5, {"BLOCK_M": block_m, "BLOCK_N": block_n})
    expected = emulate_kernel(q, k, v, mask, block_n, interpreter_e4m3)
    assert ((out.float() - expected).abs() <= expected.abs() * 2.0 ** -7 + 1e-6).all(), (b, l, h, d, masked)
    # the per-tensor codes cuDNN gets
    per_tensor = torch.zeros(1)
    codes_k = A.quantize_heads(k, per_tensor, l, transpose=False, per_tensor=True)
    scale = A.fp8_scale(k.float().abs().amax())
    assert torch.equal(per_tensor[0], k.float().abs().amax())
    assert torch.equal(codes_k.float(), interpreter_e4m3((k.float() / scale).clamp(-448, 448)).transpose(1, 2).reshape(b * h, l, d))
print("ok")
"""


def test_triton_kernel_in_the_interpreter():
    """Indexing, padding, masks, per-head scales and the online softmax of the real kernel,
    run by Triton's CPU interpreter against the kernel's algorithm (module docstring)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed (CPU-only install)")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "TRITON_INTERPRET": "1",
                               "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# --- the speed bench ---------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's refusal; the GPU run is the bench itself")
def test_the_speed_bench_runs_and_survives_failing_backends(monkeypatch, capsys):
    """bench/attention_speed.py on the CPU at a toy shape: BF16 SDPA rows are timed and scored,
    the FP8 backends (GPU only) fail with their one-line reason and the table still prints."""
    import attention_speed  # bench/, on the path above

    monkeypatch.setitem(attention_speed.SHAPES, "toy", (1, 24, 8, 3, 2, 64))
    args = argparse.Namespace(warmup=1, repeat=2, inner=1, traceback=False)
    result = attention_speed.run_shape("toy", args)
    rows = result["rows"]
    assert rows["sdpa-bf16 (default)"]["rel_l2"] < 1e-2 and result["best_bf16_ms"] > 0
    assert "needs a CUDA GPU with FP8" in rows["fp8 triton (total)"]["error"]
    assert "variant" in capsys.readouterr().out
