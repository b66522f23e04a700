"""File names of the diffusers layout and of omni-fp8's own files.

Kept apart so that the local source (``source.py``), the Hub source (``hub.py``) and the
writers agree on every name without importing each other.
"""

from __future__ import annotations

__all__ = [
    "CONFIG_NAME",
    "MODEL_INDEX_NAME",
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "CARD_NAME",
    "PICKLE_SUFFIXES",
    "TRANSFORMER_COMPONENT",
]

CONFIG_NAME = "config.json"
MODEL_INDEX_NAME = "model_index.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
MANIFEST_NAME = "fp8_manifest.json"
CARD_NAME = "README.md"  # the model card, as the Hub reads it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TRANSFORMER_COMPONENT = "transformer"
