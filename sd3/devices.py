"""Dtype and device names, as configs and the command line write them, -> torch objects. One place for all.

`auto` precision: bf16 where the device computes in bf16 natively, else fp32. A CPU without AVX512-BF16 or AMX
emulates bf16 matmuls through fp32 conversions and runs them 4-5x slower than fp32 (issue 17: 14-19 against
71-91 GFLOP/s on one thread), so there bf16 costs speed and buys nothing.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# /proc/cpuinfo flags of bf16 arithmetic in hardware: x86 AVX512-BF16 (Cooper Lake, Zen 4 ...) and AMX-BF16
# (Sapphire Rapids ...); aarch64 lists "bf16" (Armv8.6 BF16 instructions, Neoverse V1/N2, Graviton 3 ...).
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def resolve_dtype(name: str | torch.dtype, key: str = "dtype") -> torch.dtype:
    """"bf16" (or "bfloat16", or a torch.dtype) -> torch.bfloat16; a ValueError naming `key` otherwise."""
    if isinstance(name, torch.dtype):
        return name
    short = ALIASES.get(name, name)
    if short not in DTYPES:
        raise ValueError(f"{key} '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[short]


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` = this process's GPU (LOCAL_RANK under torchrun, else the current CUDA device) when there is one,
    else cpu."""
    if isinstance(name, torch.device):
        return name
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())) % torch.cuda.device_count()
    return torch.device("cuda", index)


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The bf16 flags this CPU reports (Linux /proc/cpuinfo); empty where the file does not exist (macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    words: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 | aarch64
            words.update(value.split())
    return frozenset(words & BF16_CPU_FLAGS)


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` computes in bf16 in hardware (CUDA compute capability >= 8, or a CPU with bf16 flags)."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


def resolve_precision_name(name: str, device: str | torch.device) -> str:
    """`auto` -> "bf16" where `device` runs bf16 natively, else "fp32"; any other name is returned unchanged."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "fp32"


def cpu_description() -> str:
    """One line naming this CPU's bf16 capability, for benchmark output: 'AVX512, bf16 flags: avx512_bf16'."""
    flags = ", ".join(sorted(cpu_bf16_flags())) or "none"
    return f"{torch.backends.cpu.get_cpu_capability()}, bf16 flags: {flags}"
