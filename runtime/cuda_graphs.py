"""CUDA graphs for a transformer's repeated blocks: eager mode without the per-kernel host time.

In eager mode every kernel of a block is launched from Python, and an FP8 Linear launches two
(the activation quantization, then the GEMM) where a BF16 one launches one. On a fast GPU the
host then sets the pace, so the same model can run at different speeds in different processes
(bench/RESULTS.md). A CUDA graph replays a block's kernels with one launch: the step runs at the
GPU's speed whatever the host does, and without ``torch.compile``'s compile time.

    >>> from omni_fp8 import enable_cuda_graphs
    >>> enable_cuda_graphs(pipe.transformer)      # before any cache, after quantize_ / loading
    >>> image = pipe(prompt).images[0]            # each new input shape: one eager call, then captured

How it works, and what it costs:

* each block (``model._repeated_blocks``, as ``compile_repeated_blocks`` finds them) gets a
  diffusers hook. The first call with a given input signature (tensor shapes, dtypes, devices,
  and every non-tensor argument) runs eagerly, as a warm-up; the second captures a graph and
  every later one replays it;
* all blocks of a model share one memory pool and one set of static input and output buffers
  per signature (the blocks run one after another), so the memory cost is about one block's
  temporaries plus two copies of its inputs, not one per block;
* a replay copies the inputs into the static buffers and returns copies of the outputs, so
  nothing the caller keeps is overwritten by a later replay (about 3 x 25 MB of copies per
  Qwen-Image block at 1024x1024: tens of microseconds of GPU time);
* a graph holds the addresses of the block's weights: each replay compares them with the
  addresses at capture (offloading, a LoRA merge that swaps tensors) and captures again if they
  moved; a block whose weights move on every call (offloading) goes back to eager mode.

Blocks run eagerly (never captured) with autograd enabled, on the CPU, with an active LoRA
adapter (its scale is a Python number a graph would freeze), or when capture fails (a block that
synchronises with the host); the reason is logged once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from omni_fp8.converter.errors import ConfigError

__all__ = ["enable_cuda_graphs", "disable_cuda_graphs", "HOOK_NAME"]

HOOK_NAME = "omni_fp8_cuda_graph"
_MOVES_BEFORE_EAGER = 3  # captures a block may need because its weights moved, before it stays eager
logger = logging.getLogger(__name__)


def enable_cuda_graphs(model: nn.Module) -> nn.Module:
    """Replay ``model``'s repeated transformer blocks as CUDA graphs; returns ``model``.

    Works for any diffusers transformer with ``_repeated_blocks`` (FP8 or not). Apply it before
    caches (a cache's decisions must run around the graph, not inside it) and not together with
    ``torch.compile``: a compiled step is not launch-bound, and graphs around compiled blocks
    measured no faster (Inductor's ``mode="reduce-overhead"`` fails with ``compile_repeated_blocks``:
    bench/RESULTS.md). Undo with ``disable_cuda_graphs``.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"enable_cuda_graphs takes a torch model, not {type(model).__name__}.")
    blocks = repeated_blocks(model)
    from diffusers.hooks import HookRegistry

    registries = [HookRegistry.check_if_exists_or_initialize(block) for block in blocks]
    for block, registry in zip(blocks, registries):  # all checked before any is changed
        others = [name for name in registry.hooks if name != HOOK_NAME]
        if others:
            raise ConfigError(
                f"enable_cuda_graphs: the {type(block).__name__} blocks already have hooks ({', '.join(others)}); "
                "enable CUDA graphs first, then caches, so that the cache decides around the graph."
            )
    if not torch.cuda.is_available():
        raise ConfigError("enable_cuda_graphs needs a CUDA GPU; without one, run the model as it is.")
    shared = _Shared()
    for registry in registries:
        if HOOK_NAME not in registry.hooks:
            registry.register_hook(_hook(shared), HOOK_NAME)
    return model


def disable_cuda_graphs(model: nn.Module) -> nn.Module:
    """Remove the hooks and free every graph and its memory pool."""
    from diffusers.hooks import HookRegistry

    for block in repeated_blocks(model):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        if HOOK_NAME in registry.hooks:
            registry.remove_hook(HOOK_NAME, recurse=False)
    return model


def repeated_blocks(model: nn.Module, purpose: str = "enable_cuda_graphs") -> list[nn.Module]:
    """The blocks diffusers' ``compile_repeated_blocks`` would compile (the classes the model names
    in ``_repeated_blocks``); a one-line error naming ``purpose`` if there are none."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"{purpose}: {type(model).__name__} names no repeated transformer blocks (_repeated_blocks); "
            "pass the pipeline's transformer."
        )
    return blocks


class _Shared:
    """What all blocks of one model share: the memory pool, a capture stream and, per input
    signature, the static buffers (the blocks run one after another, never at once)."""

    def __init__(self) -> None:
        self.pool = None
        self.stream: torch.cuda.Stream | None = None
        self.inputs: dict[tuple, list[torch.Tensor]] = {}
        self.outputs: dict[tuple, list[torch.Tensor]] = {}
        self.out_meta: dict[tuple, tuple] = {}  # per input signature: the warm-up's output structure


class _Graph:
    __slots__ = ("graph", "out_key", "out_spec", "fingerprint")

    def __init__(self, graph, out_key, out_spec, fingerprint) -> None:
        self.graph, self.out_key, self.out_spec, self.fingerprint = graph, out_key, out_spec, fingerprint


def _signature(leaves: list, spec) -> tuple | None:
    """What a graph depends on besides the tensors' values; ``None`` if it cannot be a dict key."""
    parts: list = [spec]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        else:
            parts.append(leaf)
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _fingerprint(module: nn.Module) -> tuple:
    """Where the block's tensors are now. A graph reads the addresses it was captured with, so
    any change (offloading moved or swapped a tensor, a LoRA adapter added modules) means capture
    again. Looked up afresh at every replay: about 30 us for a Qwen-Image block."""
    return tuple(t.data_ptr() for m in module.modules()
                 for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)


