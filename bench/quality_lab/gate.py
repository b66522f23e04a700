"""The quality gate: does a quantized lab DiT still draw what the BF16 one draws?

Every variant samples the same fixed evaluation set (seed/class pairs, Euler steps) as the BF16
lab model and is scored against those BF16 images: PSNR, SSIM, the lab perceptual distance, and
FID/KID in the lab CNN's feature space. FP8 variants run through ``Fp8Linear``'s CPU path, which
quantizes weights and activations exactly as the GPU does.

Controls prove the gate can tell good from bad: FP32 compute of the same weights sets the noise
floor; E5M2 (2 mantissa bits) in weights and activations, and 4-bit weights, are the deliberately
bad quantizations that must fail; per-tensor and block FP8 W8A8 must pass. ``THRESHOLDS`` were
set between the measured controls (bench/RESULTS.md has the measurements).

    python bench/quality_lab/gate.py                  # every control and policy, a table
    python bench/quality_lab/gate.py --samples 256 --steps 20 --json out.json
    python bench/quality_lab/gate.py --static         # static activation scales: calibrated on other
                                                      # seeds and classes, per policy and statistic

Static rows calibrate on a set the gate never scores: seeds ``CALIBRATION_SEEDS`` drawing only
the even classes, every sampling step recorded (``record_inputs``), then ``calibrate`` with each
statistic; the images are scored on the usual evaluation set (other seeds, every class).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality_lab import lab  # noqa: E402

# Set from the measured controls (bench/RESULTS.md, "Quality lab"): between the worst passing FP8
# variant and the best failing control, with the noise floor far inside.
THRESHOLDS = {"perceptual": 0.025, "psnr": 34.0, "fid": 0.5}

# Layer policies compared on the lab model (patterns as omni-convert takes them).
POLICIES = {
    "all Linears": {"preset": "none"},
    "vllm-omni (modulation, embedders, norm_out, proj_out in BF16)": {
        "preset": "none",
        "ignored_layers": ["img_mod", "txt_mod", "img_in", "txt_in", "time_text_embed", "norm_out", "proj_out"],
    },
    "skip img_mlp": {"preset": "none", "ignored_layers": ["img_mlp"]},
    "embedders and output layers": {
        "preset": "none", "ignored_layers": ["img_in", "txt_in", "time_text_embed", "norm_out", "proj_out"]},
    "qwen-image preset (img_mlp, embedders, output layers)": {"preset": "qwen-image"},
}


# Static calibration: seeds and classes apart from the evaluation set's (seeds 1000.., every class).
CALIBRATION_SEEDS = range(5000, 5032)
CALIBRATION_CLASSES = (0, 2, 4, 6, 8)
STATISTICS = ("max", "p99.99", "p99.9")


def calibration_calls(reference: nn.Module, text: lab.ClassTokens, steps: int,
                      device: torch.device | str = "cpu") -> list[dict]:
    """The reference model's inputs at every step of sampling the calibration set."""
    from omni_fp8 import record_inputs

    seeds = list(CALIBRATION_SEEDS)
    labels = torch.tensor([CALIBRATION_CLASSES[i % len(CALIBRATION_CLASSES)] for i in range(len(seeds))])
    with torch.no_grad():
        cond = text(labels)
    with record_inputs(reference) as calls:
        lab.sample(reference, cond.detach(), seeds, steps=steps, device=device)
    return calls


def static_variants(reference: nn.Module, text: lab.ClassTokens, steps: int, policies: dict[str, dict],
                    statistics: tuple[str, ...] = STATISTICS) -> dict[str, tuple[nn.Module, torch.dtype]]:
    """Every policy with static activation scales, per statistic, calibrated on the calibration set."""
    from omni_fp8 import calibrate, quantize_

    calls = calibration_calls(reference, text, steps)
    out = {}
    for statistic in statistics:
        scales = calibrate(reference, calls, statistic=statistic, progress=False)
        for name, config in policies.items():
            static = {**config, "activation_scheme": "static", "calibration": scales}
            out[f"static {statistic}: {name}"] = (quantize_(copy.deepcopy(reference), static), torch.bfloat16)
    return out


