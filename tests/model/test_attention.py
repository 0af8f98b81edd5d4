import logging
import math
from types import SimpleNamespace

import pytest
import torch

from model.tiny import tiny_config
from sd3.model import attention as attn
from sd3.model import build_model


def reference_attention(q, k, v):
    """Softmax(QKᵀ/√d)·V written out by hand, (B, S, H, Dh) layout."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(dim=-1), v)


@pytest.mark.parametrize("sq, sk", [(24, 24), (16, 24)])
def test_sdpa_equals_plain_math_in_fp32(sq, sk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, sq, 3, 16, generator=g)
    k, v = torch.randn(2, 2, sk, 3, 16, generator=g)
    out = attn.attention(q, k, v, "sdpa")
    assert out.shape == q.shape
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=0)


@pytest.fixture
def pretend(monkeypatch):
    """Pretend flash-attn / xformers are (not) installed with CUDA, and forget which backends were logged."""
    monkeypatch.setattr(attn, "_logged", set())

    def set_available(flash: bool, xformers: bool) -> None:
        monkeypatch.setitem(attn.AVAILABLE, "flash", lambda: flash)
        monkeypatch.setitem(attn.AVAILABLE, "xformers", lambda: xformers)

    return set_available


def cuda_like(dtype):
    return SimpleNamespace(is_cuda=True, dtype=dtype)


def test_auto_dispatch_order(pretend):
    cpu = torch.zeros(1, dtype=torch.bfloat16)
    pretend(flash=True, xformers=True)
    assert attn.resolve_backend("auto", cuda_like(torch.bfloat16)) == "flash"
    assert attn.resolve_backend("auto", cuda_like(torch.float32)) == "xformers"  # flash-attn has no fp32 kernel
    assert attn.resolve_backend("auto", cpu) == "sdpa"  # neither runs on CPU tensors
    pretend(flash=False, xformers=True)
    assert attn.resolve_backend("auto", cuda_like(torch.bfloat16)) == "xformers"
    pretend(flash=False, xformers=False)
    assert attn.resolve_backend("auto", cuda_like(torch.bfloat16)) == "sdpa"
    assert attn.resolve_backend("xformers", cpu) == "xformers"  # forced is forced


@pytest.mark.parametrize("forced, package", [("flash", "flash-attn"), ("xformers", "xformers")])
def test_forcing_an_unavailable_backend_fails_at_build_time(pretend, forced, package):
    pretend(flash=False, xformers=False)
    with pytest.raises(RuntimeError, match=f"attention_backend='{forced}'.*{package}"):
        build_model(tiny_config(attention_backend=forced))


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="attention_backend 'cudnn'"):
        build_model(tiny_config(attention_backend="cudnn"))


def test_backend_logged_once(pretend, caplog):
    pretend(flash=False, xformers=False)
    q = torch.randn(1, 4, 2, 8)
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        for _ in range(3):
            attn.attention(q, q, q)
    assert [r.getMessage() for r in caplog.records] == ["attention backend: sdpa (requested auto, device cpu)"]


def test_model_reports_its_backend():
    assert build_model(tiny_config(attention_backend="sdpa")).attention_backend == "sdpa"
    assert build_model(tiny_config()).attention_backend == "sdpa"  # auto on CPU
