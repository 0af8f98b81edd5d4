"""Dtype and device names, as configs and the command line write them, -> torch objects. One place for all."""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def resolve_dtype(name: str | torch.dtype, key: str = "dtype") -> torch.dtype:
    """"bf16" (or "bfloat16", or a torch.dtype) -> torch.bfloat16; a ValueError naming `key` otherwise."""
    if isinstance(name, torch.dtype):
        return name
    short = ALIASES.get(name, name)
    if short not in DTYPES:
        raise ValueError(f"{key} '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[short]


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` = this process's GPU (LOCAL_RANK under torchrun, else the current CUDA device) when there is one, else cpu."""
    if isinstance(name, torch.device):
        return name
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())) % torch.cuda.device_count()
    return torch.device("cuda", index)
