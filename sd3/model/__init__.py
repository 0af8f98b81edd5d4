"""The MMDiT network (ARCHITECTURE §2): `build_model(cfg.model) -> MMDiT`."""

from __future__ import annotations

from sd3.config import ModelConfig
from sd3.model.mmdit import MMDiT


def build_model(cfg: ModelConfig) -> MMDiT:
    """A freshly initialised MMDiT for `cfg` (build under `torch.device("meta")` to size it without memory)."""
    return MMDiT(cfg)


__all__ = ["MMDiT", "build_model"]
