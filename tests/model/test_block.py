from types import SimpleNamespace

import pytest
import torch

from model.tiny import make_inputs, tiny_config
from sd3.model import block, build_model

ATTENTION = block.attention

def attention_shapes(model, inputs, monkeypatch):
    """(q, k, v) shapes every block hands to the attention dispatch."""
    seen = []

    def spy(q, k, v, *args):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return ATTENTION(q, k, v, *args)

    monkeypatch.setattr(block, "attention", spy)
    model(*inputs)
    return seen


def test_kv_merge_halves_the_key_length(monkeypatch):
    cfg = tiny_config(kv_merge_attn=True)
    inputs = make_inputs(cfg, 2, 4, 6)  # 2x3 = 6 image tokens, 2*5 = 10 text tokens
    plain = attention_shapes(build_model(tiny_config()), inputs, monkeypatch)
    merged = attention_shapes(build_model(cfg), inputs, monkeypatch)
    for (q0, k0, v0), (q1, k1, v1) in zip(plain, merged, strict=True):
        assert q1 == q0  # queries are not merged
        assert k1[1] == k0[1] // 2 == (6 + 10) // 2 and v1[1] == v0[1] // 2


def test_kv_merge_averages_adjacent_pairs():
    t = torch.arange(2 * 6 * 1 * 2, dtype=torch.float32).view(2, 6, 1, 2)
    merged = block.merge_pairs(t, "image")
    assert merged.shape == (2, 3, 1, 2)
    torch.testing.assert_close(merged[:, 1], (t[:, 2] + t[:, 3]) / 2)


def test_kv_merge_needs_even_token_counts():
    cfg = tiny_config(kv_merge_attn=True)
    x, t, context, pooled = make_inputs(cfg, 1, 6, 6)  # 3x3 = 9 image tokens
    with pytest.raises(ValueError, match="even number of image tokens, got 9"):
        build_model(cfg)(x, t, context, pooled)


def test_qk_half_dim_halves_qk_and_keeps_v(monkeypatch):
    cfg = tiny_config(qk_half_dim=True)  # dim 32, 4 heads: Dh 8, Dqk 4
    model = build_model(cfg)
    first = model.blocks[0]
    assert first.qkv_x.out_features == 2 * cfg.dim // 2 + cfg.dim
    assert first.q_norm_x.normalized_shape == (4,)
    assert model.blocks[-1].qkv_c.out_features == cfg.dim // 2 + cfg.dim  # last block: text k and v only
    for q, k, v in attention_shapes(model, make_inputs(cfg, 2, 4, 4), monkeypatch):
        assert q[-1] == k[-1] == 4 and v[-1] == 8 and q[2] == k[2] == v[2] == 4


def test_cosine_blocks_have_a_length_exponent_and_no_qk_norm():
    model = build_model(tiny_config(attention="cosine"))
    names = dict(model.named_parameters())
    assert names["blocks.0.norm_const"].tolist() == [0.5] * 4
    assert not any("q_norm" in n or "k_norm" in n for n in names)


def cuda_norm_policy(monkeypatch):
    """CUDA autocast's policy on CPU: rms_norm and layer_norm compute and return fp32 under autocast."""
    functional = torch.nn.functional
    rms, layer = functional.rms_norm, functional.layer_norm

    def fp32(fn):
        def run(x, shape, weight=None, *args, **kwargs):
            with torch.autocast("cpu", enabled=False):
                return fn(x.float(), shape, None if weight is None else weight.float(), *args, **kwargs)
        return run

    monkeypatch.setattr(functional, "rms_norm", fp32(rms))
    monkeypatch.setattr(functional, "layer_norm", fp32(layer))


def attention_dtypes(model, inputs, monkeypatch):
    seen = []

    def spy(q, k, v, *args):
        seen.append((q.dtype, k.dtype, v.dtype))
        return ATTENTION(q, k, v, *args)

    monkeypatch.setattr(block, "attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*inputs)
    return seen


def saved_attention_bytes(model, inputs, monkeypatch) -> int:
    """Bytes autograd saves inside the attention kernels in one bf16-autocast forward, each kernel run with
    autocast off: flash-attn and xformers are custom kernels autocast does not cast, so on CUDA they keep
    whatever dtype reaches them."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    def kernel(q, k, v, *args):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=False):
            return ATTENTION(q, k, v, *args)

    monkeypatch.setattr(block, "attention", kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*inputs)
    return total


def test_gpu_ready_attention_gets_the_autocast_dtype_under_cuda_norm_policy(monkeypatch):
    """Issue 18 item 2. Under CUDA's policy q/k leave the QK-norm in fp32; the block casts q/k/v to the autocast
    dtype, so the dispatch picks flash-attn for CUDA tensors and no fp32 copy is saved. The same run with the cast
    disabled shows what it fixes: fp32 reaches attention, flash is not picked, more bytes are saved."""
    from sd3.model import attention as attn

    cfg = tiny_config()
    model = build_model(cfg)
    inputs = make_inputs(cfg, 2, 8, 8)
    cuda_norm_policy(monkeypatch)
    monkeypatch.setitem(attn.AVAILABLE, "flash", lambda: True)
    fixed = attention_dtypes(model, inputs, monkeypatch)
    assert fixed and all(d == (torch.bfloat16,) * 3 for d in fixed)
    q = SimpleNamespace(is_cuda=True, dtype=fixed[0][0], shape=(2, 80, 4, 8))
    assert attn.resolve_backend("auto", q, 8) == "flash"
    bytes_fixed = saved_attention_bytes(model, inputs, monkeypatch)

    # The code before the fix: q/k stayed as the norm left them (fp32) and v was cast up to match (`v.to(q.dtype)`).
    monkeypatch.setattr(block, "to_autocast_dtype", lambda *tensors: tuple(t.float() for t in tensors))
    broken = attention_dtypes(model, inputs, monkeypatch)
    assert broken[0][0] == torch.float32
    q_broken = SimpleNamespace(is_cuda=True, dtype=broken[0][0], shape=q.shape)
    assert attn.resolve_backend("auto", q_broken, 8) != "flash"
    bytes_broken = saved_attention_bytes(model, inputs, monkeypatch)
    # bf16 instead of fp32 copies of q/k/v and the output (the kernel's fp32 softmax statistics stay fp32).
    assert bytes_broken > 1.8 * bytes_fixed, (bytes_fixed, bytes_broken)
