"""Several GPUs for one image: diffusers' context parallelism, set up for ``Omni``.

Launched with ``torchrun --nproc-per-node N``, every process loads the whole pipeline on its own
GPU; ``enable_parallelism`` then splits the transformer's token sequence across the N ranks
(Ulysses: all-to-all over heads in attention; ring: key/value blocks passed around), so each rank
runs every Linear, FP8 ones included, on its share of the tokens, and the output is gathered
after the last projection. Weights are replicated, not split: FP8 halves what each GPU holds.

``parallel`` takes ``ContextParallelConfig``'s own fields. With one kind of parallelism the
"anything" variant is the default (diffusers' own ``diffusers run --context-parallel`` does the
same), so a prompt's token count need not divide by the number of GPUs.

Z-Image's transformer has no ``_cp_plan`` in diffusers 0.42.1, so ``z_image_cp_plan`` gives one:
the unified image+caption sequence is split where it enters the main layers (with the RoPE
frequencies and the attention mask, per layer), and gathered after the final layer, which works
token by token. The refiner layers before it run whole on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from omni_fp8.converter.errors import ConfigError
from omni_fp8.converter.options import refuse_unknown_keys
from torch import nn

__all__ = ["parse_parallel", "init_distributed", "context_parallel_config", "cp_plan", "z_image_cp_plan",
           "attention_backend", "guard_ring_masks"]

_FIELDS = ("ulysses_degree", "ring_degree", "ulysses_anything", "ring_anything", "convert_to_fp32")


def parse_parallel(value: Any) -> dict[str, Any] | None:
    """``parallel`` checked: known keys, positive degrees, more than one GPU in all."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"parallel must be a dict such as {{'ulysses_degree': 2}}, got {type(value).__name__}.")
    refuse_unknown_keys(value, _FIELDS, what="parallel")
    out = dict(value)
    for key in ("ulysses_degree", "ring_degree"):
        degree = out.get(key, 1)
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ConfigError(f"parallel {key} must be a whole number >= 1, got {degree!r}.")
        out[key] = degree
    for key in ("ulysses_anything", "ring_anything", "convert_to_fp32"):
        if key in out and not isinstance(out[key], bool):
            raise ConfigError(f"parallel {key} must be true or false, got {out[key]!r}.")
    if out["ulysses_degree"] * out["ring_degree"] == 1:
        raise ConfigError("parallel needs ulysses_degree or ring_degree above 1 (the number of GPUs to use).")
    return out


def world_size(parallel: Mapping[str, Any]) -> int:
    return parallel["ulysses_degree"] * parallel["ring_degree"]


def init_distributed(parallel: Mapping[str, Any]) -> tuple[int, torch.device]:
    """Join the ``torchrun`` process group (once) and pick this rank's device: (rank, device)."""
    import torch.distributed as dist

    wanted = world_size(parallel)
    if not dist.is_available():
        raise ConfigError("parallel needs a torch built with torch.distributed.")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise ConfigError(f"parallel={dict(parallel)} needs one process per GPU: launch with "
                              f"torchrun --nproc-per-node {wanted} ...")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])) % torch.cuda.device_count())
        # Ulysses/ring "anything" exchange per-rank sizes as small CPU tensors: Gloo for those, NCCL on the GPUs.
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    if dist.get_world_size() != wanted:
        raise ConfigError(f"parallel asks for {wanted} GPU(s) (ulysses_degree x ring_degree) but "
                          f"{dist.get_world_size()} processes were launched; use torchrun --nproc-per-node {wanted}.")
    if torch.accelerator.device_count() == 0:
        raise ConfigError("parallel needs an accelerator per process: diffusers puts rank r on device "
                          "r % device_count, and this torch sees none.")
    rank = dist.get_rank()
    kind = torch._C._get_accelerator().type
    return rank, torch.device(kind, rank % torch.accelerator.device_count())


def context_parallel_config(parallel: Mapping[str, Any]) -> Any:
    from diffusers import ContextParallelConfig

    values = dict(parallel)
    if values["ring_degree"] == 1:
        values.setdefault("ulysses_anything", True)
    elif values["ulysses_degree"] == 1:
        values.setdefault("ring_anything", True)
    try:
        return ContextParallelConfig(**values)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"parallel: {' '.join(str(e).split())}") from e


