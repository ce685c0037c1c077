"""The fused label-smoothed cross-entropy equals PyTorch's, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from nmt.loss import smoothed_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("rows", [50, 301])  # one block of rows, and three (the last one short)
def test_matches_pytorch_cross_entropy(smoothing, rows):
    torch.manual_seed(0)
    logits = torch.randn(rows, 17, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 17, (rows,))
    target[::7] = 0  # padding
    ours = smoothed_cross_entropy(logits, target, smoothing=smoothing, ignore_index=0)
    (grad_ours,) = torch.autograd.grad(ours * 1.7, logits)
    ref = F.cross_entropy(logits, target, ignore_index=0, label_smoothing=smoothing, reduction="sum")
    (grad_ref,) = torch.autograd.grad(ref * 1.7, logits)
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    assert torch.allclose(grad_ours.double(), grad_ref, atol=1e-6)
    assert grad_ours[::7].abs().max() == 0


def test_no_gradient_is_computed_without_autograd():
    logits = torch.randn(8, 11)
    target = torch.randint(1, 11, (8,))
    with torch.inference_mode():
        loss = smoothed_cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction="sum"))


def test_bfloat16_logits_get_bfloat16_gradients():
    logits = torch.randn(8, 11).bfloat16().requires_grad_()
    target = torch.randint(1, 11, (8,))
    smoothed_cross_entropy(logits, target, smoothing=0.1).backward()
    assert logits.grad.dtype == torch.bfloat16
