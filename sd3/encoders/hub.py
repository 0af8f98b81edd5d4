"""Loading frozen models from a hub id or a local folder: the hub token, dtype names, one-line errors.

The token is read from `.env` (python-dotenv, key HF_TOKEN) or the environment and handed to `from_pretrained`
as `token=`; it is never printed, logged or stored. `trust_remote_code` is never passed: every model used here
is a class that ships with transformers / diffusers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging
from dotenv import dotenv_values, find_dotenv
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
from transformers.utils import logging as hf_logging

from sd3 import devices
from sd3.errors import UserError


class EncoderLoadError(UserError, RuntimeError):
    """A frozen model that cannot be loaded. The message is one line naming the config key and the path or hub id."""


def hub_token() -> str | None:
    """HF_TOKEN from the `.env` found from the working directory upwards, else from the environment, else None."""
    env_file = find_dotenv(usecwd=True)
    token = dotenv_values(env_file).get("HF_TOKEN") if env_file else None
    return token or os.environ.get("HF_TOKEN") or None


def resolve_dtype(name: str) -> torch.dtype:
    """An encoder dtype name -> torch dtype; an unknown name is an EncoderLoadError like every other loading problem."""
    try:
        return devices.resolve_dtype(name)
    except ValueError as e:
        raise EncoderLoadError(str(e)) from None


def _is_gated(error: BaseException) -> bool:
    """Walk the exception chain: transformers wraps hub errors in OSError."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, GatedRepoError):
            return True
        if isinstance(seen, HfHubHTTPError) and seen.response is not None and seen.response.status_code in (401, 403):
            return True
        seen = seen.__cause__ or seen.__context__
    return "gated repo" in str(error)


@contextlib.contextmanager
def quiet_loading():
    """Loading a text tower out of a full checkpoint (CLIPModel, *ForCausalLM) lists every unused weight; that report
    and the per-file progress bars would bury the loader's own log lines, so they are silenced while loading."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    diffusers_verbosity = diffusers_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # e.g. "install accelerate for faster loading", irrelevant for frozen models
    diffusers_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        diffusers_logging.set_verbosity(diffusers_verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(load: Callable[..., Any], key: str, path: str, **kwargs: Any) -> Any:
    """`load(path, token=..., **kwargs)` (a `from_pretrained`), turning failures into one-line EncoderLoadErrors.

    `key` is the config key the path came from (e.g. "encoders.gemma"), so the message says what to fix.
    """
    token = hub_token()
    if token is not None:
        kwargs["token"] = token
    try:
        with quiet_loading():
            return load(path, **kwargs)
    except (OSError, ValueError, HfHubHTTPError) as e:
        if _is_gated(e):
            raise EncoderLoadError(
                f"{key}: '{path}' is a gated model this account may not read: accept its licence on the Hugging Face "
                "hub "
                "and put HF_TOKEN=<a read token> in .env"
            ) from None
        if not Path(path).exists():
            raise EncoderLoadError(
                f"{key}: '{path}' is neither a local folder nor a hub model that can be fetched "
                "(offline, or no such repo); set --" + key + "=PATH or run `sd3 make-tiny` for the tiny models"
            ) from None
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EncoderLoadError(f"{key}: cannot load '{path}': {first_line}") from None
