"""LoopWeight: a per-step weight whose gradient is computed once for the whole loop."""

import pytest
import torch

from nmt.model.loop_weight import LoopWeight


def recurrence(weight, bias, extra, h0, x, deferred: bool):
    """h_t = tanh(W h_{t-1} + b + x_t) and a second weight on an add term, for T steps."""
    w, v = (LoopWeight(weight, bias), LoopWeight(extra)) if deferred else (None, None)
    h, outputs = h0, []
    for x_t in x.unbind(0):
        if deferred:
            pre = w(h) + x_t
            out = v(h, add=pre)
        else:
            pre = torch.addmm(bias, h, weight.t()) + x_t
            out = torch.addmm(pre, h, extra.t())
        h = torch.tanh(out)
        outputs.append(h)
    return torch.stack(outputs)


def test_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    weight = torch.randn(6, 6, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    extra = torch.randn(6, 6, requires_grad=True)
    h0 = torch.randn(4, 6, requires_grad=True)
    x = torch.randn(7, 4, 6, requires_grad=True)
    leaves = (weight, bias, extra, h0, x)
    grad = torch.randn(7, 4, 6)
    results = []
    for deferred in (False, True):
        out = recurrence(*leaves, deferred=deferred)
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (plain, plain_grads), (loop, loop_grads) = results
    torch.testing.assert_close(loop, plain)
    for got, want in zip(loop_grads, plain_grads):
        torch.testing.assert_close(got, want)


def test_a_batch_of_matrices_as_the_attention_context_gets_plain_autograd_gradients():
    """The context c_t = a_t^T H at every step, H (batch x src_len x size) the weight:
    its gradient, summed over the steps, is one batched matmul; the same as autograd's."""
    torch.manual_seed(0)
    annotations = torch.randn(3, 5, 4, requires_grad=True)
    scores = torch.randn(6, 3, 5, requires_grad=True)  # steps x batch x src_len
    grad = torch.randn(6, 3, 4)
    results = []
    for deferred in (False, True):
        loop = LoopWeight(annotations.mT) if deferred else None
        contexts = []
        for s_t in scores.unbind(0):
            a_t = torch.softmax(s_t, dim=1).unsqueeze(1)  # batch x 1 x src_len
            contexts.append((loop(a_t) if deferred else torch.bmm(a_t, annotations)).squeeze(1))
        out = torch.stack(contexts)
        results.append((out, torch.autograd.grad(out, (annotations, scores), grad)))
    (plain, plain_grads), (loop_out, loop_grads) = results
    torch.testing.assert_close(loop_out, plain)
    for got, want in zip(loop_grads, plain_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_of_matrices_with_biases_gets_plain_autograd_gradients(dtype):
    """Two recurrences run as one (the two directions of a bidirectional encoder layer):
    weights [2, out, in] and biases [2, out]; in bf16 the steps' rows are concatenated
    with zero padding (nmt.model.shapes.concatenate), which changes no gradient."""
    torch.manual_seed(2)
    weight = torch.randn(2, 6, 6, dtype=dtype, requires_grad=True)
    bias = torch.randn(2, 6, dtype=dtype, requires_grad=True)
    h0 = torch.randn(2, 3, 6, dtype=dtype, requires_grad=True)
    x = torch.randn(5, 2, 3, 6, dtype=dtype, requires_grad=True)  # steps x 2 x batch x in
    leaves = (weight, bias, h0, x)
    grad = torch.randn(5, 2, 3, 6, dtype=dtype)
    results = []
    for deferred in (False, True):
        loop, h, outputs = LoopWeight(weight, bias), h0, []
        for x_t in x.unbind(0):
            product = loop(h) if deferred else torch.baddbmm(bias.unsqueeze(1), h, weight.mT)
            h = torch.tanh(product + x_t)
            outputs.append(h)
        out = torch.stack(outputs)
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (plain, plain_grads), (loop_out, loop_grads) = results
    tolerance = {"rtol": 2e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(loop_out, plain, **tolerance)
    for got, want in zip(loop_grads, plain_grads):
        torch.testing.assert_close(got, want, **tolerance)


def test_deferred_only_when_the_weight_needs_a_gradient():
    weight = torch.randn(3, 2, requires_grad=True)
    assert LoopWeight(weight).deferred
    with torch.no_grad():
        assert not LoopWeight(weight).deferred
    assert not LoopWeight(weight.detach()).deferred


def test_under_autocast_the_gradients_equal_plain_autocast():
    """Under bf16 autocast the weight is cast once, the products run in bf16, and the
    gradients come back in each input's own dtype (here an fp32 x and add)."""
    torch.manual_seed(1)
    weight = torch.randn(6, 5, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    h0 = torch.randn(4, 5, requires_grad=True)
    add = torch.randn(4, 6, requires_grad=True)
    grads = []
    for deferred in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w, v = LoopWeight(weight, bias), LoopWeight(weight)
            h, total = h0, 0
            for _ in range(3):
                out = (w(h) + v(h, add=add)) if deferred else (
                    torch.addmm(bias, h, weight.t()) + torch.addmm(add, h, weight.t()))
                assert out.dtype == torch.bfloat16
                h = torch.tanh(out[:, :5]).float()
                total = total + h.sum()
        grads.append(torch.autograd.grad(total, (weight, bias, h0, add)))
    for plain, loop in zip(*grads):
        assert loop.dtype == plain.dtype == torch.float32
        torch.testing.assert_close(loop, plain, atol=0.05, rtol=0.02)


def test_steps_that_the_loss_does_not_reach_add_nothing():
    weight = torch.randn(3, 3, requires_grad=True)
    loop = LoopWeight(weight)
    x = torch.randn(2, 3)
    used, unused = loop(x), loop(2 * x)
    (weight_grad,) = torch.autograd.grad(used.sum(), weight)
    torch.testing.assert_close(weight_grad, torch.ones(2, 3).t() @ x)
    assert unused.requires_grad and loop.steps == []


def test_a_bias_and_a_per_step_add_together_are_refused():
    loop = LoopWeight(torch.randn(3, 2, requires_grad=True), torch.randn(3, requires_grad=True))
    with pytest.raises(ValueError, match="either a bias or a per-step add"):
        loop(torch.randn(4, 2), add=torch.randn(4, 3))


def test_a_backward_pass_for_other_inputs_leaves_nothing_behind():
    """autograd.grad for x alone runs the steps' backward but not the weight's: a later
    full backward pass must not count those steps twice."""
    weight = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3, requires_grad=True)
    loop = LoopWeight(weight)
    out = torch.tanh(loop(torch.tanh(loop(x)))).sum()
    torch.autograd.grad(out, x, retain_graph=True)
    (got,) = torch.autograd.grad(out, weight)
    plain = torch.tanh(torch.tanh(x @ weight.t()) @ weight.t()).sum()
    (want,) = torch.autograd.grad(plain, weight)
    torch.testing.assert_close(got, want)