def load_dit(dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    from omni_fp8 import load_transformer

    return load_transformer(lab.DIT_DIR, dtype=dtype, progress=False)


class FakeQuantLinear(nn.Module):
    """A deliberately bad quantization, for the gate's negative controls.

    ``e5m2``: weights and per-token activations through float8_e5m2 (2 mantissa bits) with
    per-tensor / per-token scales; ``int4``: weights rounded to 4-bit integers per output channel.
    """

    def __init__(self, linear: nn.Linear, kind: str) -> None:
        super().__init__()
        self.kind, self.bias = kind, linear.bias
        w = linear.weight.detach().float()
        # Scales floored like the FP8 contract's, so an all-zero weight or row stays zero, not NaN.
        if kind == "e5m2":
            s = (w.abs().amax() / 57344.0).clamp_min(2.0**-126)
            self.weight = (w / s).to(torch.float8_e5m2).float() * s
        elif kind == "int4":
            s = (w.abs().amax(dim=1, keepdim=True) / 7).clamp_min(2.0**-126)
            self.weight = (w / s).round().clamp(-8, 7) * s
        else:
            raise ValueError(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.kind == "e5m2":
            s = x32.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 57344.0
            x32 = (x32 / s).to(torch.float8_e5m2).float() * s
        y = x32 @ self.weight.t()
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)


def fake_quantize_(model: nn.Module, kind: str) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            model.set_submodule(name, FakeQuantLinear(module, kind))
    return model


def variants(reference: nn.Module) -> dict[str, tuple[nn.Module, torch.dtype]]:
    """The controls and the FP8 schemes, each a model and the compute dtype it samples in."""
    from omni_fp8 import quantize_

    return {
        "fp32 (noise floor)": (load_dit(torch.float32), torch.float32),
        "fp8 per-tensor W8A8": (quantize_(copy.deepcopy(reference), {"preset": "none"}), torch.bfloat16),
        "fp8 block 128x128 W8A8": (
            quantize_(copy.deepcopy(reference), {"preset": "none", "weight_block_size": [128, 128]}), torch.bfloat16),
        "e5m2 W8A8 (bad control)": (fake_quantize_(copy.deepcopy(reference), "e5m2"), torch.bfloat16),
        "int4 weights (bad control)": (fake_quantize_(copy.deepcopy(reference), "int4"), torch.bfloat16),
    }


def score(images: torch.Tensor, reference: torch.Tensor, cnn: lab.LabCNN) -> dict[str, float | None]:
    ea, eb = lab.embeddings(cnn, images), lab.embeddings(cnn, reference)
    return {
        "psnr": lab.psnr(images, reference),
        "ssim": lab.ssim(images, reference),
        "perceptual": lab.perceptual(cnn, images, reference),
        "fid": lab.fid(ea, eb),
        "kid": lab.kid(ea, eb),
    }


def passes(metrics: dict[str, float | None]) -> bool:
    return (metrics["perceptual"] <= THRESHOLDS["perceptual"] and metrics["psnr"] >= THRESHOLDS["psnr"]
            and metrics["fid"] <= THRESHOLDS["fid"])


class EvaluationSet:
    """The fixed seed/class pairs, the BF16 lab model and its images: what every variant is scored on."""

    def __init__(self, samples: int, steps: int) -> None:
        torch.manual_seed(0)
        self.steps = steps
        self.cnn = lab.load_cnn()
        self.text = lab.load_class_tokens()
        self.seeds, labels = lab.seeds_and_labels(samples)
        with torch.no_grad():
            self.cond = self.text(labels)
        self.model = load_dit()
        start = time.perf_counter()
        self.images = lab.sample(self.model, self.cond, self.seeds, steps=steps)
        self.seconds = time.perf_counter() - start

    def measure(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict:
        """``model``'s samples of the set, scored against the BF16 images, with the gate's verdict."""
        start = time.perf_counter()
        images = lab.sample(model, self.cond, self.seeds, steps=self.steps, dtype=dtype)
        metrics = score(images, self.images, self.cnn)
        metrics["passes"] = passes(metrics)
        metrics["seconds"] = time.perf_counter() - start
        metrics["weight_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return metrics


def run(samples: int, steps: int, with_policies: bool = True, with_static: bool = False,
        policy_filter: str | None = None, statistics: tuple[str, ...] = STATISTICS) -> dict[str, dict]:
    evaluation = EvaluationSet(samples, steps)
    reference_model, text = evaluation.model, evaluation.text
    results = {"bf16 (reference)": {"seconds": evaluation.seconds}}
    todo = variants(reference_model)
    if with_policies:
        from omni_fp8 import load_inputs, quantize_, suggest

        policies = dict(POLICIES)
        # The default bound (0.065) keeps nothing on this model: all Linears already pass. A
        # stricter bound shows what the tool picks first.
        report = suggest(reference_model, load_inputs(lab.DIT_DIR / "sample_inputs.safetensors"), max_error=0.03,
                         progress=False)
        policies[f"omni-convert suggest --max-error 0.03 ({', '.join(report.ignored_layers)} in BF16)"] = {
            "preset": "none", "ignored_layers": report.ignored_layers}
        results["suggest report"] = report.to_dict()
        if policy_filter:
            policies = {k: v for k, v in policies.items() if policy_filter in k}
        for name, config in policies.items():
            todo[f"policy: {name}"] = (quantize_(copy.deepcopy(reference_model), config), torch.bfloat16)
        if with_static:
            todo.update(static_variants(reference_model, text, steps, policies, statistics))
    for name, (model, dtype) in todo.items():
        results[name] = evaluation.measure(model, dtype)
    results["bf16 (reference)"]["weight_bytes"] = sum(
        t.numel() * t.element_size() for t in reference_model.state_dict().values())
    return results


def table(results: dict[str, dict]) -> str:
    width = max(62, *(len(n) for n in results))
    lines = [f"{'variant':<{width}} {'PSNR':>6} {'SSIM':>6} {'percept':>8} {'FID':>7} {'KID':>8} {'weights':>9} {'gate':>5}"]
    for name, m in results.items():
        if name == "suggest report":
            continue
        if "psnr" not in m:
            lines.append(f"{name:<{width}} {'':>6} {'':>6} {'':>8} {'':>7} {'':>8} {m['weight_bytes'] / 1e6:>6.2f} MB {'':>5}")
            continue
        ssim = f"{m['ssim']:.4f}" if m["ssim"] is not None else "-"
        lines.append(f"{name:<{width}} {m['psnr']:>6.2f} {ssim:>6} {m['perceptual']:>8.4f} {m['fid']:>7.3f} {m['kid']:>8.5f} "
                     f"{m['weight_bytes'] / 1e6:>6.2f} MB {'pass' if m['passes'] else 'FAIL':>5}")
    lines.append(f"gate: perceptual <= {THRESHOLDS['perceptual']}, PSNR >= {THRESHOLDS['psnr']} dB, FID <= {THRESHOLDS['fid']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-policies", action="store_true")
    parser.add_argument("--static", action="store_true", help="Add static-activation rows for every policy.")
    parser.add_argument("--policies", help="Only the policies whose name contains this text.")
    parser.add_argument("--statistics", default=",".join(STATISTICS), help="Calibration statistics for --static.")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    results = run(a.samples, a.steps, with_policies=not a.no_policies, with_static=a.static,
                  policy_filter=a.policies, statistics=tuple(a.statistics.split(",")))
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
