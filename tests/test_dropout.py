"""The CPU dropout: its drop rate, scaling, gradient, seeding, and the identity in eval."""

import pytest
import torch

from nmt.model.dropout import dropout


@pytest.mark.parametrize("p", [0.1, 0.4, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_with_probability_p_and_scales_the_rest(p, dtype):
    torch.manual_seed(0)
    x = torch.rand(301, 517, dtype=dtype) + 1  # never zero
    y = dropout(x, p, training=True)
    dropped = y == 0
    assert y.dtype == dtype and y.shape == x.shape
    assert abs(dropped.float().mean().item() - p) < 0.005  # 155,617 draws: sd 0.0012
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))
    # every position of a 64-bit word drops alike (no biased bits)
    rates = dropped.flatten()[: 301 * 516].view(-1, 4).float().mean(0)
    assert (rates - p).abs().max() < 0.01


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(0)
    x = torch.randn(40, 50, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    grad = torch.randn_like(y)
    y.backward(grad)
    kept = y != 0
    torch.testing.assert_close(x.grad, grad * kept / 0.7)


def test_seeded_and_off_outside_training():
    x = torch.randn(10, 20)
    torch.manual_seed(3)
    a = dropout(x, 0.5, training=True)
    torch.manual_seed(3)
    b = dropout(x, 0.5, training=True)
    assert torch.equal(a, b)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
