"""``omni-convert``: the command line over ``convert``, ``make_plan``, ``verify`` and the demo.

Known failures print one line (``error: <what, where, why, fix>``) and exit 1; ``--debug`` shows
the traceback instead. Progress bars go to stderr, results to stdout; ``--json`` makes stdout a
single JSON document for scripts.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from .convert import DEFAULT_MAX_SHARD_SIZE, execute
from .errors import ConfigError, OmniFp8Error
from .manifest import read_manifest, verify
from .options import DEFAULT_MAX_ERROR, DEFAULT_TARGET, TARGETS, Fp8Config, parse_dtype, parse_size
from .plan import make_plan
from .presets import available_presets
from .source import MANIFEST_NAME, open_source

_DTYPES = ("keep", "bf16", "fp16", "fp32")


def _fail_cleanly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known errors into one line on stderr and exit status 1 (``--debug`` re-raises)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was published", err=True)
            sys.exit(130)
        except Exception as e:
            if debug or isinstance(e, click.exceptions.ClickException):
                raise
            if isinstance(e, OmniFp8Error):
                message = str(e)
            elif isinstance(e, OSError):
                message = f"{type(e).__name__}: {e}"
            else:  # never a traceback by default, but say plainly that this one is ours to fix
                message = (f"unexpected {type(e).__name__}: {e} (a bug in omni-fp8: please report it with the "
                           "output of --debug)")
            click.echo(f"error: {' '.join(message.split())}", err=True)
            sys.exit(1)

    return wrapper


def _plan_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that shape a plan, shared by ``convert`` and ``inspect``."""
    options = [
        click.option("--preset", metavar="NAME",
                     help=f"Recipe from manifests/ ({', '.join(available_presets())}); 'none' for no "
                          "preset. Default: the one registered for the model's class."),
        click.option("--ignored-layers", "ignored_layers", multiple=True, metavar="PATTERNS",
                     help="Layers kept in high precision; repeatable or comma-separated. Whole name "
                          "components (img_mlp, attn.to_q), 're:' for a regex, fused names "
                          "(to_qkv, add_kv_proj, w13) expand. Extends the preset."),
        click.option("--weight-block-size", metavar="BN,BK",
                     help="Block-wise weight scales, e.g. 128,128 (default: one scale per tensor)."),
        click.option("--activation-scheme", type=click.Choice(["dynamic", "static"]), default="dynamic",
                     show_default=True, help="'static' needs calibration and is not supported yet."),
        click.option("--dtype", type=click.Choice(list(_DTYPES)), default="keep", show_default=True,
                     help="dtype of the tensors that stay high precision ('keep': as in the source)."),
        click.option("--target", type=click.Choice(list(TARGETS)), default=DEFAULT_TARGET, show_default=True,
                     help="The engine OUT is for: omni-fp8's folder, a folder vllm-omni loads as written, or one "
                          ".safetensors file for ComfyUI or stock diffusers."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _config(preset: str | None, ignored_layers: tuple[str, ...], weight_block_size: str | None,
            activation_scheme: str) -> Fp8Config:
    return Fp8Config(
        ignored_layers=ignored_layers,
        activation_scheme=activation_scheme,
        weight_block_size=weight_block_size,
        preset=preset,
    )


def _torch_dtype(name: str) -> Any:
    return parse_dtype(name)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="omni-fp8")
def main(debug: bool) -> None:
    """Convert diffusion-transformer checkpoints to FP8 weights, and inspect or verify the result."""


@main.command()
@click.argument("src")
@click.argument("out")
@_plan_options
@click.option("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, show_default=True,
              help="Largest output shard (e.g. 2GB, 500MB, 4GiB).")
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier omni-fp8 output.")
@click.option("-q", "--quiet", is_flag=True, help="No plan, no progress bars: just the final line.")
@_fail_cleanly
def convert(src: str, out: str, preset: str | None, ignored_layers: tuple[str, ...],
            weight_block_size: str | None, activation_scheme: str, dtype: str, target: str, as_json: bool,
            max_shard_size: str, force: bool, quiet: bool) -> None:
    """Convert the transformer of SRC (pipeline or transformer folder) into OUT.

    \b
    omni-convert convert ./Qwen-Image ./Qwen-Image-fp8
    omni-convert convert ./transformer ./transformer-fp8 --ignored-layers img_mlp --weight-block-size 128,128
    omni-convert convert ./Qwen-Image ./Qwen-Image-fp8-vllm --target vllm-omni
    omni-convert convert ./Z-Image-Turbo ./zit-fp8.safetensors --target comfyui
    """
    from .check import check
    from .report import plan_text

    config = _config(preset, ignored_layers, weight_block_size, activation_scheme)
    limit = parse_size(max_shard_size)
    plan = make_plan(open_source(src), config, dtype=_torch_dtype(dtype), target=target)
    if not quiet and not as_json:
        click.echo(plan_text(plan, table=False), err=True)
    result = execute(plan, out, max_shard_size=limit, force=force, progress=not quiet)
    vllm = None
    if target == DEFAULT_TARGET:  # no folder of ours may be mis-loaded by vllm-omni without a word
        report = check(result.output, "vllm-omni")
        vllm = {"loadable": report.ok, "problems": report.problems,
                "fix": None if report.ok else "--target vllm-omni"}
    if as_json:
        _emit_json({**result.to_dict(), **({"vllm_omni": vllm} if vllm else {})})
        return
    click.echo(result.summary_line())
    if vllm and not vllm["loadable"]:
        click.echo(f"note: vllm-omni would not load this folder correctly as written ({len(report.problems)} "
                   f"problem(s), first: {report.problems[0]}); convert with --target vllm-omni for a folder it "
                   f"loads (omni-convert check {out} --target vllm-omni lists them).", err=True)


@main.command()
@click.argument("path")
@_plan_options
@click.option("--config", "model_config", metavar="PATH",
              help="For a single .safetensors file: the model's config.json or its folder.")
@_fail_cleanly
def inspect(path: str, preset: str | None, ignored_layers: tuple[str, ...], weight_block_size: str | None,
            activation_scheme: str, dtype: str, target: str, as_json: bool, model_config: str | None) -> None:
    """Show the plan for a source folder, or summarise a converted one or another tool's FP8 checkpoint.

    For a source: what would be quantized, what kept and why, and the sizes before and after.
    For a converted folder (it has fp8_manifest.json): what it holds and how it was made.
    For another tool's FP8 checkpoint (vLLM fp8, compressed-tensors, ModelOpt; ComfyUI or BFL fp8r
    single files with --config): its layout, as load_transformer reads it.
    """
    from pathlib import Path

    from .layouts import read_layout
    from .plan import linear_shapes, meta_model
    from .report import folder_json, folder_text, layout_json, layout_text, plan_json, plan_text

    folder = Path(path)
    given = [flag for flag, value in (("--preset", preset), ("--ignored-layers", ignored_layers),
                                      ("--weight-block-size", weight_block_size),
                                      ("--activation-scheme", activation_scheme != "dynamic"),
                                      ("--dtype", dtype != "keep"),
                                      ("--target", target != DEFAULT_TARGET)) if value]

    def refuse_plan_options(what: str) -> None:
        if given:
            raise ConfigError(
                f"{folder}: is {what}, shown as it was made; {', '.join(given)} only shape the plan "
                "for a high-precision source. Drop them, or inspect the source instead.")

    if (folder / MANIFEST_NAME).is_file():
        refuse_plan_options("a converted folder")
        manifest = read_manifest(folder)
        if as_json:
            _emit_json(folder_json(folder, manifest))
        else:
            click.echo(folder_text(folder, manifest))
        return
    source = open_source(path, allow_quantized=True, config=model_config)
    layout = read_layout(source, linear_shapes(meta_model(source.class_name, source.config)))
    if layout is not None:
        refuse_plan_options("an FP8 checkpoint")
        if as_json:
            _emit_json(layout_json(source, layout))
        else:
            click.echo(layout_text(source, layout))
        return
    if source.config.get("quantization_config") is not None or any(t.dtype.startswith("F8_") for t in source.tensors):
        open_source(path)  # the converter's own refusal of an already-quantized source, in its words
    config = _config(preset, ignored_layers, weight_block_size, activation_scheme)
    plan = make_plan(source, config, dtype=_torch_dtype(dtype), target=target)
    if as_json:
        _emit_json(plan_json(plan))
    else:
        click.echo(plan_text(plan))


@main.command(name="verify")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def verify_command(path: str, as_json: bool, quiet: bool) -> None:
    """Re-hash every file of a converted folder against its manifest (exit 1 on any difference)."""
    from tqdm.auto import tqdm

    from .manifest import manifest_total_bytes
    from .report import size_text

    total = manifest_total_bytes(read_manifest(path))
    with tqdm(total=total, unit="B", unit_scale=True, desc="Verifying", disable=quiet) as bar:
        report = verify(path, on_bytes=bar.update)
    if as_json:
        _emit_json(report.to_dict())
    elif report.ok:
        click.echo(f"OK: {report.checked} files, {size_text(report.bytes)} match {path}/{MANIFEST_NAME}")
    else:
        for problem in report.problems:
            click.echo(f"  {problem}", err=True)
    if not report.ok:
        if not as_json:
            click.echo(f"error: {path}: {len(report.problems)} file(s) differ from the manifest; "
                       "convert again or restore them.", err=True)
        sys.exit(1)


@main.command(name="check")
@click.argument("path")
@click.option("--target", type=click.Choice(list(TARGETS)), required=True,
              help="The engine to check against (its loader's rules, read from its code).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@_fail_cleanly
def check_command(path: str, target: str, as_json: bool) -> None:
    """Would TARGET load PATH (a converted folder or file) as written? One line per problem; exit 1 on any.

    Reports what would fail to load and what would be cast: an FP8 weight taken as plain numbers
    without its scale, or a high-precision weight forced into FP8.
    """
    from .check import check

    report = check(path, target)
    if as_json:
        _emit_json(report.to_dict())
    else:
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        if report.ok:
            layers = ", ".join(f"{n} {k}" for k, n in report.layers.items())
            click.echo(f"OK: {target} loads {path} as written" + (f" ({layers} Linears)" if layers else ""))
    if not report.ok:
        if not as_json:
            click.echo(f"error: {path}: {len(report.problems)} problem(s) for {target}; see above"
                       + ("; convert with --target vllm-omni" if target == "vllm-omni" else "") + ".", err=True)
        sys.exit(1)


@main.command(name="suggest")
@click.argument("src")
@click.option("--inputs", "inputs_path", metavar="FILE",
              help="Recorded transformer inputs (omni_fp8.save_inputs). Default: sample_inputs.safetensors "
                   "beside the transformer's weights.")
@click.option("--max-error", type=click.FloatRange(min=0, min_open=True, max=1e6), default=DEFAULT_MAX_ERROR,
              show_default=True,
              help="Largest mean relative L2 error of the outputs against the unquantized model.")
@click.option("--ignored-layers", "ignored_layers", multiple=True, metavar="PATTERNS",
              help="Layers that stay high precision regardless (not measured).")
@click.option("--weight-block-size", metavar="BN,BK", help="Measure block-scaled FP8 (default: per tensor).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_fail_cleanly
def suggest_command(src: str, inputs_path: str | None, max_error: float, ignored_layers: tuple[str, ...],
                    weight_block_size: str | None, as_json: bool, quiet: bool) -> None:
    """Measure each layer group's FP8 damage on recorded inputs and suggest --ignored-layers.

    Quantizes one group of Linears at a time (a block's attention, each MLP, the modulation, each
    embedder), replays the inputs, ranks the groups by how far the output moves, then keeps the
    worst ones in high precision until the error is within --max-error.
    """
    from pathlib import Path

    from omni_fp8.runtime import load_transformer
    from omni_fp8.runtime.sensitivity import load_inputs, suggest

    from .errors import SourceNotFoundError, UnsupportedSourceError

    if max_error != max_error:  # NaN passes every range check
        raise ConfigError("--max-error nan is not a number; give a bound such as 0.065.")
    source = open_source(src, allow_quantized=True)
    if "quantization_config" in source.config:
        raise UnsupportedSourceError(
            f"{source.model_dir}: already quantized; suggest measures the high-precision checkpoint it came from.",
            path=source.model_dir)
    path = Path(inputs_path) if inputs_path else source.model_dir / "sample_inputs.safetensors"
    if not path.is_file():
        raise SourceNotFoundError(
            f"{path}: no recorded inputs; record the transformer's inputs during a pipeline run with "
            "omni_fp8.record_inputs and save_inputs, then pass --inputs FILE.", path=path)
    config = Fp8Config(preset="none", ignored_layers=ignored_layers, weight_block_size=weight_block_size)
    calls = load_inputs(path)  # before the model: a bad inputs file should not cost a load
    model = load_transformer(src, progress=not quiet)
    report = suggest(model, calls, config, max_error=max_error, progress=not quiet)
    patterns = [*config.ignored_layers, *report.ignored_layers]
    if as_json:
        _emit_json({**report.to_dict(), "patterns": patterns})
        return
    click.echo(report.table())
    flag = f" --ignored-layers {','.join(patterns)}" if patterns else ""
    block = f" --weight-block-size {weight_block_size}" if weight_block_size else ""
    click.echo(f"\nomni-convert convert {src} OUT --preset none{flag}{block}")


@main.command()
@click.argument("out")
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier demo output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@_fail_cleanly
def demo(out: str, force: bool, quiet: bool, as_json: bool) -> None:
    """Build a tiny random-weight Qwen-Image transformer in OUT and convert it (no download)."""
    from .demo import run_demo

    info = run_demo(out, force=force, progress=not quiet)
    result = info.pop("result")
    if as_json:
        _emit_json({**info, "conversion": result.to_dict()})
        return
    click.echo(f"BF16 source: {info['source']}")
    click.echo(result.summary_line())
    click.echo(f"Dequantized FP8 weights vs BF16: relative L2 error {info['weight_rel_l2_mean']:.4f} mean, "
               f"{info['weight_rel_l2_max']:.4f} worst")
    click.echo(f"Next: omni-convert inspect {info['output']}")


if __name__ == "__main__":
    main()
