"""The 1.2B MMDiT of the sd3-1b-256 preset at its real size (issue 14 item 6).

The whole model is only built on meta tensors (4.6 GB of fp32 weights, and forward+backward on meta is already
tests/model/test_mmdit.py::test_reference_size_runs_forward_and_backward_on_meta_and_fake_tensors); one block at
the real width runs on real CPU tensors, at a small image-token count but the real 2 x 77 text tokens.
"""

import pytest
import torch

from sd3.config_loader import load_config
from sd3.model import build_model
from sd3.model.block import JointBlock
from sd3.model.flops import count_parameters
from sd3.model.rope import make_rope

REAL_PARAMETERS = 1_249_899_331  # `sd3 info sd3-1b-256`, the source's "1.2B"


@pytest.fixture(scope="module")
def real_cfg():
    cfg = load_config("sd3-1b-256").model
    # The architecture these tests are about: if the preset changes, they must be looked at again.
    assert (cfg.num_blocks, cfg.dim, cfg.num_heads, cfg.mlp_type, cfg.hidden_scale) == (19, 1216, 19, "swiglu", 4.0)
    assert (cfg.text_tokens, cfg.text_dims, cfg.pooled_dim, cfg.in_channels) == (77, [2304, 1024], 768, 16)
    return cfg


@pytest.fixture(scope="module")
def meta_model(real_cfg):
    with torch.device("meta"):
        return build_model(real_cfg)


def test_real_size_mmdit_parameter_count_on_meta(meta_model):
    model = meta_model
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == REAL_PARAMETERS
    assert count_parameters(model, trainable_only=False) == REAL_PARAMETERS  # nothing in the model is frozen
    assert len(model.blocks) == 19 and model.blocks[-1].last and not model.blocks[-2].last


@pytest.mark.slow  # ~10-30 s on the shared 2-core machine
@pytest.mark.parametrize("last", [False, True], ids=["block", "last_block"])
def test_real_size_joint_block_forward_backward_on_cpu(real_cfg, meta_model, last):
    """One JointBlock at dim 1216, 19 heads, SwiGLU x4 (with the preset's RoPE2d and activation checkpointing),
    forward + backward under bf16 autocast as in training: every parameter gets a finite, non-zero gradient."""
    torch.manual_seed(0)
    head_dim = real_cfg.dim // real_cfg.num_heads  # 64
    rope = make_rope(real_cfg.positional_encoding, head_dim, 1.0)
    block = JointBlock(real_cfg, last=last, rope=rope)  # nn.Linear's default init: the gates are not zero
    assert block.checkpoint_attn and block.checkpoint_mlp
    B, h, w, L, D = 1, 4, 6, 2 * real_cfg.text_tokens, real_cfg.dim  # 24 image tokens (a 64x96 px image), 154 text
    x = torch.randn(B, h * w, D, requires_grad=True)  # (B, N, D)
    c = torch.randn(B, L, D, requires_grad=True)  # (B, L, D)
    y = torch.randn(B, D, requires_grad=True)  # (B, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_out, c_out = block(x, c, y, rope.tables(h, w))
        loss = x_out.float().square().mean() + (0 if last else c_out.float().square().mean())
    loss.backward()
    assert x_out.shape == (B, h * w, D)
    assert (c_out is None) == last and (last or c_out.shape == (B, L, D))
    assert torch.isfinite(loss)
    named = dict(block.named_parameters())
    # The same parameters as the 1.2B model's own block in this position (the first, or the final one).
    same = meta_model.blocks[-1 if last else 0]
    assert {n: p.shape for n, p in named.items()} == {n: p.shape for n, p in same.named_parameters()}
    assert sum(p.numel() for p in named.values()) > 39_000_000  # ~1/19 of the model: a real-width block
    for name, p in named.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    for name, t in (("x", x), ("y", y)) + ((("c", c),) if not last else ()):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, f"input {name}"
