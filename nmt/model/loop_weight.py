"""A weight used at every step of a time loop, whose gradient is computed once.

The decoder multiplies the same matrices at each of its T steps. Plain autograd computes
each one's weight gradient at every step, ``g_t^T x_t`` (a matmul whose inner size is
only the batch), and adds it into the gradient buffer: T matmuls and T passes over the
weight. :class:`LoopWeight` keeps each step's ``(x_t, g_t)`` during the backward pass
instead, and when the backward pass leaves the loop computes
``sum_t g_t^T x_t = [g_1; ...; g_T]^T [x_1; ...; x_T]`` in one matmul, as cuDNN does
for its recurrent weights. The value and the gradients are those of plain autograd, up
to the order of a sum.

Outside training (no gradient, or under autocast, whose casts belong to the plain ops) a
LoopWeight is just ``add + x W^T + b``. Not supported: a second-order gradient through
the loop (``create_graph=True``); the gradient is computed once, not as a graph.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class LoopWeight:
    """``W`` ``[out, in]`` and an optional bias ``b`` ``[out]``, for ``add + x W^T + b``
    at every step of one forward pass: make one per forward, call it at each step."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        # (backward pass id, x_t, g_t), filled by the backward pass. The autograd nodes
        # hold this list, not the LoopWeight: no reference cycle through the graph.
        self.steps: list[tuple[int, Tensor, Tensor]] = []
        self.deferred = (
            torch.is_grad_enabled()
            and weight.requires_grad
            and not torch.is_autocast_enabled(weight.device.type)
        )
        if self.deferred:  # aliases whose backward runs once, after every step's
            self.weight, self.bias = _Enter.apply(self.steps, weight, bias)
        else:
            self.weight, self.bias = weight, bias

    def __call__(self, x: Tensor, add: Tensor | None = None) -> Tensor:
        """``add + x W^T + b``.

        :param x: ``[batch, in]``
        :param add: ``[batch, out]`` or None (a per-step term that gets its gradient as usual)
        :return: ``[batch, out]``
        """
        if add is not None and self.bias is not None:
            raise ValueError("LoopWeight: give either a bias or a per-step add, not both")
        if self.deferred:
            return _Step.apply(x, add, self.weight, self.bias, self.steps)
        base = add if add is not None else self.bias
        return x @ self.weight.t() if base is None else torch.addmm(base, x, self.weight.t())


class _Enter(torch.autograd.Function):
    """Hands the weight to the loop; its backward, reached after the last step's,
    computes the weight's gradient from every step's inputs and output gradients."""

    @staticmethod
    def forward(ctx, steps: list, weight: Tensor, bias: Tensor | None):
        ctx.steps = steps
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # the steps send no gradient here: no zero tensors
        return weight.view_as(weight), (bias.view_as(bias) if bias is not None else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, _weight_grad, _bias_grad):
        # Only this backward pass's steps: a pass that asked for other gradients alone
        # (autograd.grad(..., inputs)) may have left some that are not ours.
        task = torch._C._current_graph_task_id()
        steps = [(x, g) for t, x, g in ctx.steps if t == task]
        ctx.steps.clear()
        if not steps:
            return None, None, None
        x = torch.cat([x for x, _ in steps])  # (batch * steps) x in
        g = torch.cat([g for _, g in steps])  # (batch * steps) x out
        return None, g.t() @ x, (g.sum(0) if ctx.has_bias else None)


class _Step(torch.autograd.Function):
    """``add + x W^T + b`` at one step; the gradients of x and add as usual, the
    weight's (and bias's) left to :class:`_Enter`."""

    @staticmethod
    def forward(ctx, x: Tensor, add: Tensor | None, weight: Tensor, bias: Tensor | None, steps: list):
        ctx.save_for_backward(x, weight)
        ctx.steps = steps
        ctx.has_add = add is not None
        base = add if add is not None else bias
        return x @ weight.t() if base is None else torch.addmm(base, x, weight.t())

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        ctx.steps.append((torch._C._current_graph_task_id(), x, g))
        return g @ weight, (g if ctx.has_add else None), None, None, None
