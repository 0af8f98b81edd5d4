import pytest
import torch
from torch import nn

from sd3.model.layers import RowLinear


@pytest.mark.parametrize("rows", [0, 1, 2, 4, 8])
def test_row_linear_matches_linear_forward_and_gradients(rows):
    """The outer-product weight gradient (few rows) and the plain path (many rows) both give nn.Linear's numbers."""
    torch.manual_seed(0)
    reference = nn.Linear(6, 10)
    layer = RowLinear(6, 10)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(rows, 6)
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = reference(x_ref), layer(x_new)
    torch.testing.assert_close(out_new, out_ref)
    grad = torch.randn(rows, 10)
    out_ref.backward(grad)
    out_new.backward(grad)
    torch.testing.assert_close(x_new.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


def test_row_linear_without_input_gradient_and_under_no_grad():
    layer = RowLinear(3, 5)
    x = torch.randn(2, 3)
    layer(x).sum().backward()  # x needs no gradient: only the weights get one
    torch.testing.assert_close(layer.weight.grad, torch.ones(5, 1) * x.sum(0)[None])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


def test_row_linear_under_autocast_takes_the_plain_path():
    """Under autocast the layer must behave like nn.Linear (bf16 output, fp32 weight gradient)."""
    layer = RowLinear(4, 6)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
