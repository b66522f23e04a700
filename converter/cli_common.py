"""What omni-fp8's command lines share: one-line errors, JSON output, the FP8 options.

``omni-convert`` (``converter/cli.py``) and ``omni-fp8`` (``runtime/cli.py``) take the same FP8
options, validated by the one ``Fp8Config``, and fail the same way: known errors print one line
(``error: <what, where, why, fix>``) and exit 1, ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import OmniFp8Error
from .options import Fp8Config
from .presets import available_presets

__all__ = ["fail_cleanly", "emit_json", "fp8_options", "static_options", "fp8_config"]


def fail_cleanly(command: Callable[..., Any]) -> Callable[..., Any]:
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


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def fp8_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``Fp8Config``'s options as flags: ``--preset``, ``--ignored-layers``, ``--weight-block-size``,
    ``--weight-strategy``, ``--activation-scheme``."""
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
        click.option("--weight-strategy", type=click.Choice(["tensor", "channel"]),
                     help="'channel': one weight scale per output row (compressed-tensors' channel strategy), "
                          "better quality at the same speed. Default: tensor (block with --weight-block-size)."),
        click.option("--activation-scheme", type=click.Choice(["dynamic", "static"]), default="dynamic",
                     show_default=True,
                     help="'static': one calibrated input scale per Linear (needs --calibration where it quantizes)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def static_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options of static activations: ``--calibration``, ``--static-ignored-layers``."""
    options = [
        click.option("--calibration", metavar="FILE",
                     help="With --activation-scheme static: the calibration file (omni-convert calibrate)."),
        click.option("--static-ignored-layers", "static_ignored_layers", multiple=True, metavar="PATTERNS",
                     help="With --activation-scheme static: FP8 layers whose activations stay dynamic (patterns as "
                          "for --ignored-layers)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def fp8_config(preset: str | None, ignored_layers: tuple[str, ...], weight_block_size: str | None,
               activation_scheme: str, weight_strategy: str | None = None, calibration: str | None = None,
               static_ignored_layers: tuple[str, ...] = ()) -> Fp8Config:
    return Fp8Config(
        ignored_layers=ignored_layers,
        activation_scheme=activation_scheme,
        weight_block_size=weight_block_size,
        preset=preset,
        weight_strategy=weight_strategy,
        calibration=calibration,
        static_ignored_layers=static_ignored_layers,
    )
