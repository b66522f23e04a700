"""The deep lab DiT: how FP8 damage grows over 24 blocks, and which layers a 60-block model must keep.

The 4-block lab DiT (``lab.py``) cannot show errors compounding over depth, yet the ``qwen-image``
preset keeps every ``img_mlp`` (the largest GEMMs) in BF16 because of compounding over 60 blocks.
This lab model is the same family (diffusers ``QwenImageTransformer2DModel``, 4 heads x 32 = width
128, the same tokens, class tokens and rectified flow) with 24 blocks, trained on a GPU in a few
minutes with fixed seeds. ``evaluate`` samples the lab's fixed evaluation set with every layer
policy and scores it against this model's own BF16 samples with the lab's metrics and gate
(``gate.THRESHOLDS``), and measures how the error of the hidden states grows block by block.
Policies ``f+attn-*`` add FP8 attention, emulated as ``attention.py`` does (no per-block study for
them: it runs the BF16 reference in the same process, which the emulation would patch too).

    python bench/quality_lab/deep.py all --out OUT/deeplab --train-seconds 210 --deadline 420   # H200
    python bench/quality_lab/deep.py train --out DIR --steps 3000
    python bench/quality_lab/deep.py evaluate --out DIR               # scores DIR/model again
    python bench/quality_lab/deep.py all --out /tmp/deep --blocks 4 --steps 20 --batch 16 --samples 16  # CPU smoke run
    python bench/quality_lab/deep.py evaluate --out DIR --static --policies a,a-s,a-s99,f,f-s,b-s   # static rows only

``--static`` adds the static-activation policies (``-s``: calibrated with the running max,
``-s99``: the per-call 99.99th percentile), calibrated on seeds and classes the gate never scores
(``gate.calibration_calls``); ``--policies`` scores only the policies with those keys (and no
controls or ``suggest``), so a run can add rows without repeating the others.

Writes into ``--out``: ``model/`` (the BF16 diffusers folder in shards of at most 15 MB, and
``class_tokens.safetensors``), ``deep.json`` (rewritten after every part, ``"complete": true``
only at the end) and ``deep.txt`` (the tables). Width 128 keeps 128x128 weight blocks meaningful
(every block Linear is a whole number of blocks, so a Hopper GPU runs them as real block-scaled
GEMMs) at 28 MB of BF16 weights; rather than committed, the model is reproduced by this script
(fixed seeds; the step count it trained is in ``deep.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality_lab import attention, gate, lab  # noqa: E402

# The input embedders, the timestep embedder and the output layers (the ``f`` policy).
EMBEDDERS = ["img_in", "txt_in", "time_text_embed", "norm_out", "proj_out"]
# Qwen-Image at 1024x1024: 4096 image tokens (a 128x128 latent in 2x2 patches), 256 text tokens;
# the modulation, timestep and norm_out Linears see one row per image.
REAL_IMAGE_TOKENS, REAL_TEXT_TOKENS = 4096, 256
_IMAGE_STREAM = re.compile(r"^(img_in|proj_out)$|\.img_mlp\.|\.attn\.(to_q|to_k|to_v|to_out)\b")
_TEXT_STREAM = re.compile(r"^txt_in$|\.txt_mlp\.|\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)\b")


_START = time.perf_counter()


def log(*parts: object) -> None:
    print(f"[{time.perf_counter() - _START:6.1f} s]", *parts, flush=True)


# ---- the policies ----

@dataclass(frozen=True)
class Policy:
    """A layer policy: what stays BF16 (for a model of any depth) and the weight scale layout."""

    key: str
    name: str
    kept: Callable[[int], list[str]] = lambda blocks: []
    preset: str = "none"
    block_size: tuple[int, int] | None = None
    per_channel: bool = False
    fast_accum: bool = False  # Fp8Linear.fast_accum: cuBLASLt's faster, less exact accumulation (GPU only)
    attention: str | None = None  # FP8 attention emulated (attention.py's modes: tensor, head, sage)
    static: str | None = None  # the calibration statistic, for static activations

    def config(self, blocks: int) -> dict[str, Any]:
        config: dict[str, Any] = {"preset": self.preset, "ignored_layers": self.kept(blocks)}
        if self.block_size:
            config["weight_block_size"] = list(self.block_size)
        if self.per_channel:
            config["weight_strategy"] = "channel"
        if self.static:  # the calibration itself is added where the policy is applied
            config["activation_scheme"] = "static"
        return config


def edge_blocks(blocks: int, k: int) -> list[int]:
    return sorted(set(range(min(k, blocks))) | set(range(max(0, blocks - k), blocks)))


def img_mlp_at_edges(k: int) -> Callable[[int], list[str]]:
    def kept(blocks: int) -> list[str]:
        ids = "|".join(str(i) for i in edge_blocks(blocks, k))
        return [*EMBEDDERS, rf"re:^transformer_blocks\.({ids})\.img_mlp\."]
    return kept


def scaled_groups(groups: Sequence[str], from_blocks: int) -> Callable[[int], list[str]]:
    """Groups ``suggest`` kept on a ``from_blocks`` model, for a model of another depth: block ``i``
    stands for the blocks at the same relative depth."""
    def kept(blocks: int) -> list[str]:
        out: list[str] = []
        for group in groups:
            parts = group.split(".")
            if len(parts) == 3 and parts[1].isdigit():
                i = int(parts[1])
                lo = i * blocks // from_blocks
                hi = max(lo + 1, (i + 1) * blocks // from_blocks)
                out += [f"{parts[0]}.{j}.{parts[2]}" for j in range(lo, hi)]
            else:
                out.append(group)
        return list(dict.fromkeys(out))
    return kept


POLICIES = [
    Policy("a", "every Linear, per-tensor"),
    Policy("b", "every Linear, per-channel weight scales", per_channel=True),
    Policy("c", "every Linear, 128x128 blocks", block_size=(128, 128)),
    Policy("d", "img_mlp in every block + embedders/outputs (the qwen-image preset)",
           lambda blocks: ["img_mlp", *EMBEDDERS]),
    Policy("e2", "img_mlp in the first/last 2 blocks + embedders/outputs", img_mlp_at_edges(2)),
    Policy("e4", "img_mlp in the first/last 4 blocks + embedders/outputs", img_mlp_at_edges(4)),
    Policy("f", "embedders and output layers", lambda blocks: list(EMBEDDERS)),
    Policy("f+b", "embedders and output layers, per-channel scales", lambda blocks: list(EMBEDDERS), per_channel=True),
    Policy("f+c", "embedders and output layers, 128x128 blocks", lambda blocks: list(EMBEDDERS), block_size=(128, 128)),
    Policy("a+fast", "every Linear, per-tensor, fast accumulation", fast_accum=True),
    Policy("f+fast", "embedders and output layers, fast accumulation", lambda blocks: list(EMBEDDERS), fast_accum=True),
    Policy("f+b+fast", "embedders and output layers, per-channel scales, fast accumulation",
           lambda blocks: list(EMBEDDERS), per_channel=True, fast_accum=True),
    *(Policy(f"f+attn-{mode}", f"embedders and output layers, FP8 attention ({mode} scales, emulated)",
             lambda blocks: list(EMBEDDERS), attention=mode) for mode in ("tensor", "head", "sage")),
]
# Static activation scales (``--static``), calibrated on gate.calibration_calls.
STATIC_POLICIES = [
    Policy("a-s", "every Linear, per-tensor, static activations (max)", static="max"),
    Policy("a-s99", "every Linear, per-tensor, static activations (p99.99)", static="p99.99"),
    Policy("b-s", "every Linear, per-channel weight scales, static activations (max)", per_channel=True, static="max"),
    Policy("f-s", "embedders and output layers, static activations (max)", lambda blocks: list(EMBEDDERS),
           static="max"),
    Policy("f-s+fast", "embedders and output layers, static activations (max), fast accumulation",
           lambda blocks: list(EMBEDDERS), static="max", fast_accum=True),
]
CONTROLS = ["fp32 (noise floor)", "e5m2 W8A8 (bad control)", "int4 weights (bad control)"]


def quantize_policy(model: nn.Module, policy: Policy, blocks: int, calibration: Any = None) -> nn.Module:
    """``model`` with ``policy`` applied, in place, as a user would: ``quantize_`` with its config (a
    static policy's ``calibration``, a ``Calibration`` of its statistic, included), then ``fast_accum``
    set on every FP8 layer where the policy asks for it."""
    from omni_fp8 import Fp8Linear, quantize_

    config = policy.config(blocks)
    if policy.static:
        config["calibration"] = calibration
    model = quantize_(model, config)
    if policy.fast_accum:
        for layer in model.modules():
            if isinstance(layer, Fp8Linear):
                layer.fast_accum = True
    return model


# ---- what a policy means at Qwen-Image's real size ----

def real_rows(name: str) -> int:
    """Rows a Linear multiplies per image in Qwen-Image at 1024x1024."""
    if _IMAGE_STREAM.search(name):
        return REAL_IMAGE_TOKENS
    if _TEXT_STREAM.search(name):
        return REAL_TEXT_TOKENS
    return 1


class RealModel:
    """Qwen-Image's transformer on the meta device: its Linear shapes, for FLOP and byte counts."""

    def __init__(self) -> None:
        from omni_fp8.converter.plan import meta_model

        self.model = meta_model("QwenImageTransformer2DModel", {})
        self.blocks = len(self.model.transformer_blocks)
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def stats(self, policy: Policy) -> dict[str, Any]:
        from omni_fp8 import Fp8Config
        from omni_fp8.converter.plan import decide_linears

        plan = decide_linears(self.model, Fp8Config.coerce(policy.config(self.blocks)))
        flops = fp8_flops = 0
        weight_bytes = 0.0
        linear_params = 0
        for name, (n, k) in plan.shapes.items():
            macs = real_rows(name) * n * k
            flops += macs
            linear_params += n * k
            if plan.decisions[name].quantized:
                fp8_flops += macs
                weight_bytes += n * k
            else:
                weight_bytes += 2 * n * k
        weight_bytes += 2 * (self.parameters - linear_params)  # biases, norms: BF16 in every policy
        kept = [n for n, d in plan.decisions.items() if not d.quantized]
        return {"fp8_flops_fraction": fp8_flops / flops, "weight_gb": weight_bytes / 1e9, "kept_linears": len(kept),
                "linears": len(plan.shapes)}


# ---- training ----

def build(blocks: int, heads: int, seed: int) -> nn.Module:
    """A fresh lab DiT with DiT's adaLN-Zero start (modulation and output layers zero), so that
    every block begins as the identity and 24 blocks train stably from the first step."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**lab.dit_config(blocks, heads))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (name.endswith(("img_mod.1", "txt_mod.1"))
                                                  or name in ("norm_out.linear", "proj_out")):
                module.weight.zero_()
                module.bias.zero_()
    return model


@dataclass
class TrainOptions:
    blocks: int = 24
    heads: int = 4
    steps: int = 3000
    batch: int = 512
    lr: float = 1e-3
    ema: float = 0.999
    seed: int = 0
    train_seconds: float | None = None


def train(opts: TrainOptions, device: torch.device, data: tuple[torch.Tensor, torch.Tensor] | None = None,
          ) -> tuple[nn.Module, lab.ClassTokens, dict[str, Any]]:
    """Rectified flow as ``train.py`` trains the 4-block model, at GPU batch sizes: AdamW, FP32
    master weights (BF16 autocast on a GPU), warm-up then cosine decay, gradient clipping 1.0,
    an EMA of the weights (what is returned). With ``train_seconds``, the step count is cut after
    30 steps to what fits (the count used is returned: pass it as ``--steps`` to reproduce)."""
    deterministic = device.type == "cuda"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(opts, device, data)
    finally:
        if deterministic:
            torch.use_deterministic_algorithms(False)


def _train(opts: TrainOptions, device: torch.device, data: tuple[torch.Tensor, torch.Tensor] | None,
           ) -> tuple[nn.Module, lab.ClassTokens, dict[str, Any]]:
    x, y = data if data is not None else lab.fashion_mnist("train")
    images = lab.to_tokens(x).to(device)
    labels = y.to(device)
    model = build(opts.blocks, opts.heads, opts.seed).to(device).train()
    torch.manual_seed(opts.seed + 1)
    tokens = lab.ClassTokens().to(device)
    params = list(model.parameters()) + list(tokens.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    log(f"deep lab DiT: {opts.blocks} blocks x width {32 * opts.heads}, {n_params / 1e6:.2f}M parameters "
        f"({2 * n_params / 1e6:.1f} MB in BF16), batch {opts.batch}, on {device}")
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))
    plan = {"total": opts.steps}

    def lr_factor(step: int) -> float:
        warm = max(1, round(0.05 * plan["total"]))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, plan["total"] - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator(device=device).manual_seed(opts.seed + 2)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    curve: list[list[float]] = []
    window = torch.zeros((), device=device)
    window_steps = 0
    start = time.perf_counter()
    mark: tuple[int, float] | None = None
    step = 0
    stopped_early = False
    while step < plan["total"]:
        idx = torch.randint(0, len(images), (opts.batch,), device=device, generator=gen)
        clean = images[idx]
        noise = torch.randn(clean.shape, device=device, generator=gen)
        t = torch.sigmoid(torch.randn(opts.batch, device=device, generator=gen))  # logit-normal timesteps
        noisy = (1 - t)[:, None, None] * clean + t[:, None, None] * noise
        with autocast:
            v = lab.velocity(model, noisy, t, tokens(labels[idx]))
        loss = F.mse_loss(v.float(), noise - clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        with torch.no_grad():
            decay = min(opts.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        window += loss.detach()
        window_steps += 1
        if step == 10 or (step == 30 and mark is not None):
            sync()
            now = time.perf_counter() - start
            if step == 10:
                mark = (step, now)
                log(f"step 10: {now:.1f} s so far (first steps include warm-up)")
            else:
                rate = (now - mark[1]) / (step - mark[0])
                log(f"s/step: {rate * 1000:.1f} ms (steps 10-30); {plan['total']} steps take about "
                    f"{rate * plan['total'] / 60:.1f} min")
                if opts.train_seconds:
                    fit = max(step + 1, int(mark[0] + (opts.train_seconds - mark[1]) / rate))
                    if fit < plan["total"]:
                        plan["total"] = fit
                        log(f"--train-seconds {opts.train_seconds:g}: training {fit} steps instead")
        if step % 100 == 0 or step == plan["total"]:
            mean = float(window) / window_steps
            if not math.isfinite(mean):
                raise FloatingPointError(f"training diverged at step {step} (loss {mean}); lower --lr")
            elapsed = time.perf_counter() - start
            curve.append([step, round(mean, 5)])
            log(f"step {step}/{plan['total']}: loss {mean:.4f} (mean of the last {window_steps}), {elapsed:.0f} s")
            window.zero_()
            window_steps = 0
            if opts.train_seconds and elapsed > 1.25 * opts.train_seconds and step < plan["total"]:
                stopped_early = True
                log(f"stopping at step {step}: {elapsed:.0f} s is past --train-seconds")
                break
    sync()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    model.eval()
    tokens.eval()
    info = {
        "blocks": opts.blocks, "width": 32 * opts.heads, "parameters": n_params, "batch": opts.batch, "lr": opts.lr,
        "ema": opts.ema, "seed": opts.seed, "steps": step, "steps_asked": opts.steps, "stopped_early": stopped_early,
        "seconds": seconds, "s_per_step": seconds / max(1, step), "loss_curve": curve, "device": str(device),
    }
    return model, tokens, info


def save(model: nn.Module, tokens: lab.ClassTokens, folder: Path) -> None:
    from safetensors.torch import save_file

    copy.deepcopy(model).to(device="cpu", dtype=torch.bfloat16).save_pretrained(
        folder, safe_serialization=True, max_shard_size="15MB")  # 15 MB files: easy to copy off a GPU machine
    save_file({"table": tokens.table.detach().float().cpu().contiguous()}, folder / "class_tokens.safetensors")


def load(folder: Path, device: torch.device) -> tuple[nn.Module, lab.ClassTokens]:
    from omni_fp8 import load_transformer

    model = load_transformer(folder, dtype=torch.bfloat16, device=device, progress=False)
    return model.eval(), lab.load_class_tokens(folder / "class_tokens.safetensors")


# ---- evaluation ----

class Results:
    """``deep.json``, rewritten (atomically) after every part, so a run cut short keeps what it measured."""

    def __init__(self, folder: Path | None, data: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.data: dict[str, Any] = data if data is not None else {}
        self.data.setdefault("complete", False)
        self.data.setdefault("errors", {})

    def write(self) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "deep.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.folder / "deep.json")
        try:
            text = report(self.data)
        except Exception as e:  # noqa: BLE001 - the JSON holds the figures; the tables are a view
            text = f"(tables unavailable: {type(e).__name__}: {e})"
        (self.folder / "deep.txt").write_text(text + "\n")

    def fail(self, part: str, error: BaseException) -> None:
        log(f"{part}: FAILED ({type(error).__name__}: {error})")
        self.data["errors"][part] = "".join(traceback.format_exception(error))[-4000:]
        self.write()


class Deadline:
    def __init__(self, seconds: float | None, start: float) -> None:
        self.seconds, self.start = seconds, start

    def passed(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds


def weight_bytes(model: nn.Module) -> int | None:
    """Bytes of the state dict; None for the fake-quantized controls, whose weights are no tensors of it."""
    if any(isinstance(m, gate.FakeQuantLinear) for m in model.modules()):
        return None
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def fp8_layers(model: nn.Module) -> dict[str, int]:
    """How many Linears are FP8, and how many of those run a real FP8 GEMM here (the rest emulate)."""
    from omni_fp8 import Fp8Linear

    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    return {"fp8_linears": len(layers), "fp8_gemm_linears": sum(m._gemm_fn is not None for m in layers)}


@torch.no_grad()
def outputs(model: nn.Module, calls: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    return [model(**{**call, "return_dict": False})[0].float() for call in calls]


def relative_error(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """Mean relative L2 distance, as ``omni-convert suggest`` measures it."""
    return float(sum(float((o - r).norm() / r.norm()) for o, r in zip(out, ref)) / len(ref))


@torch.no_grad()
def record_calls(model: nn.Module, tokens: lab.ClassTokens, device: torch.device, samples: int = 16,
                 ) -> list[dict[str, Any]]:
    """Transformer inputs of a sampling run (``samples`` images, every other of 10 steps), as
    ``train.py`` records 16 for the 4-block model: what ``suggest`` and the per-block study replay."""
    from omni_fp8 import record_inputs

    seeds, labels = lab.seeds_and_labels(samples)
    with record_inputs(model) as calls:
        lab.sample(model, tokens(labels), seeds, steps=10, device=device)
    return calls[::2]


@torch.no_grad()
def block_trace(model: nn.Module, call: dict[str, Any], keep_inputs: bool) -> tuple[list, list[torch.Tensor], torch.Tensor]:
    """One forward: each block's keyword inputs (if asked), each block's image hidden states out, the output."""
    inputs: list[dict[str, Any]] = []
    hidden: list[torch.Tensor] = []
    handles = []
    for block in model.transformer_blocks:
        if keep_inputs:
            handles.append(block.register_forward_pre_hook(lambda m, a, kw: inputs.append(dict(kw)), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, out: hidden.append(out[1].float())))
    try:
        out = model(**{**call, "return_dict": False})[0].float()
    finally:
        for h in handles:
            h.remove()
    return inputs, hidden, out


@torch.no_grad()
def per_block(reference: nn.Module, model: nn.Module, traces: list) -> dict[str, Any]:
    """Relative L2 error of the image hidden states after each block, FP8 against BF16.

    ``compound``: the FP8 model run end to end (block i sees the FP8 blocks before it: this is also
    the error of a prefix of i + 1 blocks). ``local``: block i alone in FP8, fed the BF16 model's
    own inputs to it. If errors only added up, ``compound`` would stay near the running sum of
    ``local``; above it, the blocks amplify what they are given.
    """
    blocks = len(reference.transformer_blocks)
    compound = [0.0] * blocks
    local = [0.0] * blocks
    final = 0.0
    for call, (inputs, ref_hidden, ref_out) in traces:
        _, hidden, out = block_trace(model, call, keep_inputs=False)
        for i in range(blocks):
            norm = ref_hidden[i].norm()
            compound[i] += float((hidden[i] - ref_hidden[i]).norm() / norm)
            alone = model.transformer_blocks[i](**inputs[i])[1].float()
            local[i] += float((alone - ref_hidden[i]).norm() / norm)
        final += float((out - ref_out).norm() / ref_out.norm())
    n = len(traces)
    compound = [c / n for c in compound]
    local = [v / n for v in local]
    return {
        "compound": compound, "local": local, "output": final / n,
        "local_sum": sum(local), "local_rss": math.sqrt(sum(v * v for v in local)),
        "amplification": compound[-1] / max(1e-12, sum(local)),
    }


def controls(reference: nn.Module) -> dict[str, tuple[Callable[[], nn.Module], torch.dtype]]:
    return {
        "fp32 (noise floor)": (lambda: copy.deepcopy(reference).float(), torch.float32),
        "e5m2 W8A8 (bad control)": (lambda: gate.fake_quantize_(copy.deepcopy(reference), "e5m2"), torch.bfloat16),
        "int4 weights (bad control)": (lambda: gate.fake_quantize_(copy.deepcopy(reference), "int4"), torch.bfloat16),
    }


def evaluate(reference: nn.Module, tokens: lab.ClassTokens, *, device: torch.device, samples: int = 256,
             sample_steps: int = 20, record_samples: int = 16, results: Results | None = None,
             deadline: Deadline | None = None, with_suggest: bool = True, with_static: bool = False,
             only: Sequence[str] | None = None) -> dict[str, Any]:
    """Every policy and control on ``reference`` (a BF16 lab DiT on ``device``), scored against its
    own BF16 samples; the per-block error growth; ``suggest``'s pick. Each part is caught and
    reported on its own, so one failing part costs only itself. ``only``: the policy keys to score
    (all by default); the controls are always scored, as the gate's scale."""
    from omni_fp8.converter.options import DEFAULT_MAX_ERROR

    results = results or Results(None)
    deadline = deadline or Deadline(None, 0.0)
    data = results.data
    blocks = len(reference.transformer_blocks)
    reference = reference.to(device=device, dtype=torch.bfloat16).eval()
    tokens = tokens.to("cpu").eval()
    cnn = lab.load_cnn()
    seeds, labels = lab.seeds_and_labels(samples)
    with torch.no_grad():
        cond = tokens(labels)
    data["evaluation"] = {"samples": samples, "sample_steps": sample_steps, "record_samples": record_samples,
                          "blocks": blocks, "device": str(device), "thresholds": gate.THRESHOLDS}
    policies: dict[str, dict[str, Any]] = data.setdefault("policies", {})

    start = time.perf_counter()
    ref_images = lab.sample(reference, cond, seeds, steps=sample_steps, device=device)
    data["bf16"] = {"seconds": time.perf_counter() - start, "weight_bytes": weight_bytes(reference),
                    "class_accuracy": lab.class_accuracy(cnn, ref_images, labels)}
    log(f"BF16 reference: {samples} samples in {data['bf16']['seconds']:.1f} s; the lab CNN sees the asked class in "
        f"{100 * data['bf16']['class_accuracy']:.0f}% of them")
    try:  # the committed 4-block model on the same pairs, for scale
        four = gate.load_dit().to(device)
        data["bf16"]["lab4_class_accuracy"] = lab.class_accuracy(
            cnn, lab.sample(four, lab.load_class_tokens()(labels).detach(), seeds, steps=sample_steps, device=device), labels)
        del four
    except Exception as e:  # noqa: BLE001 - optional context only
        results.fail("4-block comparison", e)
    results.write()

    calls = record_calls(reference, tokens, device, record_samples)
    ref_out = outputs(reference, calls)
    traces = [(call, block_trace(reference, call, keep_inputs=True)) for call in calls]
    try:
        real = RealModel()
    except Exception as e:  # noqa: BLE001
        real = None
        results.fail("real Qwen-Image shapes", e)
    log(f"recorded {len(calls)} transformer calls; Qwen-Image's shapes {'read' if real else 'unavailable'}")

    def score(name: str, make: Callable[[], nn.Module], dtype: torch.dtype, policy: Policy | None = None) -> None:
        if deadline.passed():
            policies[name] = {"skipped": "past --deadline"}
            log(f"{name}: skipped (past --deadline)")
            results.write()
            return
        try:
            begin = time.perf_counter()
            model = make()
            mode = policy.attention if policy is not None else None
            with attention.fp8_attention(mode) if mode else contextlib.nullcontext():
                images = lab.sample(model, cond, seeds, steps=sample_steps, dtype=dtype, device=device)
                error = relative_error(outputs(model, calls), ref_out) if dtype == torch.bfloat16 else None
            m = gate.score(images, ref_images, cnn)
            m["passes"] = gate.passes(m)
            m["class_accuracy"] = lab.class_accuracy(cnn, images, labels)
            m["output_error"] = error
            m["weight_bytes"] = weight_bytes(model)
            m.update(fp8_layers(model))
            if policy is not None:
                m["config"] = policy.config(blocks)
                m["per_channel"] = policy.per_channel
                m["fast_accum"] = policy.fast_accum
                m["statistic"] = policy.static
                m["attention"] = policy.attention
                if real is not None:
                    m["real"] = real.stats(policy)
                if not policy.attention:  # the block study runs the reference too: it would be patched alike
                    m["depth"] = per_block(reference, model, traces)
            m["seconds"] = time.perf_counter() - begin
            policies[name] = m
            log(f"{name}: PSNR {m['psnr']:.2f} dB, perceptual {m['perceptual']:.4f}, FID {m['fid']:.3f}, "
                f"output error {m['output_error'] or 0:.4f} -> {'pass' if m['passes'] else 'FAIL'} ({m['seconds']:.1f} s)")
            del model
            results.write()
        except Exception as e:  # noqa: BLE001 - one policy's failure must not cost the others
            policies[name] = {"error": f"{type(e).__name__}: {e}"}
            results.fail(name, e)

    calibrations: dict[str, Any] = {}

    def calibration_for(statistic: str) -> Any:
        """Calibrated once per statistic, on seeds and classes the gate never scores."""
        from omni_fp8 import calibrate

        if "calls" not in calibrations:
            calibrations["calls"] = gate.calibration_calls(reference, tokens, sample_steps, device)
            data["calibration"] = {"seeds": [min(gate.CALIBRATION_SEEDS), max(gate.CALIBRATION_SEEDS)],
                                   "classes": list(gate.CALIBRATION_CLASSES), "calls": len(calibrations["calls"])}
        if statistic not in calibrations:
            calibrations[statistic] = calibrate(reference, calibrations["calls"], statistic=statistic, progress=False)
        return calibrations[statistic]

    def make_policy(policy: Policy) -> Callable[[], nn.Module]:
        return lambda: quantize_policy(copy.deepcopy(reference), policy, blocks,
                                       calibration_for(policy.static) if policy.static else None)

    order = [p for p in POLICIES]
    if with_static or only:
        order += STATIC_POLICIES
    if only:
        order = [p for p in order if p.key in only]
    first = {"a", "d", "f"}  # what decides the preset, first in case the run is cut short
    for policy in sorted(order, key=lambda p: p.key not in first):
        score(f"{policy.key}: {policy.name}", make_policy(policy), torch.bfloat16, policy)
    if only:
        return data

    if with_suggest and not deadline.passed():
        try:
            from omni_fp8 import suggest

            begin = time.perf_counter()
            report = suggest(reference, calls, {"preset": "none"}, max_error=DEFAULT_MAX_ERROR, progress=False)
            data["suggest"] = {**report.to_dict(), "seconds": time.perf_counter() - begin}
            log(f"suggest (--max-error {DEFAULT_MAX_ERROR}): keeps {report.ignored_layers or 'nothing'}; "
                f"error {report.suggested_error:.4f} (every Linear: {report.all_fp8_error:.4f})")
            results.write()
            kept = list(report.ignored_layers or [])
            policy = Policy("g", f"omni-convert suggest --max-error {DEFAULT_MAX_ERROR}: {', '.join(kept) or 'nothing'}",
                            scaled_groups(kept, blocks))
            score(f"g: {policy.name}", make_policy(policy), torch.bfloat16, policy)
        except Exception as e:  # noqa: BLE001
            results.fail("suggest", e)

    for name, (make, dtype) in controls(reference).items():
        score(name, make, dtype)
    return data


# ---- the report ----

def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def report(data: dict[str, Any]) -> str:
    lines: list[str] = []
    tr = data.get("train")
    if tr:
        curve = tr["loss_curve"]
        picks = [curve[i] for i in sorted({0, len(curve) // 4, len(curve) // 2, len(curve) - 1})] if curve else []
        lines.append(f"training: {tr['blocks']} blocks x width {tr['width']}, {tr['parameters'] / 1e6:.2f}M parameters, "
                     f"{tr['steps']} steps x batch {tr['batch']} on {tr['device']} in {tr['seconds']:.0f} s "
                     f"({1000 * tr['s_per_step']:.1f} ms/step); loss " + ", ".join(f"{l:.4f} @ {s}" for s, l in picks))
    bf16 = data.get("bf16")
    if bf16:
        four = bf16.get("lab4_class_accuracy")
        lines.append(f"BF16 samples: the lab CNN sees the asked class in {100 * bf16['class_accuracy']:.1f}% "
                     f"(4-block lab model on the same pairs: {_f(four and 100 * four, '.1f')}%)")
    policies = data.get("policies", {})
    if policies:
        lines += ["", ("| policy | PSNR dB | SSIM | perceptual | FID | KID | class acc | output err | gate | "
                       "lab weights | Qwen-Image FP8 FLOPs | Qwen-Image weights |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in policies.items():
            if "psnr" not in m:
                lines.append(f"| {name} | {m.get('skipped') or m.get('error')} |")
                continue
            real = m.get("real") or {}
            lines.append(
                f"| {name} | {m['psnr']:.2f} | {_f(m['ssim'], '.4f')} | {m['perceptual']:.4f} | {m['fid']:.3f} | "
                f"{m['kid']:.4f} | {100 * m['class_accuracy']:.1f}% | {_f(m['output_error'], '.4f')} | "
                f"{'pass' if m['passes'] else '**FAIL**'} | {_f(m['weight_bytes'] and m['weight_bytes'] / 1e6, '.2f')} MB | "
                f"{_f(real.get('fp8_flops_fraction') and 100 * real['fp8_flops_fraction'], '.1f')}% | "
                f"{_f(real.get('weight_gb'), '.1f')} GB |")
        th = data.get("evaluation", {}).get("thresholds", gate.THRESHOLDS)
        lines.append(f"gate: perceptual <= {th['perceptual']}, PSNR >= {th['psnr']} dB, FID <= {th['fid']}")
    depth = {name.split(":")[0]: m["depth"] for name, m in policies.items() if "depth" in m}
    if depth:
        keys = list(depth)
        lines += ["", ("Relative L2 error of the image hidden states after each block (FP8 end to end; "
                       "'local': that block alone in FP8, fed BF16 inputs):"), "",
                  "| block | " + " | ".join(keys) + " | " + " | ".join(f"local {k}" for k in keys if k in ("a", "d", "f")) + " |",
                  "|---" * (1 + len(keys) + sum(k in ("a", "d", "f") for k in keys)) + "|"]
        for i in range(len(depth[keys[0]]["compound"])):
            lines.append(f"| {i} | " + " | ".join(f"{depth[k]['compound'][i]:.4f}" for k in keys) + " | "
                         + " | ".join(f"{depth[k]['local'][i]:.4f}" for k in keys if k in ("a", "d", "f")) + " |")
        lines.append("| output | " + " | ".join(f"{depth[k]['output']:.4f}" for k in keys) + " |")
        lines += ["", "| policy | after the last block | sum of local errors | root-sum-square | last / sum |", "|---|---|---|---|---|"]
        for k in keys:
            d = depth[k]
            lines.append(f"| {k} | {d['compound'][-1]:.4f} | {d['local_sum']:.4f} | {d['local_rss']:.4f} | {d['amplification']:.2f} |")
    sug = data.get("suggest")
    if sug:
        lines += ["", f"suggest: every Linear {sug['all_fp8_error']:.4f}; keeps {sug['ignored_layers']} -> "
                      f"{_f(sug['suggested_error'], '.4f')} (bound {sug['max_error']}); worst groups: "
                      + ", ".join(f"{g['group']} {g['error']:.4f}" for g in sug["groups"][:8])]
    if data.get("errors"):
        lines += ["", "failed parts: " + ", ".join(data["errors"])]
    return "\n".join(lines)


# ---- command line ----

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["all", "train", "evaluate"])
    parser.add_argument("--out", type=Path, required=True, help="folder for model/, deep.json and deep.txt")
    parser.add_argument("--model", type=Path, help="evaluate: the model folder (default OUT/model)")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--heads", type=int, default=4, help="heads of 32 channels (width = 32 x heads)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-seconds", type=float, help="cut the step count to what fits (measured after 30 steps)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--record-samples", type=int, default=16,
                        help="images of the recorded sampling run that suggest and the per-block study replay")
    parser.add_argument("--deadline", type=float, help="seconds from start after which evaluation parts are skipped")
    parser.add_argument("--no-suggest", action="store_true")
    parser.add_argument("--static", action="store_true", help="add the static-activation policies")
    parser.add_argument("--policies", help="comma-separated policy keys: score only these (no controls, no suggest)")
    parser.add_argument("--device", default="auto")
    a = parser.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    model_dir = a.model or a.out / "model"
    if a.what in ("all", "train") and model_dir.exists() and any(model_dir.iterdir()):
        print(f"error: {model_dir} already holds files; give another --out (this script never overwrites a model).",
              file=sys.stderr)
        return 2
    if a.what == "evaluate" and not (model_dir / "class_tokens.safetensors").is_file():
        print(f"error: {model_dir} is not a deep lab model folder (no class_tokens.safetensors); "
              f"train one with `deep.py train --out {a.out}`.", file=sys.stderr)
        return 2
    import diffusers

    diffusers.logging.set_verbosity_error()  # its notes on every .to(dtype) would bury the progress lines
    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "argv": sys.argv}
    previous = {}
    if a.what == "evaluate" and (a.out / "deep.json").is_file():
        # --policies adds rows to an earlier evaluation's; otherwise it starts afresh from the training.
        previous = {k: v for k, v in json.loads((a.out / "deep.json").read_text()).items()
                    if k == "train" or (a.policies and k in ("policies", "bf16", "calibration"))}
    unknown = sorted(set(a.policies.split(",") if a.policies else ()) - {p.key for p in (*POLICIES, *STATIC_POLICIES)})
    if unknown:
        parser.error(f"unknown policy key(s) {', '.join(unknown)}; use "
                     f"{', '.join(p.key for p in (*POLICIES, *STATIC_POLICIES))}")
    results = Results(a.out, {"environment": env, **previous})
    log(f"{a.what}: torch {env['torch']}, diffusers {env['diffusers']}, {env['gpu'] or device}")
    if a.what in ("all", "train"):
        opts = TrainOptions(a.blocks, a.heads, a.steps, a.batch, a.lr, a.ema, a.seed, a.train_seconds)
        try:
            model, tokens, info = train(opts, device)
        except Exception as e:  # noqa: BLE001 - reported in deep.json; nothing to evaluate
            results.fail("train", e)
            return 1
        save(model, tokens, model_dir)
        info["weights_mb"] = sum(f.stat().st_size for f in model_dir.iterdir()) / 1e6
        info["reproduce"] = (f"python bench/quality_lab/deep.py train --out DIR --blocks {a.blocks} --heads {a.heads} "
                             f"--steps {info['steps']} --batch {a.batch} --lr {a.lr} --ema {a.ema} --seed {a.seed}")
        results.data["train"] = info
        results.write()
        log(f"saved {model_dir} ({info['weights_mb']:.1f} MB)")
        if a.what == "train":
            results.data["complete"] = True
            results.write()
            return 0
        model = model.to(torch.bfloat16)
    else:
        model, tokens = load(model_dir, device)
    try:
        evaluate(model, tokens, device=device, samples=a.samples, sample_steps=a.sample_steps,
                 record_samples=a.record_samples, results=results, deadline=Deadline(a.deadline, start),
                 with_suggest=not a.no_suggest, with_static=a.static,
                 only=a.policies.split(",") if a.policies else None)
    except Exception as e:  # noqa: BLE001 - what was measured before stays in deep.json
        results.fail("evaluate", e)
        return 1
    results.data["seconds"] = time.perf_counter() - start
    results.data["complete"] = True
    results.write()
    log("\n" + report(results.data))
    log(f"done in {results.data['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