def attention_backend(parallel: Mapping[str, Any] | None, device: torch.device) -> str | None:
    """The attention backend ring attention needs, where the default cannot serve it.

    Ring attention merges partial results by their log-sum-exp, which diffusers' default
    (``native``, PyTorch SDPA) does not return; cuDNN attention, built into PyTorch, does.
    """
    if not parallel or parallel["ring_degree"] == 1:
        return None
    if device.type != "cuda":
        raise ConfigError("ring attention needs an attention backend that returns log-sum-exp (cuDNN or flash "
                          "attention, on CUDA); diffusers' native one does not. Use ulysses_degree here.")
    return "_native_cudnn"


def guard_ring_masks(transformer: nn.Module) -> None:
    """Refuse masked attention under ring attention, which diffusers 0.42.1 would get wrong silently.

    Its ring loop (``TemplatedRingAttention``) applies the rank's own slice of the attention mask
    to every other rank's keys as well. A batch without padding has no mask (one prompt, or
    Qwen-Image's separate CFG calls); prompts of different lengths batched together, or
    Z-Image's CFG batch, have one: those need Ulysses.
    """
    import inspect

    blocks = next(getattr(transformer, n) for n in ("transformer_blocks", "layers") if hasattr(transformer, n))
    signature = inspect.signature(type(blocks[0]).forward)
    names = ("encoder_hidden_states_mask", "attn_mask")

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = signature.bind_partial(module, *args, **kwargs).arguments
        if any(bound.get(n) is not None for n in names):
            raise ConfigError("ring attention cannot run this batch: it needs an attention mask (prompts of different "
                              "lengths in one batch, or Z-Image's CFG batch), which diffusers 0.42.1's ring attention "
                              "applies wrongly; use ulysses_degree, or one prompt without CFG batching.")

    blocks[0].register_forward_pre_hook(check, with_kwargs=True)


def contiguous_block_inputs(transformer: nn.Module) -> None:
    """Make each block's split inputs contiguous before attention sees them.

    The context-parallel split hands a block slices along the sequence (``[B, S/N]`` masks are
    views with a stride), and diffusers 0.42.1's Ulysses attention all-gathers the attention mask
    as it arrives, which NCCL refuses for a non-contiguous tensor (seen on 2 H200s with Z-Image's
    CFG batch). Registered before ``enable_parallelism``, this hook is inside the split hook, so it
    sees the slices.
    """
    from diffusers.hooks import HookRegistry, ModelHook

    class _Contiguous(ModelHook):
        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
            fix = lambda v: v.contiguous() if torch.is_tensor(v) and not v.is_contiguous() else v  # noqa: E731
            return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}

    blocks = next(getattr(transformer, n) for n in ("transformer_blocks", "layers") if hasattr(transformer, n))
    for block in blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_Contiguous(), "omni_fp8_contiguous_inputs")


def cp_plan(transformer: nn.Module) -> dict[str, Any] | None:
    """The plan ``enable_parallelism`` needs: the model's own, or ours for Z-Image; None is refused."""
    if getattr(transformer, "_cp_plan", None) is not None:
        return None  # diffusers uses the class's plan
    if type(transformer).__name__ == "ZImageTransformer2DModel":
        return z_image_cp_plan(transformer)
    raise ConfigError(f"parallel: {type(transformer).__name__} has no context-parallel plan in diffusers "
                      f"(_cp_plan) and omni-fp8 has none for it; run it on one GPU.")


def z_image_cp_plan(transformer: nn.Module) -> dict[str, Any]:
    """Split Z-Image's unified sequence at the main layers; gather it after the final layer."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    def split(dims: int) -> Any:
        return ContextParallelInput(split_dim=1, expected_dims=dims, split_output=False)

    plan: dict[str, Any] = {
        "layers.0": {"x": split(3)},
        # every layer gets the full-length mask and frequencies from the model's forward
        "layers.*": {"freqs_cis": split(3), "attn_mask": split(2)},
    }
    for key in transformer.all_final_layer:
        plan[f"all_final_layer.{key}"] = ContextParallelOutput(gather_dim=1, expected_dims=3)
    return plan
