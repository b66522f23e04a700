"""A calibration: each Linear's activation amax over a recorded run, and the file that holds it.

Static activation scales (``activation_scheme: "static"``) come from here. ``runtime.calibrate``
observes every Linear's input over recorded transformer calls and returns a ``Calibration``; the
converter and the loader only read one (this module has no runtime imports), turning each amax into
an ``input_scale`` with ``numerics.activation_scale``.

The file is safetensors: ``"{module}.input_amax"`` (float32, 0-dim) for every Linear that ran, and
under the metadata key ``"omni-fp8-calibration"`` a JSON object with ``format_version``, the
model's ``class_name``, every Linear's ``in_features`` (so a calibration made for another model
is refused by name or shape), the ``statistic``, the number of ``calls`` and, when the calls came
from a file, that file's SHA-256 (``inputs_sha256``).

    >>> cal = Calibration.load("scales.safetensors")  # doctest: +SKIP
    >>> cal.input_scale("transformer_blocks.0.attn.to_q")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationError, ConfigError, CorruptCheckpointError, SourceNotFoundError
from .numerics import activation_scale

__all__ = ["Calibration", "CALIBRATION_FORMAT", "DEFAULT_STATISTIC", "parse_statistic", "AMAX_SUFFIX"]

CALIBRATION_FORMAT = "omni-fp8-calibration"
CALIBRATION_VERSION = 1
AMAX_SUFFIX = ".input_amax"
# The statistic a calibration takes by default. Chosen on the quality lab (bench/RESULTS.md,
# "Static activation scales", and the deep lab): the running max passed the gate on held-out seeds
# and classes, better than every percentile (p99.99 0.3-1 dB below it, p99.9 failing), and it
# never clips an activation that calibration saw.
DEFAULT_STATISTIC = "max"
_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


def parse_statistic(value: Any) -> str:
    """``"max"`` or a percentile of |x| per call, ``"p99.9"`` (then the max over calls)."""
    if isinstance(value, str):
        if value == "max":
            return value
        m = _PERCENTILE.fullmatch(value)
        if m and 0 < float(m.group(1)) < 100:
            return value
    raise ConfigError(f"unknown calibration statistic {value!r}; use 'max' or a percentile such as 'p99.99'.")


@dataclass(frozen=True, eq=False)
class Calibration:
    """Activation amax per Linear over a recorded run (see the module docstring).

    Attributes:
        amax: Linear module name -> the statistic of |input| (a float32 value) over every call.
        in_features: Every Linear of the calibrated model -> its input width.
        class_name: The calibrated model's class.
        statistic: ``"max"`` or ``"pNN.N"``.
        calls: How many transformer calls were observed.
        inputs_sha256: SHA-256 of the recorded-inputs file, when the calls came from one.
        path: The file it was read from, if any (error messages name it).
        sha256: That file's SHA-256.
    """

    amax: Mapping[str, float]
    in_features: Mapping[str, int]
    class_name: str
    statistic: str = DEFAULT_STATISTIC
    calls: int = 0
    inputs_sha256: str | None = None
    path: str | None = None
    sha256: str | None = field(default=None)

    @property
    def where(self) -> str:
        return self.path or "the calibration"

    def input_scale(self, module: str) -> torch.Tensor:
        """The static ``input_scale`` of ``module`` (0-dim float32), or one line saying why there is none."""
        if module not in self.amax:
            raise CalibrationError(
                f"{self.where}: no activation amax for {module} (it never ran during calibration); keep it dynamic "
                "with --static-ignored-layers, or calibrate on inputs that reach it.", path=self.path)
        return activation_scale(self.amax[module], name=f"{self.where}: {module}")

    def check_model(self, shapes: Mapping[str, tuple[int, int]], class_name: str, static: Iterable[str]) -> None:
        """Refuse a calibration made for another model: its Linears' names and input widths must be
        the model's, and every Linear that will be static must have been observed."""
        fix = "calibrate this model (omni-convert calibrate) and pass that file"
        if self.class_name != class_name:
            raise CalibrationError(
                f"{self.where}: calibrated on {self.class_name}, not {class_name}; {fix}.", path=self.path)
        foreign = [n for n in self.in_features if n not in shapes]
        if foreign:
            raise CalibrationError(
                f"{self.where}: names {len(foreign)} Linear(s) this {class_name} does not have ({foreign[0]}); "
                f"it was made for another model; {fix}.", path=self.path)
        for name in static:
            if name not in self.in_features:
                raise CalibrationError(
                    f"{self.where}: has no entry for {name}; it was made for another model; {fix}.", path=self.path)
            if self.in_features[name] != shapes[name][1]:
                raise CalibrationError(
                    f"{self.where}: {name} had {self.in_features[name]} input features when calibrated, this model's "
                    f"has {shapes[name][1]}; it was made for another model; {fix}.", path=self.path)

    def provenance(self) -> dict[str, Any]:
        """What the manifest records about where the static scales came from."""
        return {"file": Path(self.path).name if self.path else None, "sha256": self.sha256,
                "statistic": self.statistic, "calls": self.calls, "inputs_sha256": self.inputs_sha256,
                "class_name": self.class_name, "linears": len(self.amax)}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the calibration file (temp file, then renamed into place)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": CALIBRATION_FORMAT, "format_version": CALIBRATION_VERSION, "class_name": self.class_name,
                "statistic": self.statistic, "calls": self.calls, "inputs_sha256": self.inputs_sha256,
                "in_features": dict(self.in_features)}
        tensors = {f"{name}{AMAX_SUFFIX}": torch.tensor(value, dtype=torch.float32) for name, value in self.amax.items()}
        tmp = path.with_name(f".{path.name}.partial")
        try:
            save_file(tensors, os.fspath(tmp), metadata={CALIBRATION_FORMAT: json.dumps(meta, sort_keys=True)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read and check a calibration file; every problem is one line naming it."""
        from safetensors import safe_open

        from .safetensors_format import read_header

        path = Path(path).expanduser()
        if not path.is_file():
            raise SourceNotFoundError(
                f"{path}: no such calibration file; make one with omni-convert calibrate (or omni_fp8.calibrate).",
                path=path)
        header = read_header(path)

        def damaged(why: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(
                f"{path}: not an omni-fp8 calibration file ({why}); make one with omni-convert calibrate.", path=path)

        meta = header.json_metadata(CALIBRATION_FORMAT, damaged)
        if meta.get("format_version") != CALIBRATION_VERSION:
            raise CorruptCheckpointError(
                f"{path}: calibration format_version {meta.get('format_version')!r} is not {CALIBRATION_VERSION}; "
                "upgrade omni-fp8 or calibrate again.", path=path)
        in_features = meta.get("in_features")
        if not isinstance(in_features, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in in_features.items()):
            raise damaged("in_features is not a map of Linear names to widths")
        if not isinstance(meta.get("class_name"), str) or not isinstance(meta.get("calls"), int):
            raise damaged("class_name or calls is missing")
        try:
            statistic = parse_statistic(meta.get("statistic"))
        except ConfigError as e:
            raise damaged(f"statistic {meta.get('statistic')!r}") from e
        amax: dict[str, float] = {}
        with safe_open(os.fspath(path), "pt") as f:
            for key, info in header.tensors.items():
                module = key.removesuffix(AMAX_SUFFIX)
                if module == key or module not in in_features or info.dtype != "F32" or tuple(info.shape) not in ((), (1,)):
                    raise damaged(f"tensor {key!r} is not a float32 '<Linear>{AMAX_SUFFIX}' of a listed Linear")
                value = float(f.get_tensor(key).reshape(()))
                if value < 0:  # zero, inf and NaN are refused where a layer needs its scale, by name
                    raise damaged(f"{module} has a negative activation amax {value!r}")
                amax[module] = value
        return cls(amax=amax, in_features=in_features, class_name=meta["class_name"], statistic=statistic,
                   calls=meta["calls"], inputs_sha256=meta.get("inputs_sha256"), path=str(path),
                   sha256=_sha256(path))

    @classmethod
    def coerce(cls, value: Any) -> Calibration:
        """What ``Fp8Config(calibration=...)`` accepts: a ``Calibration`` or the path of a saved one."""
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, os.PathLike)) and str(value):
            return cls.load(value)
        raise ConfigError(
            f"calibration must be a Calibration (omni_fp8.calibrate) or the path of a calibration file, "
            f"got {type(value).__name__}.")


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            sha.update(chunk)
    return sha.hexdigest()
