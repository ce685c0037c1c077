"""The fused output layer and label-smoothed cross-entropy equals PyTorch's composition,
in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from nmt.model.output import linear_cross_entropy


def reference(features, weight, bias, target, smoothing):
    logits = F.linear(features, weight, bias)
    return F.cross_entropy(logits, target, ignore_index=0, label_smoothing=smoothing, reduction="sum")


def inputs(rows: int, dim: int = 6, vocab: int = 17, dtype=torch.float64):
    torch.manual_seed(0)
    features = torch.randn(rows, dim, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (rows,))
    target[::7] = 0  # padding
    return features, weight, bias, target


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("rows", [50, 301])  # one block of rows, and three (the last one short)
def test_matches_pytorch_linear_and_cross_entropy(smoothing, rows):
    features, weight, bias, target = inputs(rows)
    ours = linear_cross_entropy(features, weight, bias, target, smoothing=smoothing, ignore_index=0)
    grads_ours = torch.autograd.grad(ours * 1.7, (features, weight, bias))
    ref = reference(features, weight, bias, target, smoothing)
    grads_ref = torch.autograd.grad(ref * 1.7, (features, weight, bias))
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-6)
    for name, g, r in zip(("features", "weight", "bias"), grads_ours, grads_ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5, msg=name)
    assert grads_ours[0][::7].abs().max() == 0  # padding gets no gradient


def test_no_gradient_is_computed_without_autograd():
    features, weight, bias, target = inputs(8, dtype=torch.float32)
    target[0] = 3
    with torch.inference_mode():
        loss = linear_cross_entropy(features, weight, bias, target)
    expected = F.cross_entropy(F.linear(features, weight, bias), target, ignore_index=0, reduction="sum")
    torch.testing.assert_close(loss, expected.detach())


def test_only_the_inputs_that_need_a_gradient_get_one():
    features, weight, bias, target = inputs(20)
    bias.requires_grad_(False)
    linear_cross_entropy(features.detach(), weight, bias, target, smoothing=0.1).backward()
    ref_weight = weight.grad.clone()
    weight.grad = None
    reference(features.detach(), weight, bias, target, 0.1).backward()
    torch.testing.assert_close(ref_weight, weight.grad)


def test_under_bfloat16_autocast_close_to_float32_with_float32_gradients_for_float32_parameters():
    features, weight, bias, target = inputs(300, dim=32, vocab=500, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(features, weight, bias, target, smoothing=0.1)
    assert ours.dtype == torch.float32
    ours.backward()
    assert weight.grad.dtype == bias.grad.dtype == features.grad.dtype == torch.float32
    grads_ours = [t.grad.clone() for t in (features, weight, bias)]
    ref = reference(features, weight, bias, target, 0.1)
    grads_ref = torch.autograd.grad(ref, (features, weight, bias))
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=0)
    for g, r in zip(grads_ours, grads_ref):
        assert (g - r).norm() < 0.03 * r.norm()


def test_gradient_buffers_reused_across_passes_do_not_mix_them():
    """A backward pass hands its gradient buffer to the next forward pass: passes that
    overlap (two forward passes, then their backward passes) still get their own."""
    first, second = inputs(40), inputs(30, vocab=17)
    with torch.no_grad():
        second[0].mul_(2)
    expected = [torch.autograd.grad(reference(*x, 0.1), x[:3]) for x in (first, second)]
    for _ in range(2):  # the second round starts from a spare buffer
        losses = [linear_cross_entropy(*x, smoothing=0.1) for x in (first, second)]
        got = [torch.autograd.grad(loss, x[:3]) for loss, x in reversed(list(zip(losses, (first, second))))]
        for g, e in zip(reversed(got), expected):
            for a, b in zip(g, e):
                torch.testing.assert_close(a, b)
