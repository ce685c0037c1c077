"""A weight used at every step of a time loop, whose gradient is computed once.

The decoder multiplies the same matrices at each of its T steps. Plain autograd computes
each one's weight gradient at every step, ``g_t^T x_t`` (a matmul whose inner size is
only the batch), and adds it into the gradient buffer: T matmuls and T passes over the
weight. :class:`LoopWeight` keeps each step's ``(x_t, g_t)`` during the backward pass
instead, and when the backward pass leaves the loop computes
``sum_t g_t^T x_t = [g_1; ...; g_T]^T [x_1; ...; x_T]`` in one matmul, as cuDNN does
for its recurrent weights. The value and the gradients are those of plain autograd, up
to the order of a sum. (In training on a CPU, and in float32 on a GPU, a one-layer
fused-GRU decoder goes further: its whole loop is one function whose steps write into
the joined matrices directly, :mod:`nmt.model.decoder_loop`; the other decoders and the
encoder use LoopWeight.)

A weight may also be a batch of matrices ``[batch, out, in]``, each step's input then
``[batch, rows, in]``: the attention's context ``c_i = a_i^T H`` is such a product, with
the annotations H as the weight, whose gradient ``sum_i a_i g_i^T`` becomes one batched
matmul instead of an outer product per step; and so are the recurrent weights of a
bidirectional layer's two directions, run as one loop (nmt.model.encoder).

Under autocast the weight is cast once per forward pass, and the products run in the
autocast dtype. Without gradients a LoopWeight is just ``add + x W^T + b``. Not
supported: a second-order gradient through the loop (``create_graph=True``); the
gradient is computed once, not as a graph.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class LoopWeight:
    """``W`` ``[out, in]`` and an optional bias ``b`` ``[out]``, for ``add + x W^T + b``
    at every step of one forward pass: make one per forward, call it at each step.
    ``W`` may be a batch ``[batch, out, in]``, its bias then ``[batch, out]``."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        # (backward pass id, x_t, g_t), filled by the backward pass. The autograd nodes
        # hold this list, not the LoopWeight: no reference cycle through the graph.
        self.steps: list[tuple[int, Tensor, Tensor]] = []
        self.deferred = torch.is_grad_enabled() and weight.requires_grad
        dtype = autocast_dtype(weight.device.type)
        if self.deferred and dtype is not None:  # cast once here, not at every step
            weight, bias = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
        if self.deferred:  # aliases whose backward runs once, after every step's
            self.weight, self.bias = _Enter.apply(self.steps, weight, bias)
        else:
            self.weight, self.bias = weight, bias

    def __call__(self, x: Tensor, add: Tensor | None = None) -> Tensor:
        """``add + x W^T + b``.

        :param x: ``[batch, in]`` (``[batch, rows, in]`` for a batch of matrices)
        :param add: ``[batch, out]`` or None (a per-step term that gets its gradient as usual)
        :return: ``[batch, out]`` (``[batch, rows, out]``)
        """
        if add is not None and self.bias is not None:
            raise ValueError("LoopWeight: give either a bias or a per-step add, not both")
        if self.deferred:
            return _Step.apply(x, add, self.weight, self.bias, self.steps)
        return _product(x, add if add is not None else self.bias, self.weight)


def _product(x: Tensor, base: Tensor | None, weight: Tensor) -> Tensor:
    """``base + x W^T``, for one matrix ``W`` or a batch of them (base ``[batch, rows, out]``,
    or a bias ``[batch, out]``)."""
    if weight.dim() == 2:
        return x @ weight.t() if base is None else torch.addmm(base, x, weight.t())
    if base is None:
        return torch.bmm(x, weight.mT)
    return torch.baddbmm(base.unsqueeze(1) if base.dim() == 2 else base, x, weight.mT)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on this device type, or None when it is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    elif device_type == "cpu":
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    else:
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if enabled else None


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
        from nmt.model.shapes import concatenate  # (nmt.model.shapes imports this module)

        # bf16 on a CPU: the rows padded with zeros to few shapes (see nmt.model.shapes)
        x = concatenate([x for x, _ in steps])  # (batch * steps) x in, or batch x (rows * steps) x in
        g = concatenate([g for _, g in steps])  # (batch * steps) x out, ...
        return None, g.mT @ x, (g.sum(-2) if ctx.has_bias else None)


class _Step(torch.autograd.Function):
    """``add + x W^T + b`` at one step; the gradients of x and add as usual, the
    weight's (and bias's) left to :class:`_Enter`."""

    @staticmethod
    def forward(ctx, x: Tensor, add: Tensor | None, weight: Tensor, bias: Tensor | None, steps: list):
        # In the weight's dtype (the autocast dtype under autocast); the gradients go back
        # in the dtypes x and add came in.
        ctx.x_dtype, ctx.add_dtype = x.dtype, (add.dtype if add is not None else None)
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, weight)
        ctx.steps = steps
        return _product(x, add.to(weight.dtype) if add is not None else bias, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        g = g.to(weight.dtype)
        ctx.steps.append((torch._C._current_graph_task_id(), x, g))
        add_grad = g.to(ctx.add_dtype) if ctx.add_dtype is not None else None
        return (g @ weight).to(ctx.x_dtype), add_grad, None, None, None
