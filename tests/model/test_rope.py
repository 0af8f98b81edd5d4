import pytest
import torch

from model.tiny import make_inputs, tiny_config
from sd3.model import block, build_model
from sd3.model.rope import Rope1d, Rope2d, Rope2dV2


def captured_qk(model, inputs, monkeypatch):
    """The q and k every block hands to the attention kernel: [(q, k), ...] in (B, S, H, Dh)."""
    seen = []
    original = block.attention

    def spy(q, k, v, *args):
        seen.append((q.detach().clone(), k.detach().clone()))
        return original(q, k, v, *args)

    monkeypatch.setattr(block, "attention", spy)
    model(*inputs)
    monkeypatch.setattr(block, "attention", original)
    return seen


@pytest.mark.parametrize("kind", ["RoPE2d", "RoPE", "RoPE2dV2"])
def test_rope_touches_image_qk_only(monkeypatch, kind):
    """Same weights with and without RoPE: the first block's text queries and keys are identical, image ones are not."""
    torch.manual_seed(0)
    with_rope = build_model(tiny_config(positional_encoding=kind))
    without = build_model(tiny_config(positional_encoding="NoPE"))
    without.load_state_dict(with_rope.state_dict())
    inputs = make_inputs(with_rope.cfg, 2, 6, 4)
    n = 3 * 2  # image tokens of a 6x4 latent with patch 2
    (q_r, k_r), (q_n, k_n) = (captured_qk(m, inputs, monkeypatch)[0] for m in (with_rope, without))
    assert torch.equal(q_r[:, n:], q_n[:, n:]) and torch.equal(k_r[:, n:], k_n[:, n:])
    # Token 0 sits at row 0, column 0: rotation by angle 0 leaves it alone; every other image token moves.
    assert torch.allclose(q_r[:, 0], q_n[:, 0]) and torch.allclose(k_r[:, 0], k_n[:, 0])
    for i in range(1, n):
        assert not torch.allclose(q_r[:, i], q_n[:, i]) and not torch.allclose(k_r[:, i], k_n[:, i])


@pytest.mark.parametrize("position_scale", [1.0, 4.0])
def test_logits_depend_only_on_relative_position(position_scale):
    """q at (r1, c1) and k at (r2, c2) give the same logit as at (r1+a, c1+b) and (r2+a, c2+b)."""
    h, w, head_dim = 9, 11, 16
    rope = Rope2d(head_dim, position_scale)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)

    def logit(pos_q, pos_k):
        grid = torch.zeros(2, h * w, 1, head_dim, dtype=torch.float64)  # (2, N, 1, Dh): q in batch 0, k in batch 1
        grid[0, pos_q[0] * w + pos_q[1], 0] = q
        grid[1, pos_k[0] * w + pos_k[1], 0] = k
        rotated = rope(grid, rope.tables(h, w))
        return (rotated[0, pos_q[0] * w + pos_q[1], 0] @ rotated[1, pos_k[0] * w + pos_k[1], 0]).item()

    base = logit((1, 2), (3, 1))
    for a, b in [(2, 3), (5, 0), (0, 7), (4, 5)]:
        assert logit((1 + a, 2 + b), (3 + a, 1 + b)) == pytest.approx(base, abs=1e-5)  # tables are fp32
    assert logit((1, 2), (3, 2)) != pytest.approx(base, abs=1e-3)  # a different offset does change it


def test_rope_rotates_rows_in_first_half_and_columns_in_second():
    head_dim = 8
    rope = Rope2d(head_dim, 1.0)
    x = torch.ones(1, 2 * 2, 1, head_dim)
    out = rope(x, rope.tables(2, 2))[0, :, 0]  # (N, Dh), tokens (0,0) (0,1) (1,0) (1,1)
    torch.testing.assert_close(out[1, : head_dim // 2], x[0, 1, 0, : head_dim // 2])  # column move: row half untouched
    assert not torch.allclose(out[1, head_dim // 2 :], x[0, 1, 0, head_dim // 2 :])
    torch.testing.assert_close(out[2, head_dim // 2 :], x[0, 2, 0, head_dim // 2 :])  # row move: column half untouched
    assert not torch.allclose(out[2, : head_dim // 2], x[0, 2, 0, : head_dim // 2])


def test_positions_are_divided_by_max_res_over_max_res_orig():
    """At max_res 512 from 256, patch (2, 4) gets the angles patch (1, 2) had at 256."""
    fine, base = Rope2d(16, 512 / 256), Rope2d(16, 1.0)
    cos_fine, sin_fine = fine.tables(8, 8)
    cos_base, sin_base = base.tables(8, 8)
    torch.testing.assert_close(cos_fine[2 * 8 + 4], cos_base[1 * 8 + 2])
    torch.testing.assert_close(sin_fine[2 * 8 + 4], sin_base[1 * 8 + 2])


def test_rope1d_rotates_in_raster_order_and_is_relative():
    rope = Rope1d(8, 1.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, generator=g, dtype=torch.float64)
    h, w = 3, 4  # 12 tokens in raster order: (1, 0) is position 4

    def logit(i, j):
        grid = torch.zeros(2, h * w, 1, 8, dtype=torch.float64)
        grid[0, i, 0], grid[1, j, 0] = q, k
        out = rope(grid, rope.tables(h, w))
        return (out[0, i, 0] @ out[1, j, 0]).item()

    assert logit(1, 3) == pytest.approx(logit(5, 7), abs=1e-5) == pytest.approx(logit(8, 10), abs=1e-5)
    assert logit(1, 3) != pytest.approx(logit(1, 4), abs=1e-3)


def test_rope2d_v2_is_a_rotation_of_triples_matching_the_spec_matrix():
    """Each triple is multiplied by M = R_z(θ)·R_x(α) (θ = row·ω, α = col·ω); the leftover channel passes through."""
    head_dim, h, w = 7, 3, 5  # two triples + one untouched channel
    rope = Rope2dV2(head_dim, 2.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, h * w, 1, head_dim, generator=g, dtype=torch.float64)
    out = rope(x, rope.tables(h, w))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # rotations keep lengths
    torch.testing.assert_close(out[..., 6], x[..., 6])
    n, j = 2 * w + 3, 1  # row 2, column 3, the second triple
    omega = 10000 ** (-3 * j / 6)
    theta, alpha = (torch.tensor(pos / 2.0 * omega, dtype=torch.float64) for pos in (2, 3))  # scale 2
    rz = torch.tensor([[theta.cos(), -theta.sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, alpha.cos(), -alpha.sin()], [0, alpha.sin(), alpha.cos()]], dtype=torch.float64)
    torch.testing.assert_close(out[0, n, 0, 3:6], (rz @ rx) @ x[0, n, 0, 3:6], rtol=1e-5, atol=1e-6)
