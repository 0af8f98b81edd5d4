import logging
import math
from types import SimpleNamespace

import pytest
import torch

from model.tiny import make_inputs, tiny_config
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
    return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 1, 1, 8))


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


def test_cosine_equals_plain_math():
    """The source's cosine attention written out per query: Σ_j (q̂_i·k̂_j) v_j / L^σ(a_h), no row normalisation."""
    g = torch.Generator().manual_seed(0)
    B, Sq, Sk, H, dqk, dv = 2, 7, 9, 3, 4, 8
    q, k = torch.randn(B, Sq, H, dqk, generator=g), torch.randn(B, Sk, H, dqk, generator=g)
    v = torch.randn(B, Sk, H, dv, generator=g)
    norm_const = torch.tensor([0.5, -1.0, 2.0])
    expected = torch.zeros(B, Sq, H, dv)
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                qi = q[b, i, h] / q[b, i, h].norm()
                for j in range(Sk):
                    kj = k[b, j, h] / k[b, j, h].norm()
                    expected[b, i, h] += (qi @ kj) * v[b, j, h]
            expected[b, :, h] /= Sk ** torch.sigmoid(norm_const[h])
    out = attn.attention(q, k, v, "auto", kind="cosine", norm_const=norm_const)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_narrow_qk_keeps_the_value_head_scale():
    """qk_half_dim: softmax scale stays Dv^-½ (the source's), not Dqk^-½; flash is not picked for unequal dims."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 5, 3, 4, generator=g)
    v = torch.randn(2, 5, 3, 8, generator=g)
    torch.testing.assert_close(attn.attention(q, k, v, "sdpa"), attn.reference_softmax(q, k, v, 8**-0.5))


def test_unequal_head_dims_never_pick_flash(pretend):
    pretend(flash=True, xformers=True)
    q = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(2, 5, 3, 4))
    assert attn.resolve_backend("auto", q, 8) == "sdpa"
    assert attn.resolve_backend("auto", q, 4) == "flash"


@pytest.mark.parametrize("change, message", [
    ({"qk_half_dim": True, "attention_backend": "flash"}, "needs equal q/k and v head dims"),
    ({"attention": "cosine", "attention_backend": "sdpa"}, "linear attention"),
])
def test_impossible_forced_backend_is_a_build_error(pretend, change, message):
    pretend(flash=True, xformers=True)
    with pytest.raises(RuntimeError, match=message):
        build_model(tiny_config(**change))


def test_gpu_ready_empty_batch_never_reaches_flash(pretend, monkeypatch):
    """Issue 18 item 6: flash-attn rejects batch 0, and an all-skipped step sends one. A strict fake flash kernel
    raises on B = 0; the model still runs forward and backward, and every weight gets a (zero) gradient, which
    DDP needs from every rank."""
    calls = []

    def strict_flash(q, k, v, scale):
        if q.shape[0] == 0:
            raise RuntimeError("flash_attn: batch size must be positive")
        calls.append(q.shape[0])
        return attn.sdpa(q, k, v, scale)

    pretend(flash=True, xformers=False)
    monkeypatch.setitem(attn.KERNELS, "flash", strict_flash)
    cfg = tiny_config(attention_backend="flash")
    model = build_model(cfg)
    for batch in (2, 0):
        model.zero_grad(set_to_none=True)
        x, t, context, pooled = make_inputs(cfg, batch, 4, 4)
        out = model(x, t, context, pooled)
        assert out.shape == x.shape
        (out.float().sum() * 0.0).backward()
        assert all(p.grad is not None for p in model.parameters())
    assert calls == [2] * cfg.num_blocks  # the B = 2 pass used the (fake) flash kernel in every block