class _GraphHook:
    """The per-block hook (mixed into diffusers' ``ModelHook`` by ``_hook``)."""

    _is_stateful = False

    def __init__(self, shared: _Shared) -> None:
        super().__init__()
        self.shared = shared
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()
        self.moves = 0
        self.eager_reason: str | None = None

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if self.eager_reason is not None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return forward(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = _signature(leaves, spec)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if key is None or not tensors or any(not t.is_cuda for t in tensors):
            return forward(*args, **kwargs)
        graph = self.graphs.get(key)
        if graph is not None and graph.fingerprint != _fingerprint(module):
            self.graphs.clear()  # the weights moved: these graphs read the old addresses
            self.moves += 1
            if self.moves >= _MOVES_BEFORE_EAGER:
                self._go_eager(module, "its weights move between calls (offloading)")
                return forward(*args, **kwargs)
            graph = None
        if graph is None:
            if key not in self.seen:  # the first call of a signature runs eagerly: the warm-up
                out = forward(*args, **kwargs)
                out_leaves, out_spec = pytree.tree_flatten(out)
                self.shared.out_meta.setdefault(key, (out_spec, tuple(
                    (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else None for t in out_leaves)))
                self.seen.add(key)
                return out
            graph = self._capture(module, forward, key, leaves, spec, tensors)
            if graph is None:
                return forward(*args, **kwargs)
        for static, value in zip(self.shared.inputs[key], tensors):
            static.copy_(value)
        graph.graph.replay()
        return pytree.tree_unflatten([o.clone() for o in self.shared.outputs[graph.out_key]], graph.out_spec)

    def _capture(self, module: nn.Module, forward, key: tuple, leaves: list, spec, tensors: list) -> _Graph | None:
        from . import kernels

        reason = _refusal(module)
        if reason is not None:
            self._go_eager(module, reason)
            return None
        out_spec, out_meta = self.shared.out_meta[key]
        if any(m is None for m in out_meta):
            self._go_eager(module, "it returns something other than tensors")
            return None
        shared = self.shared
        if shared.pool is None:
            shared.pool = torch.cuda.graph_pool_handle()
            shared.stream = torch.cuda.Stream()
        if key not in shared.inputs:
            shared.inputs[key] = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        out_key = (key, out_meta)
        if out_key not in shared.outputs:
            shared.outputs[out_key] = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in out_meta]
        for static, value in zip(shared.inputs[key], tensors):
            static.copy_(value)
        static_in = iter(shared.inputs[key])
        s_args, s_kwargs = pytree.tree_unflatten(
            [next(static_in) if isinstance(t, torch.Tensor) else t for t in leaves], spec)
        graph = torch.cuda.CUDAGraph()
        kernels.forget_shared_activation()  # nothing made while capturing may be used outside the graph
        shared.stream.wait_stream(torch.cuda.current_stream())
        got_spec = None
        try:
            # Capture on a side stream, as torch.cuda.graph does, but without its per-capture
            # garbage collection and cache flush (a second each over 60 blocks).
            with torch.cuda.stream(shared.stream):
                graph.capture_begin(pool=shared.pool)
                try:
                    out_leaves, got_spec = pytree.tree_flatten(forward(*s_args, **s_kwargs))
                    for static, value in zip(shared.outputs[out_key], out_leaves):
                        static.copy_(value)
                    del out_leaves  # the pool may reuse their memory: only the static copies are kept
                finally:
                    graph.capture_end()
        except Exception as e:  # noqa: BLE001 - any failure to capture means: run this block eagerly
            torch.cuda.current_stream().wait_stream(shared.stream)
            kernels.forget_shared_activation()
            self._go_eager(module, f"capturing it failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return None
        torch.cuda.current_stream().wait_stream(shared.stream)
        kernels.forget_shared_activation()
        if got_spec != out_spec:
            self._go_eager(module, "its outputs change structure between calls")
            return None
        result = _Graph(graph, out_key, out_spec, _fingerprint(module))
        self.graphs[key] = result
        return result

    def _go_eager(self, module: nn.Module, reason: str) -> None:
        if self.eager_reason is None:
            logger.warning("CUDA graphs: %s runs eagerly: %s.", type(module).__name__, reason)
        self.eager_reason = reason
        self.graphs.clear()


def _refusal(module: nn.Module) -> str | None:
    """Why this block cannot be captured now, if it cannot."""
    for sub in module.modules():
        if hasattr(sub, "lora_A") and len(sub.lora_A) and not getattr(sub, "merged", False):
            return "it has unfused LoRA adapters (their scales are Python numbers a graph would freeze); fuse them"
    for p in module.parameters():
        if not p.is_cuda:
            return "some of its weights are not on the GPU (offloading)"
    return None


def _hook(shared: _Shared):
    from diffusers.hooks import ModelHook

    class CudaGraphHook(_GraphHook, ModelHook):
        pass

    return CudaGraphHook(shared)
