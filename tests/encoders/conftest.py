"""Loaded tiny encoders, shared by this package's tests (loading is the slow part)."""

from __future__ import annotations

import pytest

from sd3.config import Config
from sd3.config_loader import load_config


@pytest.fixture(scope="session")
def tiny_cfg(tiny_models) -> Config:
    return load_config("tiny-cpu", tiny_models.overrides)


@pytest.fixture(scope="session")
def text_encoders(tiny_cfg):
    from sd3.encoders.text import TextEncoders

    return TextEncoders.load(tiny_cfg.encoders, tiny_cfg.model.text_tokens, "cpu")
