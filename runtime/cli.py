"""``omni-fp8``: text-to-image from the command line, over ``Omni``.

    omni-fp8 text-to-image --model Qwen/Qwen-Image --quantization fp8 --ignored-layers img_mlp \\
        --prompt "A cat sitting on a windowsill" --num-inference-steps 50 --height 1024 --width 1024 \\
        --seed 0 --output cat.png

Every option of ``Omni`` and of ``OmniDiffusionSamplingParams`` is a flag; the FP8 ones are
``omni-convert``'s. Errors are one line and exit 1 (usage errors exit 2); progress bars (loading,
then one over the denoising steps) go to stderr, the result to stdout, or one JSON document with
``--json``. Under ``torchrun`` only rank 0 writes images and prints.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click
from omni_fp8.converter.cli_common import emit_json, fail_cleanly, fp8_config, fp8_options, static_options
from omni_fp8.converter.errors import ConfigError, OutputExistsError, OutputWriteError

_DTYPES = ("bf16", "fp16", "fp32")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="omni-fp8")
def main(debug: bool) -> None:
    """Generate images with FP8 diffusion transformers (Qwen-Image, Z-Image) through diffusers."""


@main.command(name="text-to-image")
@click.option("--model", required=True, help="Pipeline folder (BF16 or converted), HF cache folder, or Hub repo id.")
@click.option("--revision", metavar="REV", help="For a Hub repo id: branch, tag or commit (default: main).")
@click.option("--token", metavar="TOKEN", help="For a Hub repo id: a Hub token (default: HF_TOKEN, or the saved "
                                               "login).")
@click.option("--quantization", type=click.Choice(["fp8"]),
              help="Quantize a BF16 transformer to FP8 while loading (a converted folder is FP8 anyway). Without it, "
                   "and without the FP8 options below, a BF16 folder runs in BF16.")
@fp8_options
@static_options
@click.option("--dtype", type=click.Choice(_DTYPES), default="bf16", show_default=True,
              help="Compute dtype of everything that is not FP8.")
@click.option("--device", help="Where to run (default: cuda if available, else cpu).")
@click.option("--cache-backend", metavar="NAME",
              help="tea_cache, or one of diffusers' caches: first_block_cache, mag_cache, taylorseer_cache.")
@click.option("--cache-config", metavar="JSON", help='The cache\'s options, e.g. \'{"rel_l1_thresh": 0.2}\'.')
@click.option("--compile", "compile_", is_flag=True, help="Regional torch.compile of the transformer blocks.")
@click.option("--cuda-graphs", is_flag=True,
              help="Replay each transformer block as a CUDA graph: eager numerics, no per-kernel host time.")
@click.option("--fuse-blocks", is_flag=True,
              help="One QKV projection per attention stream and one-kernel AdaLN (Qwen-Image, Z-Image): faster "
                   "eager steps.")
@click.option("--enable-cpu-offload", is_flag=True, help="diffusers' enable_model_cpu_offload.")
@click.option("--sequential-cpu-offload", is_flag=True, help="diffusers' enable_sequential_cpu_offload.")
@click.option("--group-offload", metavar="SPEC",
              help="diffusers' group offloading: block_level, leaf_level, or a JSON dict of its options.")
@click.option("--ulysses-degree", type=click.IntRange(min=1), help="Context parallelism: GPUs for Ulysses attention.")
@click.option("--ring-degree", type=click.IntRange(min=1), help="Context parallelism: GPUs for ring attention.")
@click.option("--attention-backend", metavar="NAME",
              help="diffusers' attention backend (native, _native_cudnn, flash, ...); ring attention picks "
                   "_native_cudnn.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="What to draw; repeat for several prompts.")
@click.option("--negative-prompt", help="What to avoid (Qwen-Image's true CFG needs one; ' ' is usual).")
@click.option("--num-inference-steps", type=int, default=50, show_default=True)
@click.option("--height", type=int, help="Pixels (default: the pipeline's, 1024 for the real models).")
@click.option("--width", type=int, help="Pixels (default: the pipeline's).")
@click.option("--seed", type=int, help="Seed of the initial noise (default: a random one, printed).")
@click.option("--guidance-scale", type=float, help="Z-Image's CFG scale (0 for Z-Image-Turbo).")
@click.option("--true-cfg-scale", type=float, help="Qwen-Image's CFG scale (needs --negative-prompt).")
@click.option("--num-images-per-prompt", type=int, default=1, show_default=True)
@click.option("--max-sequence-length", type=int, help="Longest prompt in tokens.")
@click.option("--output", "-o", default="output.png", show_default=True,
              help="Image file; with several images, NAME-0.png, NAME-1.png, ... in prompt order.")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; just the output lines.")
@fail_cleanly
def text_to_image(model: str, revision: str | None, token: str | None, quantization: str | None, preset: str | None,
                  ignored_layers: tuple[str, ...], weight_block_size: str | None, weight_strategy: str | None,
                  activation_scheme: str, calibration: str | None, static_ignored_layers: tuple[str, ...], dtype: str,
                  device: str | None, cache_backend: str | None, cache_config: str | None, compile_: bool,
                  cuda_graphs: bool, fuse_blocks: bool, enable_cpu_offload: bool, sequential_cpu_offload: bool, group_offload: str | None,
                  ulysses_degree: int | None, ring_degree: int | None, attention_backend: str | None,
                  prompts: tuple[str, ...],
                  negative_prompt: str | None, num_inference_steps: int, height: int | None, width: int | None,
                  seed: int | None, guidance_scale: float | None, true_cfg_scale: float | None,
                  num_images_per_prompt: int, max_sequence_length: int | None, output: str, force: bool,
                  as_json: bool, quiet: bool) -> None:
    """Generate images from prompts and write them as image files.

    \b
    omni-fp8 text-to-image --model ./Qwen-Image --quantization fp8 --prompt "A cat" --seed 0 -o cat.png
    omni-fp8 text-to-image --model ./Z-Image-Turbo-fp8 --guidance-scale 0 --num-inference-steps 9 --prompt "A cat"
    torchrun --nproc-per-node 2 -m omni_fp8.runtime.cli text-to-image --ulysses-degree 2 --model ./Qwen-Image ...
    """
    from omni_fp8.runtime.pipeline import Omni, OmniDiffusionSamplingParams, normalize_prompts

    if enable_cpu_offload and sequential_cpu_offload:
        raise click.UsageError("--enable-cpu-offload and --sequential-cpu-offload are two ways to offload; give one.")
    normalize_prompts(list(prompts))  # a bad prompt fails now, not after the load
    custom_fp8 = bool(preset or ignored_layers or weight_block_size or weight_strategy or activation_scheme != "dynamic"
                      or calibration or static_ignored_layers)
    config = fp8_config(preset, ignored_layers, weight_block_size, activation_scheme, weight_strategy, calibration,
                        static_ignored_layers) if custom_fp8 else None
    params = OmniDiffusionSamplingParams(
        num_inference_steps=num_inference_steps, height=height, width=width, seed=seed, guidance_scale=guidance_scale,
        true_cfg_scale=true_cfg_scale, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
        max_sequence_length=max_sequence_length)
    parallel = {k: v for k, v in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)) if v} or None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    paths = _output_paths(Path(output), len(prompts) * num_images_per_prompt)
    if rank0:  # before a minutes-long load, not after
        _check_writable(paths, force=force)
    with Omni(model, quantization=quantization, quantization_config=config, dtype=dtype, device=device,
              cache_backend=cache_backend, cache_config=_json_option(cache_config, "--cache-config"),
              compile=compile_, cuda_graphs=cuda_graphs, fuse_blocks=fuse_blocks,
              enable_cpu_offload="sequential" if sequential_cpu_offload else enable_cpu_offload,
              group_offload=_group_offload_option(group_offload), parallel=parallel,
              attention_backend=attention_backend, revision=revision, token=token,
              progress=not (quiet or as_json)) as omni:
        results = omni.generate(list(prompts), params)
        if omni.rank != 0:
            return
        images = [image for result in results for image in result.images]
        for image, path in zip(images, paths):
            _save_image(image, path, force=force)
        timings = results[0].timings
        if as_json:
            outputs = [{"prompt": r.prompt, "paths": [str(p) for p in paths[i * num_images_per_prompt:
                                                                             (i + 1) * num_images_per_prompt]]}
                       for i, r in enumerate(results)]
            emit_json({**omni.info(), "outputs": outputs, "seed": results[0].seed, "timings": timings.to_dict()})
            return
        for path, image in zip(paths, images):
            click.echo(f"wrote {path} ({image.width}x{image.height}, seed {results[0].seed})")
        click.echo(_summary(omni.info(), timings))


def _summary(info: dict[str, Any], timings: Any) -> str:
    quantization = info["quantization"]["mode"] if info["quantization"] else info["dtype"]
    cache = info["cache"]["backend"] if info["cache"] else None
    what = ", ".join(x for x in (quantization, cache, info["device"]) if x)
    line = f"{info['pipeline']} ({what}): load {timings.load_s:.1f} s"
    if timings.denoise_s is not None:
        skipped = f", {timings.steps_skipped} skipped by {cache}" if cache else ""
        line += (f", denoise {timings.denoise_s:.2f} s ({timings.steps} steps, {timings.step_s:.3f} s/step"
                 f"{skipped})")
    return line + f", total {timings.total_s:.2f} s"


def _json_option(value: str | None, flag: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as e:
        raise ConfigError(f"{flag} is not valid JSON ({e}): {value!r}; e.g. '{{\"rel_l1_thresh\": 0.2}}'.") from e


def _group_offload_option(value: str | None) -> Any:
    if value is None:
        return None
    if value in ("block_level", "leaf_level"):
        return {"offload_type": value}
    return _json_option(value, "--group-offload")


def _output_paths(output: Path, count: int) -> list[Path]:
    from PIL import Image

    known = Image.registered_extensions()
    if output.suffix.lower() not in known or known[output.suffix.lower()] not in Image.SAVE:
        raise ConfigError(f"--output {output}: unknown image type {output.suffix or '(none)'!r}; "
                          "use .png, .jpg or .webp.")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _check_writable(paths: list[Path], *, force: bool) -> None:
    for path in paths:
        if not path.parent.is_dir():
            raise OutputWriteError(f"{path}: its folder {path.parent} does not exist; create it first.", path=path)
        if path.is_dir() or (path.exists() or path.is_symlink()) and not force:
            raise OutputExistsError(f"{path}: already exists; pass --force to replace it, or choose another --output.",
                                    path=path)


def _save_image(image: Any, path: Path, *, force: bool) -> None:
    """Write to a temporary file beside ``path``, then rename: no half-written image, ever."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=_format(path))
        if not force and os.path.lexists(path):
            raise OutputExistsError(f"{path}: appeared while generating; nothing was replaced. Pass --force or "
                                    "choose another --output.", path=path)
        os.replace(temp, path)
    except OutputExistsError:
        raise
    except OSError as e:
        raise OutputWriteError(f"{path}: could not write the image ({e.strerror or e}).", path=path) from e
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def _format(path: Path) -> str:
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


if __name__ == "__main__":
    main()
