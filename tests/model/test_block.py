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
