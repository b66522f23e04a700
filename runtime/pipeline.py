"""``Omni``: a whole text-to-image pipeline with FP8 weights, as the spec drives it.

    >>> from omni_fp8 import Omni, OmniDiffusionSamplingParams
    >>> omni = Omni(model="Qwen/Qwen-Image", quantization="fp8")  # doctest: +SKIP
    >>> out = omni.generate("A cat sitting on a windowsill",
    ...                     OmniDiffusionSamplingParams(num_inference_steps=50, seed=0))  # doctest: +SKIP
    >>> out[0].images[0].save("cat.png")  # doctest: +SKIP

A thin layer over diffusers: the pipeline ``model_index.json`` names is loaded by diffusers'
``DiffusionPipeline.from_pretrained``, with the FP8 transformer coming from this package's
diffusers integration (a converted folder loads as it is; a BF16 one is quantized while loading
through ``PipelineQuantizationConfig(quant_mapping={"transformer": Fp8Config(...)})``), every
other component as diffusers loads it. ``generate`` calls the pipeline itself; what ``Omni`` adds
is the option set shared with the runtime and ``omni-convert``, caches by name, several GPUs,
and timings. Hub repo ids work because diffusers downloads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omni_fp8.converter.errors import ConfigError, SourceNotFoundError, UnsupportedSourceError
from omni_fp8.converter.options import Fp8Config, parse_dtype, refuse_unknown_keys

from . import caches
from . import parallel as parallel_mod

__all__ = ["Omni", "OmniDiffusionSamplingParams", "OmniRequestOutput", "OmniTimings", "QUANTIZATIONS"]

QUANTIZATIONS = ("fp8",)
_OFFLOAD_MODES = ("model", "sequential")
_GROUP_OFFLOAD_KEYS = ("offload_type", "num_blocks_per_group", "non_blocking", "use_stream", "record_stream",
                       "low_cpu_mem_usage", "offload_to_disk_path", "exclude_modules")
_PROBE_HOOK = "omni_fp8_call_counter"


@dataclasses.dataclass(frozen=True, kw_only=True)
class OmniDiffusionSamplingParams:
    """What one ``generate`` call samples; ``None`` leaves the pipeline's own default.

    Args:
        num_inference_steps: Denoising steps.
        height, width: Image size in pixels (multiples of 16 for the real models).
        seed: Seeds a CPU generator, so an image depends on the seed, not on the device or on
            how many GPUs share the work. ``None`` draws one (reported with the output).
        guidance_scale: Z-Image's classifier-free guidance scale (0 for Z-Image-Turbo); for
            Qwen-Image only guidance-distilled variants take it.
        true_cfg_scale: Qwen-Image's classifier-free guidance scale; it needs a ``negative_prompt``.
        negative_prompt: One for all prompts, or one per prompt.
        num_images_per_prompt: Images per prompt, each from its own noise.
        max_sequence_length: Longest prompt in tokens (the pipeline's default: 512).
    """

    num_inference_steps: int = 50
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | Sequence[str] | None = None
    num_images_per_prompt: int = 1
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("num_inference_steps", 1), ("num_images_per_prompt", 1), ("height", 1), ("width", 1),
                          ("seed", 0), ("max_sequence_length", 1)):
            value = getattr(self, name)
            if value is None and name not in ("num_inference_steps", "num_images_per_prompt"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}.")
        if self.seed is not None and self.seed >= 2**63:
            raise ConfigError(f"seed must be below 2**63, got {self.seed}.")
        for name in ("guidance_scale", "true_cfg_scale"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value == value or abs(value) == float("inf") or value < 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}.")
        negative = self.negative_prompt
        if negative is not None and not isinstance(negative, str) and not (
                isinstance(negative, Sequence) and all(isinstance(p, str) for p in negative)):
            raise ConfigError(f"negative_prompt must be a string or a list of strings, got {negative!r}.")


@dataclasses.dataclass(frozen=True)
class OmniTimings:
    """Where the time went, in seconds, and what a cache skipped.

    ``denoise_s`` runs from the transformer's first call to the end of the last step (GPU work
    included: the device is synchronised there), so it leaves out text encoding and VAE decoding,
    which ``total_s`` holds. A step counts as skipped when every transformer call of it reused
    the cache (the last block's attention did not run); ``None`` without a cache.
    """

    load_s: float
    total_s: float
    denoise_s: float | None
    steps: int
    steps_skipped: int | None
    transformer_calls: int
    transformer_calls_skipped: int | None

    @property
    def step_s(self) -> float | None:
        return self.denoise_s / self.steps if self.denoise_s is not None and self.steps else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "step_s": self.step_s}


@dataclasses.dataclass(frozen=True)
class OmniRequestOutput:
    """The images of one prompt (``num_images_per_prompt`` of them) and the call's timings."""

    prompt: str
    images: list[Any]
    seed: int
    timings: OmniTimings


class Omni:
    """A diffusers text-to-image pipeline with an FP8 transformer, caches and several GPUs by option.

    Args:
        model: A diffusers pipeline folder (``model_index.json``), BF16 or converted by
            ``omni-convert``, a model's folder in the Hugging Face cache, or a Hub repo id
            (downloaded by diffusers).
        quantization: ``"fp8"`` quantizes a BF16 transformer while loading. A converted folder is
            FP8 either way. Without it (and without ``quantization_config``) a BF16 folder runs in
            BF16, for comparison.
        quantization_config: ``Fp8Config`` or dict (``{"method": "fp8", "ignored_layers": [...]}``),
            the options of ``omni-convert`` and ``load_transformer``; implies ``quantization="fp8"``.
            For a converted folder it must describe that folder's conversion.
        dtype: Compute dtype of everything that is not FP8 (``"bf16"``, ``"fp16"``, ``"fp32"``).
        device: Where the pipeline runs (default: ``"cuda"`` if there is one, else ``"cpu"``); with
            ``parallel``, each rank's own GPU.
        cache_backend: ``"tea_cache"``, or one of diffusers' caches by name (``caches.CACHE_BACKENDS``).
        cache_config: The backend's options, e.g. ``{"rel_l1_thresh": 0.2}`` for ``tea_cache``.
        cuda_graphs: Replay each transformer block as a CUDA graph (``enable_cuda_graphs``): eager
            numerics without the per-kernel host time, so the GPU, not Python, sets the pace.
        fuse_blocks: Qwen-Image / Z-Image attention with one QKV projection per stream, QK-norm
            and RoPE in one kernel on a GPU and, for Qwen-Image, one-kernel AdaLN modulation and no
            text mask when it masks nothing, which lets SDPA take its fastest kernel
            (``fuse_blocks_``): FP8 Qwen-Image over BF16 on an H200 1.19x -> 1.38x compiled,
            1.13x -> 1.71x eager.
        compile: Regional compilation of the transformer blocks (``compile_repeated_blocks``,
            ``fullgraph=True``); with a cache, the blocks' own computation is compiled and the
            cache's decisions run around it.
        enable_cpu_offload: ``True``/``"model"`` for diffusers' ``enable_model_cpu_offload``,
            ``"sequential"`` for ``enable_sequential_cpu_offload``.
        group_offload: ``True``, or ``enable_group_offload``'s options (``offload_type``,
            ``num_blocks_per_group``, ``use_stream``, ...); block level, one block per group by default.
        parallel: ``{"ulysses_degree": N}`` and/or ``"ring_degree"``: context parallelism over N
            GPUs, one process each (``torchrun --nproc-per-node N``).
        attention_backend: diffusers' attention backend (``set_attention_backend``: ``"native"``,
            ``"_native_cudnn"``, ``"flash"``, ...); ring attention picks ``"_native_cudnn"`` by default.
        revision: For a repo id: the branch, tag or commit (default ``main``).
        token: For a repo id: a Hub token (default: ``HF_TOKEN`` or the saved login).
        progress: Progress bars while loading and over the denoising steps.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        quantization: str | None = None,
        quantization_config: Fp8Config | Mapping[str, Any] | None = None,
        dtype: str | torch.dtype = "bf16",
        device: str | torch.device | None = None,
        cache_backend: str | None = None,
        cache_config: Mapping[str, Any] | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        fuse_blocks: bool = False,
        enable_cpu_offload: bool | str = False,
        group_offload: bool | Mapping[str, Any] | None = None,
        parallel: Mapping[str, Any] | None = None,
        attention_backend: str | None = None,
        revision: str | None = None,
        token: str | None = None,
        progress: bool = True,
    ) -> None:
        started = time.perf_counter()
        # Every option is checked before anything is read or downloaded.
        if not (quantization is None or (isinstance(quantization, str) and quantization in QUANTIZATIONS)):
            raise ConfigError(f"unknown quantization {quantization!r}; supported: 'fp8' (or None for BF16).")
        explicit = None if quantization_config is None else Fp8Config.coerce(quantization_config)
        self._dtype = parse_dtype(dtype)
        if self._dtype is None:
            raise ConfigError("dtype 'keep' has no meaning for a pipeline; use 'bf16', 'fp16' or 'fp32'.")
        offload = _offload_mode(enable_cpu_offload)
        group = _group_offload(group_offload)
        self._parallel = parallel_mod.parse_parallel(parallel)
        if not isinstance(compile, bool):
            raise ConfigError(f"compile must be True or False, got {compile!r}.")
        if offload and group is not None:
            raise ConfigError("enable_cpu_offload and group_offload both offload the pipeline; choose one.")
        if self._parallel and (offload or group is not None):
            raise ConfigError("parallel runs a whole pipeline on each GPU; it does not combine with offloading.")
        if not isinstance(cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be True or False, got {cuda_graphs!r}.")
        if cuda_graphs and (compile or offload or group is not None or self._parallel):
            raise ConfigError("cuda_graphs replays the blocks where they are: it does not combine with compile (use "
                              "one or the other), offloading (the weights move) or parallel.")
        if not isinstance(fuse_blocks, bool):
            raise ConfigError(f"fuse_blocks must be True or False, got {fuse_blocks!r}.")
        if fuse_blocks and self._parallel:
            raise ConfigError("fuse_blocks does not combine with parallel: context parallelism's plan is written for "
                              "diffusers' own attention layers; choose one.")
        if self._parallel and compile:
            raise ConfigError("compile does not combine with parallel in diffusers 0.42.1 (its own CLI skips "
                              "compilation under context parallelism); choose one.")
        if compile and cache_backend == "taylorseer_cache":
            raise ConfigError("taylorseer_cache hooks the attention inside each block and keeps its decisions out of "
                              "compilation (torch.compiler.disable), which a fullgraph-compiled block cannot call; "
                              "drop compile or pick another cache.")
        if attention_backend is not None and not isinstance(attention_backend, str):
            raise ConfigError(f"attention_backend must be a diffusers backend name such as 'native', got "
                              f"{attention_backend!r}.")
        for name, value in (("revision", revision), ("token", token)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {type(value).__name__}.")

        source = _resolve(model, revision, token)
        self._source = source
        self._model_name = str(model)
        class_name = source.class_name
        caches.check_cache_backend(cache_backend, cache_config, class_name, parallel=bool(self._parallel))
        converted = "quantization_config" in source.config
        if converted and explicit is not None:
            from .loader import check_converted_config

            check_converted_config(source, explicit)
        self._quantization = "fp8-converted" if converted else (
            "fp8" if quantization is not None or explicit is not None else None)

        self._rank = 0
        self._owns_process_group = False
        if self._parallel:
            import torch.distributed as dist

            self._owns_process_group = not dist.is_initialized()
            self._rank, self._device = parallel_mod.init_distributed(self._parallel)
        else:
            from .loader import _usable_device

            self._device = _usable_device(device if device is not None else
                                          ("cuda" if torch.cuda.is_available() else "cpu"))

        backend = attention_backend or parallel_mod.attention_backend(self._parallel, self._device)

        self._pipe = _load_pipeline(source.root, self._dtype, Fp8Config() if explicit is None else explicit,
                                    quantize=self._quantization == "fp8", progress=progress and self._rank == 0)
        pipe = self._pipe
        if not hasattr(pipe, "transformer") or "prompt" not in inspect.signature(type(pipe).__call__).parameters:
            raise UnsupportedSourceError(f"{source.root}: {type(pipe).__name__} is not a text-to-image pipeline with a "
                                         "transformer; Omni runs those.", path=source.root)
        transformer = pipe.transformer
        if fuse_blocks:  # first: compilation, graphs, caches and offloading then see the fused layers
            from .fused_blocks import fuse_blocks_

            fuse_blocks_(transformer)
        self._fuse_blocks = fuse_blocks
        if compile and cache_backend is not None:
            _compile_block_forwards(transformer)  # before any hook: the hooks then wrap compiled blocks
        if backend is not None:
            try:
                transformer.set_attention_backend(backend)
            except (ValueError, ImportError, RuntimeError) as e:
                raise ConfigError(f"attention_backend {backend!r}: {' '.join(str(e).split())}") from e
        self._attention_backend = backend
        if cuda_graphs:
            if self._device.type != "cuda":
                raise ConfigError(f"cuda_graphs needs a CUDA device; this pipeline runs on {self._device}.")
            from .cuda_graphs import enable_cuda_graphs

            enable_cuda_graphs(transformer)  # before the caches' hooks, which must decide around the graphs
        self._cuda_graphs = cuda_graphs
        self._probe = _install_probe(transformer, cache_backend) if cache_backend is not None else None
        self._cache = caches.apply_cache(pipe, cache_backend, cache_config)
        if self._parallel:
            parallel_mod.contiguous_block_inputs(transformer)
            transformer.enable_parallelism(config=parallel_mod.context_parallel_config(self._parallel),
                                           cp_plan=parallel_mod.cp_plan(transformer))
            if self._parallel["ring_degree"] > 1:
                parallel_mod.guard_ring_masks(transformer)
        # Offloading last, so its hooks are outermost: a block is on the device before a cache's
        # hook reads its weights (TeaCache's indicator runs the first block's modulation).
        if offload == "model":
            pipe.enable_model_cpu_offload(device=self._device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self._device)
        elif group is not None:
            if group["offload_type"] == "block_level" and "exclude_modules" not in group:
                # A VAE decodes through .decode(), not forward: block-level hooks on its top-level
                # layers never fire, and they would stay on the CPU (measured on an H200). It is
                # small next to the transformer: it goes to the device whole.
                group = {**group, "exclude_modules": ["vae"]}
            pipe.enable_group_offload(onload_device=self._device, **group)
        else:
            pipe.to(self._device)
        if compile and cache_backend is None:
            transformer.compile_repeated_blocks(fullgraph=True)
        self._compile = compile
        self._offload = offload or ("group" if group is not None else None)
        pipe.set_progress_bar_config(disable=not progress or self._rank != 0, leave=False)
        self.load_s = time.perf_counter() - started

    # --- what was loaded -----------------------------------------------------------------------

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline itself (its components, its own ``__call__``)."""
        return self._pipe

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        """This process's rank under ``parallel`` (0 otherwise): write outputs from rank 0 only."""
        return self._rank

    def info(self) -> dict[str, Any]:
        """What runs: model, classes, quantization, cache, placement, for reports and ``--json``."""
        transformer = self._pipe.transformer
        quantization = None
        if self._quantization is not None:
            config = dict(getattr(transformer.config, "quantization_config", None) or {})
            quantization = {"mode": self._quantization, "quantization_config": config}
        return {
            "model": self._model_name,
            "folder": str(self._source.root),
            "pipeline": type(self._pipe).__name__,
            "transformer": type(transformer).__name__,
            "quantization": quantization,
            "dtype": str(self._dtype).removeprefix("torch."),
            "device": str(self._device),
            "cache": self._cache.to_dict() if self._cache is not None else None,
            "compile": self._compile,
            "cuda_graphs": self._cuda_graphs,
            "fuse_blocks": self._fuse_blocks,
            "offload": self._offload,
            "parallel": {**self._parallel, "rank": self._rank} if self._parallel else None,
            "attention_backend": self._attention_backend,
            "load_s": self.load_s,
        }

    # --- generating ------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[str],
                 sampling_params: OmniDiffusionSamplingParams | None = None) -> list[OmniRequestOutput]:
        """Run the pipeline on one prompt or a list: one ``OmniRequestOutput`` per prompt, in order."""
        params = OmniDiffusionSamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, OmniDiffusionSamplingParams):
            raise ConfigError(f"sampling_params must be OmniDiffusionSamplingParams, got {type(params).__name__}.")
        prompts = normalize_prompts(prompt)
        kwargs = self._call_kwargs(prompts, params)
        seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
        transformer = self._pipe.transformer
        if self._cache is not None:
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks(recurse=True)
            self._cache.prepare(transformer, params.num_inference_steps)
        timer = _Timer(self._device, self._probe)
        handle = transformer.register_forward_pre_hook(timer.on_transformer_call)
        started = time.perf_counter()
        try:
            with _quiet_libraries():
                result = self._pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                                    callback_on_step_end=timer.on_step_end)
        finally:
            handle.remove()
        total = time.perf_counter() - started
        timings = timer.timings(self.load_s, total, cached=self._cache is not None)
        per_prompt = params.num_images_per_prompt
        images = list(result.images)
        return [OmniRequestOutput(p, images[i * per_prompt:(i + 1) * per_prompt], seed, timings)
                for i, p in enumerate(prompts)]

    def _call_kwargs(self, prompts: list[str], params: OmniDiffusionSamplingParams) -> dict[str, Any]:
        """The sampling params in the pipeline's own ``__call__`` terms, refusing what it would ignore."""
        pipe = self._pipe
        name = type(pipe).__name__
        accepted = inspect.signature(type(pipe).__call__).parameters
        # A copy: ZImagePipeline writes its chat template into the list it is given.
        kwargs: dict[str, Any] = {"prompt": list(prompts) if len(prompts) > 1 else prompts[0],
                                  "num_inference_steps": params.num_inference_steps,
                                  "num_images_per_prompt": params.num_images_per_prompt}
        for key in ("height", "width", "guidance_scale", "true_cfg_scale", "negative_prompt", "max_sequence_length"):
            value = getattr(params, key)
            if value is None:
                continue
            if key not in accepted:
                raise ConfigError(f"{name} has no {key}; {_cfg_hint(accepted)}.")
            kwargs[key] = value
        multiple = 2 * getattr(pipe, "vae_scale_factor", 8)
        for key in ("height", "width"):
            if key in kwargs and kwargs[key] % multiple:
                raise ConfigError(f"{key} {kwargs[key]} is not a multiple of {multiple}, which {name} needs "
                                  f"(its VAE downscales by {multiple // 2}, then 2x2 patches).")
        negative = params.negative_prompt
        if negative is not None:
            if isinstance(negative, str):
                negative = [negative] * len(prompts) if len(prompts) > 1 else negative
            elif len(negative) != len(prompts):
                raise ConfigError(f"negative_prompt has {len(negative)} entries for {len(prompts)} prompt(s); give one "
                                  "for all or one per prompt.")
            else:  # a fresh list either way: pipelines may write into the one they are given
                negative = list(negative) if len(prompts) > 1 else negative[0]
            kwargs["negative_prompt"] = negative
        if "true_cfg_scale" in accepted:  # Qwen-Image: true CFG runs only with a negative prompt
            guidance_embeds = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
            if params.guidance_scale is not None and not guidance_embeds:
                raise ConfigError(f"{name} ignores guidance_scale for this model (it is not guidance-distilled); "
                                  "use true_cfg_scale with a negative_prompt.")
            if negative is None:
                if params.true_cfg_scale is not None and params.true_cfg_scale > 1:
                    raise ConfigError(f"true_cfg_scale {params.true_cfg_scale} needs a negative_prompt ({name} runs "
                                      "classifier-free guidance only with one; Qwen-Image's examples use ' ').")
                kwargs["true_cfg_scale"] = 1.0  # no CFG without a negative prompt: say so, not warn each call
        elif negative is not None and params.guidance_scale == 0:
            raise ConfigError(f"negative_prompt has no effect with guidance_scale 0 ({name} then skips the "
                              "negative pass); raise guidance_scale or drop negative_prompt.")
        if "callback_on_step_end" not in accepted:
            raise UnsupportedSourceError(f"{name} has no callback_on_step_end, which Omni times steps with.")
        return kwargs

    # --- ending ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the process group ``Omni`` joined for ``parallel`` (nothing to do otherwise)."""
        if self._owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_process_group = False

    def __enter__(self) -> Omni:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info()
        cache = f", cache={i['cache']['backend']}" if i["cache"] else ""
        return (f"Omni({i['model']!r}, pipeline={i['pipeline']}, quantization="
                f"{i['quantization']['mode'] if i['quantization'] else None}, device={i['device']}{cache})")


