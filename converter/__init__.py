"""The converter: source -> plan -> FP8 numerics -> shards, index and manifest.

Each stage is one module: ``source`` (folders, the Hugging Face cache, header validation),
``hub`` (Hugging Face Hub repos through the Hub cache), ``plan`` (which tensors, which scheme, why), ``numerics`` (the only FP8 math), ``writer``
(streamed shards, index), ``manifest`` (what was written, and ``verify``), ``output`` (what may be
replaced, staging, atomic publish), ``convert`` (the job), ``push`` and ``model_card`` (a converted
folder to the Hub), ``cli`` (``omni-convert``).
"""

from .convert import ConversionResult, convert
from .errors import OmniFp8Error
from .manifest import read_manifest, verify
from .options import Fp8Config
from .plan import Plan, make_plan
from .push import PushResult, push
from .source import Source, open_source

__all__ = [
    "Fp8Config",
    "convert",
    "ConversionResult",
    "open_source",
    "Source",
    "make_plan",
    "Plan",
    "read_manifest",
    "verify",
    "push",
    "PushResult",
    "OmniFp8Error",
]
