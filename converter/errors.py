"""Every error omni-fp8 raises on purpose.

Each class also inherits the builtin a caller would naturally catch (``FileNotFoundError``,
``ValueError``, ...), so ``except ValueError`` written before omni-fp8 existed keeps working.
Messages are one line: what failed, where (the file or tensor), why, and the fix. The CLI prints
them as they are, without a traceback.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "OmniFp8Error",
    "SourceNotFoundError",
    "UnsupportedSourceError",
    "PickleCheckpointError",
    "CorruptCheckpointError",
    "CorruptScaleError",
    "SourceReadError",
    "ModelMismatchError",
    "ConfigError",
    "PatternMatchError",
    "CalibrationError",
    "NonFiniteWeightError",
    "DtypeRangeError",
    "OutputExistsError",
    "OutputWriteError",
    "VerificationError",
    "HubAccessError",
    "HubConnectionError",
]


class OmniFp8Error(Exception):
    """Base class: every deliberate omni-fp8 failure. ``path`` names the file involved, if any."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class SourceNotFoundError(OmniFp8Error, FileNotFoundError):
    """The source folder, its config.json or a shard its index names does not exist."""


class UnsupportedSourceError(OmniFp8Error, ValueError):
    """The source exists but is not something we convert (layout, class, already FP8)."""


class PickleCheckpointError(UnsupportedSourceError):
    """A ``.bin``/``.pt``/``.ckpt`` checkpoint: we never unpickle, it can run arbitrary code."""


class CorruptCheckpointError(OmniFp8Error, ValueError):
    """A safetensors file or index that is truncated, malformed or inconsistent."""


class CorruptScaleError(CorruptCheckpointError):
    """A stored FP8 scale that is not finite and positive, or an FP8 weight holding NaN codes."""


class SourceReadError(OmniFp8Error, OSError):
    """Reading the source failed part-way (an I/O error, a file that vanished)."""


class ModelMismatchError(OmniFp8Error, ValueError):
    """The checkpoint's tensors do not fit the model class its config.json names."""


class ConfigError(OmniFp8Error, ValueError):
    """An option that is unknown, malformed or not supported (yet)."""


class PatternMatchError(ConfigError):
    """An ``ignored_layers`` pattern that matches no Linear layer of the model."""


class CalibrationError(OmniFp8Error, ValueError):
    """Static activation scales cannot be made from this calibration (missing, foreign, zero amax)."""


class NonFiniteWeightError(OmniFp8Error, ValueError):
    """A weight holds NaN or Inf: no finite FP8 scale exists for it."""


class DtypeRangeError(OmniFp8Error, ValueError):
    """A requested cast would turn finite values into inf (e.g. 1e6 to float16)."""


class OutputExistsError(OmniFp8Error, FileExistsError):
    """The output folder exists (and ``force`` was not given) or overlaps the source."""


class OutputWriteError(OmniFp8Error, OSError):
    """Writing the output failed (disk full, file size limit, permissions); nothing was published."""


class VerificationError(OmniFp8Error, ValueError):
    """A converted folder no longer matches its manifest."""


class HubAccessError(OmniFp8Error, PermissionError):
    """The Hub refused: a gated or private repo without a usable token, or no write access for a push."""


class HubConnectionError(OmniFp8Error, ConnectionError):
    """The Hub could not be reached (or ``HF_HUB_OFFLINE`` is set) and the cache does not have what is needed."""
