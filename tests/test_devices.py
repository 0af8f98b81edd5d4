"""`auto` precision: bf16 only where the device computes bf16 in hardware, read from the CPU's flags."""

import pytest
import torch

from sd3 import devices
from sd3.train.step import resolve_precision

X86_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n\nprocessor\t: 1\nflags\t: fpu\n"
X86_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("text, flags", [(X86_NO_BF16, set()), (X86_BF16, {"avx512_bf16", "amx_bf16"}),
                                         (ARM_BF16, {"bf16"})])
def test_bf16_flags_are_read_from_cpuinfo(tmp_path, text, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert devices.cpu_bf16_flags(str(path)) == flags


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert devices.cpu_bf16_flags(str(tmp_path / "absent")) == frozenset()


@pytest.mark.parametrize("flags, expected", [(frozenset(), "fp32"), (frozenset({"avx512_bf16"}), "bf16")])
def test_auto_precision_follows_the_cpu(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: flags)
    assert devices.resolve_precision_name("auto", "cpu") == expected
    precision = resolve_precision("auto", torch.device("cpu"))  # what the trainer calls
    assert precision.name == expected
    assert precision.autocast_dtype == (torch.bfloat16 if expected == "bf16" else None)


def test_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: frozenset())
    assert devices.resolve_precision_name("bf16", "cpu") == "bf16"
    assert devices.resolve_precision_name("fp16", "cpu") == "fp16"
