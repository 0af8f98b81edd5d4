"""Loader-side frozen encoders: text (Gemma-2, ModernBERT, Meta-CLIP), the VAE, the conditioner, tiny offline models.

Names are imported lazily (transformers/diffusers are heavy): `from sd3.encoders import Conditioner` loads only
what it needs, and `sd3.encoders.hub` stays importable without a model.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TextEncoders": "sd3.encoders.text",
    "LatentVAE": "sd3.encoders.vae",
    "Conditioner": "sd3.encoders.conditioner",
    "EncoderLoadError": "sd3.encoders.hub",
    "make_tiny": "sd3.encoders.tiny",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sd3.encoders' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
