"""The masked text-embedding regression of SEED_SPEC §e (sd3.train.flow, the text-loss functions)."""

import pytest
import torch

from sd3.train import flow


def test_mask_picks_about_a_quarter_of_the_kept_parts_only():
    T, B = 50, 400
    kept = torch.tensor([[True, True], [True, False], [False, True], [False, False]]).repeat(B // 4, 1)
    mask = flow.text_loss_mask(kept, T, torch.Generator().manual_seed(0))
    assert mask.shape == (B, 2 * T)
    gemma, bert = mask[:, :T], mask[:, T:]
    assert not gemma[~kept[:, 0]].any() and not bert[~kept[:, 1]].any()  # dropped parts: never picked
    assert gemma[kept[:, 0]].float().mean() == pytest.approx(0.25, abs=0.02)
    assert bert[kept[:, 1]].float().mean() == pytest.approx(0.25, abs=0.02)


def test_mask_replays_with_the_same_generator():
    kept = torch.ones(3, 2, dtype=torch.bool)
    a = flow.text_loss_mask(kept, 4, torch.Generator().manual_seed(5))
    b = flow.text_loss_mask(kept, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_kept_parts_reads_cfg_dropout():
    T = 3
    context = torch.randn(4, 2 * T, 5)
    dropped, _ = flow.cfg_dropout(context, torch.randn(4, 2), T, 0.0, 0.5, 0.5, torch.Generator().manual_seed(1))
    kept = flow.kept_parts(dropped, T)
    for b in range(4):
        assert kept[b, 0] == dropped[b, :T].any() and kept[b, 1] == dropped[b, T:].any()


def test_loss_is_the_masked_squared_error_over_all_elements():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = True
    hidden = flow.hide_text(target, mask)
    assert not hidden[0, 1].any() and torch.equal(hidden[0, 0], target[0, 0])
    expected = ((pred[0, 1] - target[0, 1]).square().sum() + (pred[1, 4] - target[1, 4]).square().sum()) / (2 * 6 * 4)
    torch.testing.assert_close(flow.text_loss(pred, target, mask), expected)
    empty = torch.zeros(0, 6, 4, requires_grad=True)
    loss = flow.text_loss(empty, empty.detach(), torch.zeros(0, 6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None