# --- loading -------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _resolve(model: Any, revision: str | None, token: str | None) -> Any:
    """The pipeline folder to load: the given one, or diffusers' download of a repo id."""
    from omni_fp8.converter.options import parse_path
    from omni_fp8.converter.source import open_source

    path = parse_path(model, what="model")
    if path.exists():
        if revision is not None or token is not None:
            raise ConfigError(f"revision and token apply to Hub repo ids; {path} is a local folder.")
    elif _REPO_ID.fullmatch(str(model)) and not str(model).startswith((".", "/", "~")):
        path = Path(_download(str(model), revision, token))
    else:
        raise SourceNotFoundError(f"{path}: no such folder, and not a Hub repo id (org/name); give a diffusers "
                                  "pipeline folder or a repo id.", path=path)
    source = open_source(path, allow_quantized=True)
    if source.kind != "pipeline":
        raise UnsupportedSourceError(
            f"{source.root}: a transformer folder (no model_index.json); Omni needs a whole pipeline folder (text "
            "encoder, VAE, scheduler). Load a transformer alone with omni_fp8.load_transformer.", path=source.root)
    return source


def _download(repo_id: str, revision: str | None, token: str | None) -> str:
    """diffusers' own download of a pipeline repo (the files ``from_pretrained`` would fetch)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.download(repo_id, revision=revision, token=token)
    except Exception as e:  # network, auth, gated, missing: one line naming the repo
        raise SourceNotFoundError(f"{repo_id}: could not download it ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:300]}); check the repo id, your network and token, "
                                  "or pass a local folder.") from e


def _load_pipeline(folder: Path, dtype: torch.dtype, config: Fp8Config, *, quantize: bool, progress: bool) -> Any:
    # The FP8 quantizer is registered with diffusers by ``import omni_fp8``, which importing this
    # module did (the package's __init__), so PipelineQuantizationConfig accepts an Fp8Config.
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize:
        kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping={"transformer": config})
    with _quiet_libraries(progress=progress):
        return DiffusionPipeline.from_pretrained(folder, **kwargs)


@contextlib.contextmanager
def _quiet_libraries(*, progress: bool | None = None) -> Iterator[None]:
    """diffusers' and transformers' warnings off (and their loading bars, unless ``progress``)."""
    import diffusers

    try:
        import transformers
    except ImportError as e:
        raise ConfigError("Omni needs transformers for the pipelines' text encoders: "
                          "pip install 'omni-fp8[pipeline]'.") from e

    levels = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    bars = diffusers.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    if progress is not None:
        for library in (diffusers.utils.logging, transformers.utils.logging):
            (library.enable_progress_bar if progress else library.disable_progress_bar)()
    try:
        yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        for library, enabled in zip((diffusers.utils.logging, transformers.utils.logging), bars):
            (library.enable_progress_bar if enabled else library.disable_progress_bar)()


def _offload_mode(value: Any) -> str | None:
    if value is False or value is None:
        return None
    if value is True:
        return "model"
    if isinstance(value, str) and value in _OFFLOAD_MODES:
        return value
    raise ConfigError(f"enable_cpu_offload must be True, False, 'model' or 'sequential', got {value!r}.")


def _group_offload(value: Any) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    options: dict[str, Any] = {"offload_type": "block_level", "num_blocks_per_group": 1}
    if value is True:
        return options
    if not isinstance(value, Mapping):
        raise ConfigError(f"group_offload must be True or a dict of enable_group_offload options, got {value!r}.")
    refuse_unknown_keys(value, _GROUP_OFFLOAD_KEYS, what="group_offload")
    options.update(value)
    if options["offload_type"] not in ("block_level", "leaf_level"):
        raise ConfigError(f"group_offload offload_type must be 'block_level' or 'leaf_level', got "
                          f"{options['offload_type']!r}.")
    if options["offload_type"] == "leaf_level" and "num_blocks_per_group" not in value:
        del options["num_blocks_per_group"]  # a block-level setting
    return options


def _compile_block_forwards(transformer: Any) -> None:
    """Compile each repeated block's own forward (what ``compile_repeated_blocks`` compiles), before
    any hook wraps it: caches decide in Python between blocks, which a compiled graph cannot hold."""
    from .cuda_graphs import repeated_blocks

    for module in repeated_blocks(transformer, "compile"):
        module.forward = torch.compile(module.forward, fullgraph=True)


def _install_probe(transformer: Any, backend: str) -> Any:
    """Count the calls in which the last block's attention really ran: the innermost hook there, so
    any cache (block-level, or TaylorSeer's on the attention itself) that skips it also skips this."""
    from diffusers.hooks import HookRegistry, ModelHook

    class CallCounter(ModelHook):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
            self.calls += 1
            return args, kwargs

    blocks = next(getattr(transformer, n) for n in ("transformer_blocks", "layers") if hasattr(transformer, n))
    last = blocks[-1]
    if backend == "taylorseer_cache":  # it caches the attention, not the block
        last = next(m for n, m in last.named_children() if n in ("attn", "attention"))
    counter = CallCounter()
    HookRegistry.check_if_exists_or_initialize(last).register_hook(counter, _PROBE_HOOK)
    return counter


class _Timer:
    """Transformer calls, probe calls and wall time per denoising step."""

    def __init__(self, device: torch.device, probe: Any) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.probe = probe
        self.start: float | None = None
        self.calls = 0
        self.step_ends: list[float] = []
        self.step_calls: list[tuple[int, int]] = []  # (transformer calls, probe calls) in each step
        self._mark = (0, probe.calls if probe is not None else 0)

    def on_transformer_call(self, module: Any, args: Any) -> None:
        if self.start is None:
            self.sync()  # the text encoder's work is not denoising
            self.start = time.perf_counter()
        self.calls += 1

    def on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        self.sync()
        self.step_ends.append(time.perf_counter())
        probe = self.probe.calls if self.probe is not None else 0
        self.step_calls.append((self.calls - self._mark[0], probe - self._mark[1]))
        self._mark = (self.calls, probe)
        return {}

    def timings(self, load_s: float, total_s: float, *, cached: bool) -> OmniTimings:
        denoise = self.step_ends[-1] - self.start if self.step_ends and self.start is not None else None
        skipped_steps = skipped_calls = None
        if cached:
            skipped_steps = sum(1 for calls, ran in self.step_calls if calls and not ran)
            skipped_calls = sum(calls - ran for calls, ran in self.step_calls)
        return OmniTimings(load_s=load_s, total_s=total_s, denoise_s=denoise, steps=len(self.step_ends),
                           steps_skipped=skipped_steps, transformer_calls=self.calls,
                           transformer_calls_skipped=skipped_calls)


def normalize_prompts(prompt: Any) -> list[str]:
    """One prompt or a list, as a list of non-empty strings (what ``generate`` accepts)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        prompts = list(prompt)
        if not prompts:
            raise ConfigError("no prompt given: pass a string or a non-empty list of strings.")
    else:
        raise ConfigError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ConfigError(f"prompt {i} is a {type(p).__name__}, not a string.")
        if not p.strip():
            raise ConfigError(f"prompt {i if len(prompts) > 1 else ''} is empty; describe the image to generate."
                              .replace("prompt  is", "prompt is"))
        if "\0" in p:
            raise ConfigError(f"prompt {i} contains a NUL character.")
    return prompts


def _cfg_hint(accepted: Mapping[str, Any]) -> str:
    guidance = [k for k in ("true_cfg_scale", "guidance_scale") if k in accepted]
    return f"its guidance is set with {' or '.join(guidance)}" if guidance else "it takes no guidance scale"
