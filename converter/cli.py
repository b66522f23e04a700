"""``omni-convert``: the command line over ``convert``, ``make_plan``, ``verify`` and the demo.

Known failures print one line (``error: <what, where, why, fix>``) and exit 1; ``--debug`` shows
the traceback instead. Progress bars go to stderr, results to stdout; ``--json`` makes stdout a
single JSON document for scripts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from .cli_common import emit_json as _emit_json
from .cli_common import fail_cleanly as _fail_cleanly
from .cli_common import fp8_config as _config
from .cli_common import fp8_options, static_options
from .convert import DEFAULT_MAX_SHARD_SIZE, execute, fetching
from .errors import ConfigError
from .manifest import read_manifest, verify
from .options import DEFAULT_MAX_ERROR, DEFAULT_TARGET, TARGETS, Fp8Config, parse_dtype, parse_size
from .plan import make_plan
from .source import MANIFEST_NAME, check_not_quantized, open_source

_DTYPES = ("keep", "bf16", "fp16", "fp32")
_INPUTS_NAME = "sample_inputs.safetensors"


def _plan_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that shape a plan, shared by ``convert`` and ``inspect``."""
    options = [
        click.option("--dtype", type=click.Choice(list(_DTYPES)), default="keep", show_default=True,
                     help="dtype of the tensors that stay high precision ('keep': as in the source)."),
        click.option("--target", type=click.Choice(list(TARGETS)), default=DEFAULT_TARGET, show_default=True,
                     help="The engine OUT is for: omni-fp8's folder, a folder vllm-omni loads as written, or one "
                          ".safetensors file for ComfyUI or stock diffusers."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout."),
    ]
    for option in reversed(options):
        command = option(command)
    return fp8_options(command)


def _hub_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where a source is when it is a Hub repo id: the Hub's own option names."""
    options = [
        click.option("--subfolder", metavar="DIR", help="The transformer's folder inside SRC (default: transformer/ "
                                                         "of a pipeline, or SRC itself)."),
        click.option("--revision", metavar="REV", help="For a Hub repo id: branch, tag or commit (default: main)."),
        click.option("--token", metavar="TOKEN", help="For a Hub repo id: a Hub token (default: HF_TOKEN, or the "
                                                      "login `hf auth login` saved)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _torch_dtype(name: str) -> Any:
    return parse_dtype(name)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="omni-fp8")
def main(debug: bool) -> None:
    """Convert diffusion-transformer checkpoints to FP8 weights, and inspect or verify the result."""


@main.command()
@click.argument("src")
@click.argument("out")
@_plan_options
@static_options
@_hub_options
@click.option("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, show_default=True,
              help="Largest output shard (e.g. 2GB, 500MB, 4GiB).")
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier omni-fp8 output.")
@click.option("-q", "--quiet", is_flag=True, help="No plan, no progress bars: just the final line.")
@_fail_cleanly
def convert(src: str, out: str, preset: str | None, ignored_layers: tuple[str, ...],
            weight_block_size: str | None, weight_strategy: str | None, activation_scheme: str, dtype: str,
            target: str, as_json: bool, calibration: str | None, static_ignored_layers: tuple[str, ...],
            subfolder: str | None, revision: str | None, token: str | None,
            max_shard_size: str, force: bool, quiet: bool) -> None:
    """Convert the transformer of SRC (pipeline or transformer folder, or a Hub repo id) into OUT.

    With --subfolder, OUT holds that folder converted and nothing else of the pipeline.

    \b
    omni-convert convert ./Qwen-Image ./Qwen-Image-fp8
    omni-convert convert ./transformer ./transformer-fp8 --ignored-layers img_mlp --weight-block-size 128,128
    omni-convert convert ./Qwen-Image ./Qwen-Image-fp8 --weight-strategy channel
    omni-convert convert ./Qwen-Image ./Qwen-Image-fp8-vllm --target vllm-omni
    omni-convert convert ./Z-Image-Turbo ./zit-fp8.safetensors --target comfyui
    omni-convert convert Qwen/Qwen-Image ./Qwen-Image-fp8
    omni-convert convert Tongyi-MAI/Z-Image-Turbo ./zit-fp8 --subfolder transformer
    omni-convert convert ./Qwen-Image ./Qwen-Image-fp8-static --activation-scheme static --calibration scales.safetensors
    """
    from .check import check
    from .report import plan_text

    config = _config(preset, ignored_layers, weight_block_size, activation_scheme, weight_strategy, calibration,
                     static_ignored_layers)
    limit = parse_size(max_shard_size)
    source = open_source(src, subfolder=subfolder, revision=revision, token=token)
    source = source.component_only() if subfolder else source
    with fetching(source, target=target, progress=not quiet):
        plan = make_plan(source, config, dtype=_torch_dtype(dtype), target=target)
        if not quiet and not as_json:
            click.echo(plan_text(plan, table=False), err=True)
        result = execute(plan, out, max_shard_size=limit, force=force, progress=not quiet)
    vllm = None
    # No folder of ours may be mis-loaded by vllm-omni without a word (static ones are for omni-fp8 only).
    if target == DEFAULT_TARGET and config.activation_scheme == "dynamic":
        report = check(result.output, "vllm-omni")
        vllm = {"loadable": report.ok, "problems": report.problems,
                "fix": None if report.ok else _vllm_fix(plan)}
    if as_json:
        _emit_json({**result.to_dict(), **({"vllm_omni": vllm} if vllm else {})})
        return
    click.echo(result.summary_line())
    if vllm and not vllm["loadable"]:
        click.echo(f"note: vllm-omni would not load this folder correctly as written ({len(report.problems)} "
                   f"problem(s), first: {report.problems[0]}); convert with {vllm['fix']} for a folder it "
                   f"loads (omni-convert check {out} --target vllm-omni lists them).", err=True)


def _vllm_fix(plan: Any) -> str:
    """The flags that make a folder vllm-omni loads (it holds no per-row scales)."""
    return "--target vllm-omni" + (" --weight-strategy tensor" if plan.config.weight_strategy == "channel" else "")


@main.command()
@click.argument("path")
@_plan_options
@static_options
@_hub_options
@click.option("--config", "model_config", metavar="PATH",
              help="For a single .safetensors file: the model's config.json or its folder.")
@_fail_cleanly
def inspect(path: str, preset: str | None, ignored_layers: tuple[str, ...], weight_block_size: str | None,
            weight_strategy: str | None, activation_scheme: str, dtype: str, target: str, as_json: bool,
            calibration: str | None, static_ignored_layers: tuple[str, ...], subfolder: str | None,
            revision: str | None, token: str | None, model_config: str | None) -> None:
    """Show the plan for a source (folder or Hub repo id), or summarise an FP8 checkpoint.

    For a source: what would be quantized, what kept and why, and the sizes before and after.
    For a converted folder (it has fp8_manifest.json): what it holds and how it was made. For
    another tool's FP8 checkpoint (vLLM fp8, compressed-tensors, ModelOpt; ComfyUI or BFL fp8r
    single files with --config): its layout, as load_transformer reads it. A Hub repo is read from
    its configs and shard headers alone: no shard is downloaded.
    """
    from pathlib import Path

    from .layouts import read_layout
    from .plan import model_structure
    from .report import layout_json, layout_text, plan_json, plan_text, source_label

    folder = Path(path)
    plan_flags = {"--preset": preset, "--ignored-layers": ignored_layers, "--weight-block-size": weight_block_size,
                  "--weight-strategy": weight_strategy, "--activation-scheme": activation_scheme != "dynamic",
                  "--calibration": calibration, "--static-ignored-layers": static_ignored_layers,
                  "--dtype": dtype != "keep", "--target": target != DEFAULT_TARGET}
    if (folder / MANIFEST_NAME).is_file() and subfolder is None:
        _show_converted(folder, str(folder), plan_flags, as_json)
        return
    source = open_source(path, subfolder=subfolder, revision=revision, token=token, allow_quantized=True,
                         config=model_config)
    if (source.root / MANIFEST_NAME).is_file() and source.origin.get("type") == "hub":
        _show_converted(source.root, source_label(source.origin), plan_flags, as_json)
        return
    layout = read_layout(source, model_structure(source.class_name, source.config).linears)
    if layout is not None:
        _refuse_plan_flags(str(folder), "an FP8 checkpoint", plan_flags)
        if as_json:
            _emit_json(layout_json(source, layout))
        else:
            click.echo(layout_text(source, layout))
        return
    check_not_quantized(source)
    config = _config(preset, ignored_layers, weight_block_size, activation_scheme, weight_strategy, calibration,
                     static_ignored_layers)
    plan = make_plan(source, config, dtype=_torch_dtype(dtype), target=target)
    if as_json:
        _emit_json(plan_json(plan))
    else:
        click.echo(plan_text(plan))


def _refuse_plan_flags(label: str, what: str, flags: dict[str, Any]) -> None:
    """Options that shape a plan mean nothing for an FP8 checkpoint, shown as it was made
    (``flags``: each flag and whether, or with what, it was given)."""
    given = [flag for flag, value in flags.items() if value]
    if given:
        raise ConfigError(
            f"{label}: is {what}, shown as it was made; {', '.join(given)} only shape the plan "
            "for a high-precision source. Drop them, or inspect the source instead.")


def _show_converted(folder: Any, label: str, flags: dict[str, Any], as_json: bool) -> None:
    from .report import folder_json, folder_text

    _refuse_plan_flags(label, "a converted folder", flags)
    manifest = read_manifest(folder)
    if as_json:
        _emit_json(folder_json(label, manifest))
    else:
        click.echo(folder_text(label, manifest))


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
@click.option("--activation-scheme", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
              help="'static' (with --calibration): measure what static activations add per group, and suggest "
                   "--static-ignored-layers.")
@static_options
@_hub_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_fail_cleanly
def suggest_command(src: str, inputs_path: str | None, max_error: float, ignored_layers: tuple[str, ...],
                    weight_block_size: str | None, activation_scheme: str, calibration: str | None,
                    static_ignored_layers: tuple[str, ...], subfolder: str | None, revision: str | None,
                    token: str | None, as_json: bool, quiet: bool) -> None:
    """Measure each layer group's FP8 damage on recorded inputs and suggest --ignored-layers.

    Quantizes one group of Linears at a time (a block's attention, each MLP, the modulation, each
    embedder), replays the inputs, ranks the groups by how far the output moves, then keeps the
    worst ones in high precision until the error is within --max-error. With
    --activation-scheme static, each group is measured with static and with dynamic activations,
    ranked by what static adds, and the worst are suggested as --static-ignored-layers (dynamic).
    """

    from omni_fp8.runtime import load_transformer
    from omni_fp8.runtime.sensitivity import load_inputs, suggest


    if max_error != max_error:  # NaN passes every range check
        raise ConfigError("--max-error nan is not a number; give a bound such as 0.065.")
    source, path = _source_and_inputs(src, inputs_path, subfolder, revision, token,
                                      "suggest measures the high-precision checkpoint it came from")
    config = Fp8Config(preset="none", ignored_layers=ignored_layers, weight_block_size=weight_block_size,
                       activation_scheme=activation_scheme, calibration=calibration,
                       static_ignored_layers=static_ignored_layers)
    if activation_scheme == "static" and calibration is None:
        raise ConfigError("suggest --activation-scheme static needs --calibration FILE (omni-convert calibrate).")
    calls = load_inputs(path)  # before the model: a bad inputs file should not cost a load
    # A Hub source at the commit just opened, even if its branch moves meanwhile.
    pinned = source.origin["commit"] if source.origin.get("type") == "hub" else revision
    model = load_transformer(src, subfolder=subfolder, revision=pinned, token=token, progress=not quiet)
    report = suggest(model, calls, config, max_error=max_error, progress=not quiet)
    patterns = [*config.ignored_layers, *report.ignored_layers]
    dynamic = [*config.static_ignored_layers, *(report.static_ignored_layers or [])]
    if as_json:
        _emit_json({**report.to_dict(), "patterns": patterns,
                    **({"static_patterns": dynamic} if activation_scheme == "static" else {})})
        return
    click.echo(report.table())
    flag = f" --ignored-layers {','.join(patterns)}" if patterns else ""
    if activation_scheme == "static":
        flag += f" --activation-scheme static --calibration {calibration}"
        flag += f" --static-ignored-layers {','.join(dynamic)}" if dynamic else ""
    block = f" --weight-block-size {weight_block_size}" if weight_block_size else ""
    hub_flags = "".join(f" --{name} {value}" for name, value in (("subfolder", subfolder), ("revision", revision))
                        if value)
    click.echo(f"\nomni-convert convert {src} OUT --preset none{flag}{block}{hub_flags}")


@main.command(name="calibrate")
@click.argument("src")
@click.option("--inputs", "inputs_path", metavar="FILE",
              help="Recorded transformer inputs (omni_fp8.save_inputs), every step you want covered. Default: "
                   "sample_inputs.safetensors beside the transformer's weights.")
@click.option("--output", "-o", "output", required=True, metavar="FILE",
              help="The calibration file to write (.safetensors); pass it to convert --calibration.")
@click.option("--statistic", default=None, metavar="STAT",
              help="'max' (the largest |x| over every call) or a per-call percentile such as 'p99.99' "
                   "(default: max, chosen on the quality lab).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="The compute dtype the model runs in while observed (as it will run).")
@click.option("--device", default="cpu", show_default=True, help="Where the model runs (cuda on a GPU machine).")
@_hub_options
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is an earlier calibration file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_fail_cleanly
def calibrate_command(src: str, inputs_path: str | None, output: str, statistic: str | None, dtype: str, device: str,
                      subfolder: str | None, revision: str | None, token: str | None, force: bool, as_json: bool,
                      quiet: bool) -> None:
    """Record every Linear's activation range on recorded inputs, for --activation-scheme static.

    Replays the inputs through the high-precision transformer of SRC and keeps, per Linear, the
    statistic of its input over every call (a running value: activations are never stored).

    \b
    omni-convert calibrate ./Qwen-Image --inputs qwen-inputs.safetensors --output scales.safetensors
    omni-convert convert ./Qwen-Image ./Qwen-Image-fp8-static --activation-scheme static --calibration scales.safetensors
    """
    from pathlib import Path

    from omni_fp8.runtime import load_transformer
    from omni_fp8.runtime.calibration import calibrate, inputs_sha256
    from omni_fp8.runtime.sensitivity import load_inputs

    from .calibration_file import DEFAULT_STATISTIC, Calibration, parse_statistic
    from .errors import CorruptCheckpointError, OutputExistsError, SourceNotFoundError

    statistic = parse_statistic(statistic or DEFAULT_STATISTIC)
    out = Path(output)
    if out.exists():
        try:
            ours = out.is_file() and Calibration.load(out) is not None
        except (CorruptCheckpointError, SourceNotFoundError, OSError):
            ours = False
        if not (force and ours):
            raise OutputExistsError(
                f"{out}: exists; " + ("pass --force to replace this calibration file." if ours else
                                      "it is not a calibration file omni-fp8 wrote, so it is left as it is; choose "
                                      "another --output."), path=out)
    source, path = _source_and_inputs(src, inputs_path, subfolder, revision, token,
                                      "calibrate the high-precision checkpoint it came from")
    calls = load_inputs(path)
    pinned = source.origin["commit"] if source.origin.get("type") == "hub" else revision
    model = load_transformer(src, subfolder=subfolder, revision=pinned, token=token, dtype=dtype, device=device,
                             progress=not quiet)
    result = calibrate(model, calls, statistic=statistic, inputs_sha256=inputs_sha256(path), progress=not quiet)
    result.save(out)
    unusable = {n: v for n, v in result.amax.items() if not (v > 0 and v != float("inf"))}
    never = [n for n in result.in_features if n not in result.amax]
    summary = {"output": str(out), "class_name": result.class_name, "statistic": statistic, "calls": result.calls,
               "linears": len(result.amax), "never_ran": never, "unusable_amax": unusable,
               "inputs_sha256": result.inputs_sha256}
    if as_json:
        _emit_json(summary)
        return
    values = sorted(v for v in result.amax.values() if v > 0 and v != float("inf"))
    span = f", amax {values[0]:.4g} to {values[-1]:.4g}" if values else ""
    click.echo(f"{out}: {len(result.amax)} Linears of {result.class_name} over {result.calls} calls "
               f"({statistic}{span})")
    for name, value in unusable.items():
        click.echo(f"note: {name} has amax {value!r} (no static scale): keep it dynamic with --static-ignored-layers "
                   f"{name}", err=True)
    if never:
        click.echo(f"note: {len(never)} Linear(s) never ran ({never[0]}): static needs them in "
                   "--static-ignored-layers or kept with --ignored-layers", err=True)
    click.echo(f"\nomni-convert convert {src} OUT --activation-scheme static --calibration {out}")


@main.command()
@click.argument("folder")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", metavar="BRANCH", help="Branch to push to, created from main if missing (default: main).")
@click.option("--commit-message", metavar="TEXT", help="Default: 'Upload FP8 weights (omni-fp8)'.")
@click.option("--token", metavar="TOKEN", help="A token with write access (default: HF_TOKEN, or the login "
                                               "`hf auth login` saved).")
@click.option("--dry-run", is_flag=True, help="Verify, write the model card, list what would be uploaded; upload "
                                              "nothing.")
@click.option("--overwrite-card", is_flag=True, help="Replace a README.md that omni-fp8 did not write.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_fail_cleanly
def push(folder: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
         token: str | None, dry_run: bool, overwrite_card: bool, as_json: bool, quiet: bool) -> None:
    """Verify a converted FOLDER, write its model card, and upload it to the Hub repo REPO_ID.

    Only the files its manifest lists are sent, in one commit; running it again after a failure
    sends only what is missing. A README.md you wrote is kept unless --overwrite-card.

    \b
    omni-convert push ./Qwen-Image-fp8 my-org/Qwen-Image-FP8 --dry-run
    omni-convert push ./Qwen-Image-fp8 my-org/Qwen-Image-FP8 --private
    """
    from .push import push as push_folder
    from .report import size_text

    result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                         token=token, dry_run=dry_run, overwrite_card=overwrite_card, progress=not quiet)
    if as_json:
        _emit_json(result.to_dict())
        return
    if not quiet:
        if dry_run:
            for rel in result.files:
                click.echo(f"  {rel}  {size_text((result.folder / rel).stat().st_size)}")
        who = "written by omni-fp8" if result.card == "written" else "yours, kept (--overwrite-card replaces it)"
        click.echo(f"Model card: README.md, {who}")
    click.echo(result.summary_line())


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

def _source_and_inputs(src: str, inputs_path: str | None, subfolder: str | None, revision: str | None,
                       token: str | None, instead: str) -> tuple[Any, Any]:
    """A high-precision source and the recorded inputs to replay on it (``--inputs``, else the
    source's own ``sample_inputs.safetensors``: a Hub repo may ship them beside the weights)."""
    from pathlib import Path

    from .errors import SourceNotFoundError, UnsupportedSourceError

    source = open_source(src, subfolder=subfolder, revision=revision, token=token, allow_quantized=True)
    if "quantization_config" in source.config:
        raise UnsupportedSourceError(f"{source.model_dir}: already quantized; {instead}.", path=source.model_dir)
    path = Path(inputs_path) if inputs_path else source.model_dir / _INPUTS_NAME
    if not inputs_path and source.files.exists(path):
        path = source.files.fetch(path)
    if not path.is_file():
        raise SourceNotFoundError(
            f"{path}: no recorded inputs; record the transformer's inputs during a pipeline run with "
            "omni_fp8.record_inputs and save_inputs, then pass --inputs FILE.", path=path)
    return source, path


if __name__ == "__main__":
    main()
