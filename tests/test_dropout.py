"""The CPU dropout: its drop rate, scaling, gradient, seeding, and the identity in eval;
through the compiled kernel (its mask drawn by counter from a seed) and through the
PyTorch fallback (64 random bits per four elements)."""

import pytest
import torch

from nmt.model import dropout as dropout_module
from nmt.model import native
from nmt.model.dropout import dropout

PATHS = ["kernel", "pytorch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Each test on both paths; the kernel's skipped where there is no C compiler."""
    if request.param == "kernel" and native.kernels() is None:
        pytest.skip("no C compiler: the kernels are not built")
    if request.param == "pytorch":
        monkeypatch.setattr(dropout_module, "kernels", lambda: None)
    return request.param


@pytest.mark.parametrize("p", [0.1, 0.4, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_with_probability_p_and_scales_the_rest(p, dtype, path):
    torch.manual_seed(0)
    x = torch.rand(301, 517, dtype=dtype) + 1  # never zero
    y = dropout(x, p, training=True)
    dropped = y == 0
    assert y.dtype == dtype and y.shape == x.shape
    assert abs(dropped.float().mean().item() - p) < 0.005  # 155,617 draws: sd 0.0012
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))
    # every position of a 64-bit word drops alike (no biased bits)
    flat = dropped.flatten()[: 301 * 516].float()
    rates = flat.view(-1, 4).mean(0)
    assert (rates - p).abs().max() < 0.01
    # and neighbours independently: both of a pair dropped with probability p^2
    both = (flat[:-1] * flat[1:]).mean().item()
    assert abs(both - p * p) < 0.01


def test_gradient_is_the_same_mask_and_scale(path):
    torch.manual_seed(0)
    x = torch.randn(40, 50, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    grad = torch.randn_like(y)
    y.backward(grad)
    kept = y != 0
    torch.testing.assert_close(x.grad, grad * kept / 0.7)


def test_seeded_and_off_outside_training(path):
    x = torch.randn(10, 20)
    torch.manual_seed(3)
    a = dropout(x, 0.5, training=True)
    torch.manual_seed(3)
    b = dropout(x, 0.5, training=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.5, training=True))  # the next call, another mask
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
