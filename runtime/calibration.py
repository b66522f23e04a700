"""``calibrate``: every Linear's activation range over recorded transformer calls, for static scales.

    >>> with record_inputs(pipe.transformer) as calls:  # doctest: +SKIP
    ...     pipe(prompts, num_inference_steps=20)
    >>> scales = calibrate(pipe.transformer, calls)  # doctest: +SKIP
    >>> scales.save("scales.safetensors")  # doctest: +SKIP

A forward pre-hook on each Linear (``nn.Linear`` or ``Fp8Linear``) folds its input into a running
statistic as the calls are replayed, in the model's own compute dtype and on its device: memory
is one scalar per Linear, never the activations. Diffusion activations shift across timesteps,
so the statistic covers every call: ``"max"`` is the largest |x| seen; ``"pNN.N"`` is that
percentile of |x| within each call, then the largest over calls (it ignores the rarest outliers
of each step, which then saturate at +-448 when quantized).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from omni_fp8.converter.calibration_file import DEFAULT_STATISTIC, Calibration, parse_statistic

from .fp8_linear import Fp8Linear

__all__ = ["calibrate", "Calibration", "DEFAULT_STATISTIC", "inputs_sha256"]


def calibrate(
    model: nn.Module,
    calls: Sequence[Mapping[str, Any]],
    *,
    statistic: str = DEFAULT_STATISTIC,
    inputs_sha256: str | None = None,
    progress: bool = True,
) -> Calibration:
    """Observe every Linear's input over ``calls`` (``record_inputs`` / ``load_inputs``).

    Args:
        model: The transformer, high precision or FP8 (``load_transformer``, a pipeline's); left
            as it was.
        calls: Its recorded forward keyword arguments, every step of every prompt you want covered.
        statistic: ``"max"`` or a per-call percentile of |x| such as ``"p99.99"``.
        inputs_sha256: The SHA-256 of the file ``calls`` came from, recorded as provenance
            (``inputs_sha256(path)``).
        progress: Show a progress bar over the calls.

    Returns:
        A ``Calibration``: ``save`` it, or pass it as ``Fp8Config(activation_scheme="static",
        calibration=...)``.
    """
    from tqdm.auto import tqdm

    statistic = parse_statistic(statistic)
    fraction = None if statistic == "max" else float(statistic[1:]) / 100
    _refuse_rewired(model)
    linears = _linears(model)
    running: dict[str, torch.Tensor] = {}

    def observe(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            value = _amax(x) if fraction is None else _percentile(x, fraction)
            previous = running.get(name)
            running[name] = value if previous is None else torch.maximum(previous, value)  # NaN propagates

        return hook

    handles = [module.register_forward_pre_hook(observe(name)) for name, module in linears.items()]
    device = next(model.parameters()).device
    # Recorded inputs in the model's compute dtype, as its pipeline passes them (a BF16 recording
    # replayed through an FP32 model, say).
    dtype = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16, torch.float32)),
                 torch.float32)

    def place(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)
        if isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
            return [place(t) for t in v]  # Z-Image takes lists of per-image tensors
        return v

    try:
        with torch.no_grad():
            for kwargs in tqdm(calls, desc="Calibrating", disable=not progress):
                kwargs = {k: place(v) for k, v in kwargs.items()}
                kwargs.setdefault("return_dict", False)
                model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    names = list(running)
    values = torch.stack([running[n].to(torch.float32).cpu() for n in names]).tolist() if names else []
    return Calibration(
        amax=dict(zip(names, values)),
        in_features={name: module.in_features for name, module in linears.items()},
        class_name=type(model).__name__,
        statistic=statistic,
        calls=len(calls),
        inputs_sha256=inputs_sha256,
    )


def _refuse_rewired(model: nn.Module) -> None:
    """Fused projections carry other names than the checkpoint's Linears (a calibration of them fits
    no plan), and CUDA-graph replays run no module forward (the hooks would see nothing)."""
    from omni_fp8.converter.errors import ConfigError

    from .cuda_graphs import HOOK_NAME

    if any(hasattr(m, "omni_fused_parts") for m in model.modules()):
        raise ConfigError("calibrate: the model's blocks are fused (fuse_blocks_); call unfuse_blocks_ first, "
                          "calibrate, then fuse again.")
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and HOOK_NAME in getattr(registry, "hooks", {}):
            raise ConfigError("calibrate: the model's blocks replay as CUDA graphs, which run no Linear's forward; "
                              "call disable_cuda_graphs first, calibrate, then enable them again.")


def inputs_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a recorded-inputs file, for a calibration's provenance."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear the plan knows (``nn.Linear``, FP8 or not), LoRA adapters' own Linears left out."""
    wrappers = [name for name, m in model.named_modules() if isinstance(getattr(m, "base_layer", None), nn.Module)]
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Fp8Linear)):
            continue
        owner = next((w for w in wrappers if name.startswith(w + ".")), None)
        if owner is None:
            out[name] = module
        elif name == f"{owner}.base_layer":
            out[owner] = module  # the plan names a LoRA-wrapped Linear by its wrapper
    return out


def _amax(x: torch.Tensor) -> torch.Tensor:
    """max(|x|) as float32, without materialising |x|."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    lo, hi = torch.aminmax(x)
    return torch.maximum(lo.float().neg(), hi.float())


def _percentile(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``fraction`` quantile of |x| (the k-th largest, k = ceil((1 - fraction) * n)), as float32."""
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    k = max(1, math.ceil((1 - fraction) * flat.numel()))
    return flat.abs().topk(k, sorted=False).values.min().float()
