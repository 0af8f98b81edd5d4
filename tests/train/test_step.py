"""Per-block gradient and weight norms (sd3/train/step.py), the figures train.grad_norms_every logs."""

from __future__ import annotations

import torch
from torch import nn

from sd3.train.step import block_norms, block_of


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x_embed = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


def test_block_norms_are_the_l2_norms_of_each_blocks_gradients_and_weights():
    assert block_of("blocks.3.attn.qkv.weight") == "blocks.3" and block_of("x_embed.proj.weight") == "x_embed"
    model = Tiny()
    x = model.x_embed(torch.randn(5, 3))
    model.blocks[0](x).square().sum().backward()  # blocks.1 gets no gradient
    norms = block_norms(model)
    b0 = model.blocks[0]
    expected = torch.cat([b0.weight.grad.flatten(), b0.bias.grad.flatten()]).norm()
    assert torch.allclose(norms["grad_norm/blocks.0"], expected)
    weights_1 = torch.cat([p.flatten() for p in model.blocks[1].parameters()])
    assert torch.allclose(norms["weight_norm/blocks.1"], weights_1.norm())
    assert "grad_norm/blocks.1" not in norms
    assert {k.split("/")[1] for k in norms} == {"x_embed", "blocks.0", "blocks.1"}
