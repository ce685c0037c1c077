"""Whole-batch bf16 matmuls on a CPU run with their rows rounded up (nmt/model/shapes.py):
the same values and gradients as without, and few distinct shapes."""

import pytest
import torch
import torch.nn.functional as F

from nmt.model import shapes


@pytest.mark.parametrize("rows", [1, 127, 128, 300])
def test_linear_equals_f_linear_in_values_and_gradients(rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 3, 5, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(7, 5, generator=g).bfloat16().requires_grad_()
    bias = torch.randn(7, generator=g).bfloat16().requires_grad_()
    probe = torch.randn(rows, 3, 7, generator=g).bfloat16()
    ours = shapes.linear(x, weight, bias)
    theirs = F.linear(x, weight, bias)
    assert ours.shape == theirs.shape == (rows, 3, 7)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad((ours * probe).sum(), (x, weight, bias)),
                    torch.autograd.grad((theirs * probe).sum(), (x, weight, bias))):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)  # bf16 sums in another order


def test_linear_pads_bf16_rows_on_a_cpu_and_leaves_float32_alone(monkeypatch):
    seen, linear = [], F.linear
    monkeypatch.setattr(shapes.F, "linear", lambda x, w, b=None: seen.append(tuple(x.shape)) or linear(x, w, b))
    weight = torch.randn(4, 5)
    for rows in (3, 100, 128, 129):
        shapes.linear(torch.randn(rows, 5).bfloat16(), weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shapes.linear(torch.randn(2, 50, 5), weight)  # float32 input, bf16 products
    shapes.linear(torch.randn(100, 5), weight)
    assert seen == [(128, 5), (128, 5), (128, 5), (256, 5), (128, 5), (100, 5)]


def test_concatenate_adds_zero_rows_in_bf16_only():
    parts = [torch.randn(n, 3).bfloat16() for n in (50, 60, 30)]
    joined = shapes.concatenate(parts)
    assert joined.shape == (256, 3)
    assert torch.equal(joined[:140], torch.cat(parts)) and joined[140:].abs().sum() == 0
    assert shapes.concatenate([p.float() for p in parts]).shape == (140, 3)
    batched = [torch.randn(2, n, 3).bfloat16() for n in (5, 6)]  # a batch of matrices: rows of each
    joined = shapes.concatenate(batched)
    assert joined.shape == (2, 128, 3)
    assert torch.equal(joined[:, :11], torch.cat(batched, dim=-2)) and joined[:, 11:].abs().sum() == 0


def test_linear_under_autocast_gives_float32_leaves_their_gradients():
    """Training's case: float32 parameters, bf16 products; the gradients in the leaves'
    dtype, as with F.linear under autocast."""
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=g).requires_grad_() for shape in ((300, 5), (7, 5), (7,)))
    probe = torch.randn(300, 7, generator=g)
    grads = []
    for fn in (shapes.linear, F.linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, weight, bias)
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad((out.float() * probe).sum(), (x, weight, bias)))
    for ours, theirs in zip(*grads):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.02)
