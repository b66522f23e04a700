"""Black Forest Labs' ``fp8r`` single file, which stock diffusers reads without omni-fp8.

Read from diffusers 0.42.1: ``FromOriginalModelMixin.from_single_file`` with
``quantization_config=BFLQuantizationConfig()`` calls ``BFLQuantizer.maybe_update_state_dict``
(``quantizers/bfl/bfl_quantizer.py``), which takes every ``<layer>.weight_scale`` as marking an
FP8 Linear (``fp8r`` unless a ``weight_scale_2`` is there too), requires ``<layer>.weight`` to be
float8_e4m3fn ``[N, K]``, and dequantizes as ``weight * weight_scale[:, None]``: one float32 scale
per row, ``[N]``: per-channel scales are that layout exactly, and per-tensor scales repeated on
every row are it losslessly. Keys that
already equal the model's own skip the key conversion (``_should_convert_state_dict_to_diffusers``,
``loaders/single_file_model.py``), so diffusers' names load as they are for every class diffusers
can load from a single file.
"""

from __future__ import annotations

import torch

from .errors import UnsupportedSourceError
from .numerics import FP8_DTYPE
from .plan import KEPT, Plan
from .writer import FileTensor

__all__ = ["diffusers_layout", "single_file_classes"]


def single_file_classes() -> tuple[str, ...]:
    """The model classes this diffusers loads from one file (its ``SINGLE_FILE_LOADABLE_CLASSES``)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return tuple(SINGLE_FILE_LOADABLE_CLASSES)


def diffusers_layout(plan: Plan) -> list[FileTensor]:
    """Every tensor under its diffusers name; each FP8 weight followed by its per-row ``weight_scale``."""
    import diffusers

    class_name = plan.source.class_name
    if class_name not in single_file_classes():
        raise UnsupportedSourceError(
            f"diffusers {diffusers.__version__} cannot load {class_name} from a single file (from_single_file), so "
            "--target diffusers has nothing to write for it; convert to a folder (the default target) instead."
        )
    out: list[FileTensor] = []
    for t in plan.tensors:
        if t.scheme == KEPT:
            out.append(FileTensor(t.name, t.outputs[0].dtype, t.source.shape, (t,)))
            continue
        out.append(FileTensor(t.name, FP8_DTYPE, t.source.shape, (t,)))
        out.append(FileTensor(f"{t.name}_scale", torch.float32, (t.source.shape[0],), (t,), role="row_scale"))
    return out
