"""Gated recurrent units: the exact cell of Cho et al. (2014) and PyTorch's fused variant.

Both cells share one small interface, so the encoder and decoder choose between them
with a single ``cell: str`` argument:

* ``project_input(x, offset=0, bias=True)`` -- the input half of every gate,
  ``W_x x``. It is linear in ``x``, so it is computed for a whole sequence in one
  matmul *outside* the time loop, and a concatenated input ``[x1; x2]`` may be
  projected piece by piece (``offset`` names the first input column of the piece).
* ``step(gates_x, h)`` -- one time step given the precomputed input gates; only the
  recurrent matmuls and the elementwise gate arithmetic happen here.
* ``forward(x, h)`` -- ``step(project_input(x), h)``, for convenience.

The two cells differ in where the reset gate acts (Cho et al. 2014, eq. 5-8, versus
the cuDNN / ``torch.nn.GRU`` formulation): the exact cell resets ``h`` *before* the
recurrent product, ``W (r * h)``; the fused cell resets *after* it, ``r * (W h + b)``,
which lets one matmul ``W_hh h`` serve all three gates.

``run_gru`` drives a cell's step over a right-padded batch, carrying the state
unchanged through padding.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from nmt.model import shapes
from nmt.model.native import KERNEL_DTYPES, GatesX, kernels

CELLS = ("exact", "fused")


class ExactGRUCell(nn.Module):
    """The gated recurrent unit exactly as in Cho et al. (2014), section 2.3::

        z_t  = sigmoid(W_z [h_{t-1}, x_t] + b_z)          update gate
        r_t  = sigmoid(W_r [h_{t-1}, x_t] + b_r)          reset gate
        h~_t = tanh(W [r_t * h_{t-1}, x_t] + b)           candidate
        h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t

    Each ``W`` is split into its input columns (rows of ``weight_ih``, gate order
    z, r, candidate) and its recurrent columns (rows of ``weight_hh``, same order);
    the biases belong to the input projection.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(3 * hidden_size))
        bound = hidden_size**-0.5
        nn.init.uniform_(self.weight_ih, -bound, bound)
        nn.init.uniform_(self.weight_hh, -bound, bound)

    def project_input(self, x: Tensor, offset: int = 0, bias: bool = True) -> Tensor:
        """Input half of the gates, ``W_x x + b``.

        :param x: ``[..., n]`` input (or the piece of a concatenated input that
            occupies input columns ``offset .. offset + n``)
        :param offset: first input column that ``x`` occupies
        :param bias: add the gate biases (add them once per concatenated input)
        :return: ``[..., 3 * hidden]`` gates, order z, r, candidate
        """
        weight = self.weight_ih[:, offset : offset + x.size(-1)]
        return shapes.linear(x, weight, self.bias if bias else None)

    def step(self, gates_x: Tensor, h: Tensor) -> Tensor:
        """One step of Cho et al. (2014) eq. 5-8.

        :param gates_x: ``[batch, 3 * hidden]`` from ``project_input``
        :param h: ``[batch, hidden]`` previous state h_{t-1}
        :return: ``[batch, hidden]`` new state h_t
        """
        n = self.hidden_size
        x_z, x_r, x_n = gates_x.chunk(3, dim=-1)
        h_z, h_r = F.linear(h, self.weight_hh[: 2 * n]).chunk(2, dim=-1)
        z = torch.sigmoid(x_z + h_z)
        r = torch.sigmoid(x_r + h_r)
        candidate = torch.tanh(x_n + F.linear(r * h, self.weight_hh[2 * n :]))
        return (1 - z) * h + z * candidate

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """One step from the raw input.

        :param x: ``[batch, input]``
        :param h: ``[batch, hidden]``
        :return: ``[batch, hidden]``
        """
        return self.step(self.project_input(x), h)


class TorchLayoutCell(nn.Module):
    """Parameters in PyTorch's recurrent layout, for ``gates`` gates: ``weight_ih``
    ``[gates * hidden, input]``, ``weight_hh`` ``[gates * hidden, hidden]``, ``bias_ih``
    and ``bias_hh``, initialised U(-1/sqrt(hidden), 1/sqrt(hidden)) as ``torch.nn``
    does; the base of :class:`FusedGRUCell` and :class:`nmt.model.lstm.LSTMCell`."""

    gates = 0  # set by the subclass

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(self.gates * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(self.gates * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.zeros(self.gates * hidden_size))
        self.bias_hh = nn.Parameter(torch.zeros(self.gates * hidden_size))
        bound = hidden_size**-0.5
        nn.init.uniform_(self.weight_ih, -bound, bound)
        nn.init.uniform_(self.weight_hh, -bound, bound)

    def project_input(self, x: Tensor, offset: int = 0, bias: bool = True) -> Tensor:
        """Input half of the gates, ``W_i x + b_i``; same contract as
        :meth:`ExactGRUCell.project_input` (in the subclass's gate order).

        :return: ``[..., gates * hidden]``
        """
        weight = self.weight_ih[:, offset : offset + x.size(-1)]
        return shapes.linear(x, weight, self.bias_ih if bias else None)


class FusedGRUCell(TorchLayoutCell):
    """The GRU of ``torch.nn.GRUCell`` (and cuDNN), with the same parameter layout
    (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``; gate order r, z, n)::

        r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
        z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
        h_t = (1 - z_t) * n_t + z_t * h_{t-1}

    Note that here z_t weights the *old* state, the mirror image of Cho et al.;
    the two parametrisations are equivalent up to z -> 1 - z.
    """

    gates = 3  # r, z, n

    def step(self, gates_x: Tensor, h: Tensor, gates_h: Tensor | None = None) -> Tensor:
        """One ``nn.GRUCell`` step.

        :param gates_x: ``[batch, 3 * hidden]`` from ``project_input``
        :param h: ``[batch, hidden]`` previous state
        :param gates_h: ``W_hh h + b_hh`` if the caller computed it already
        :return: ``[batch, hidden]`` new state
        """
        if gates_h is None:
            gates_h = F.linear(h, self.weight_hh, self.bias_hh)
        return fused_gru_gates(gates_x, gates_h, h)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """One step from the raw input.

        :param x: ``[batch, input]``
        :param h: ``[batch, hidden]``
        :return: ``[batch, hidden]``
        """
        return self.step(self.project_input(x), h)


def fused_gru_gates(gates_x: GatesX, gates_h: Tensor, h: Tensor, real: Tensor | None = None) -> Tensor:
    """The gate arithmetic of :class:`FusedGRUCell` (``nn.GRU``'s equations).

    :param gates_x: ``[batch, 3 * hidden]`` ``W_i x + b_i``, gate order r, z, n; or a pair of
        tensors, its first rows and the rest (the two directions of a bidirectional layer,
        each from its own projection: the compiled kernels read them where they are)
    :param gates_h: ``[batch, 3 * hidden]`` ``W_h h + b_h``
    :param h: ``[batch, hidden]`` previous state
    :param real: ``[batch, 1]`` bool or None: rows where it is False (padding) keep ``h``
    :return: ``[batch, hidden]`` new state
    """
    parts = gates_x if isinstance(gates_x, tuple) else (gates_x,)
    same_dtype = all(part.dtype == h.dtype for part in parts) and gates_h.dtype == h.dtype
    compiled = kernels() if same_dtype and h.device.type == "cpu" and h.dtype in KERNEL_DTYPES else None
    if compiled is not None and torch.is_grad_enabled():
        return _CompiledGRUGates.apply(gates_h, h, real, compiled, *parts)
    if compiled is not None:
        return compiled.gru_forward(gates_x, gates_h, h, real)
    gates_x = torch.cat(parts) if len(parts) > 1 else gates_x
    if same_dtype and h.device.type == "cpu" and torch.is_grad_enabled():
        return _FusedGRUGates.apply(gates_x, gates_h, h, real)
    if same_dtype and h.is_cuda:
        # PyTorch's own fused kernel for exactly these equations (nn.GRUCell uses it
        # on CUDA): the gate arithmetic in one kernel forward and one backward.
        new = torch.ops.aten._thnn_fused_gru_cell(gates_x, gates_h, h)[0]
    else:
        x_r, x_z, x_n = gates_x.chunk(3, dim=-1)
        h_r, h_z, h_n = gates_h.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        new = n + z * (h - n)
    return new if real is None else torch.where(real, new, h)


class _FusedGRUGates(torch.autograd.Function):
    """:func:`fused_gru_gates` with its own backward, for training on a CPU.

    Composed from PyTorch operations, a step's gate arithmetic is about 11 operations
    forward and 20 backward, two of them concatenations that reassemble the gradients of
    the three gates' slices; on a CPU, at a training batch's size, a step costs more in
    their dispatch than in their arithmetic. Here it is 5 forward (6 with padding) and
    11 backward, the gates' gradients written into place (:func:`gates_forward`,
    :func:`gates_backward`).
    """

    @staticmethod
    def forward(ctx, gates_x: Tensor, gates_h: Tensor, h: Tensor, real: Tensor | None) -> Tensor:
        new, saved = gates_forward(gates_x, gates_h, h)
        if real is not None:
            new = torch.where(real, new, h)
        ctx.save_for_backward(*saved, real)
        return new

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        *saved, real = ctx.saved_tensors
        return *gates_backward(saved, grad, real), None


def gates_forward(gates_x: Tensor, gates_h: Tensor, h: Tensor) -> tuple[Tensor, tuple]:
    """:func:`fused_gru_gates` without padding by PyTorch operations: the new state, and
    what :func:`gates_backward` reads (as ``torch.ops.aten._thnn_fused_gru_cell``, CUDA's
    kernel for the same equations, returns its workspace)."""
    n = h.size(1)
    rz = torch.add(gates_x[:, : 2 * n], gates_h[:, : 2 * n]).sigmoid_()  # r and z
    h_n = gates_h[:, 2 * n :]  # W_hn h + b_hn
    candidate = torch.addcmul(gates_x[:, 2 * n :], rz[:, :n], h_n).tanh_()  # n_t
    return torch.lerp(candidate, h, rz[:, n:]), (rz, candidate, h, h_n)  # n + z (h - n)


def gates_backward(saved: tuple, grad: Tensor, real: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`gates_forward`'s gates_x, gates_h and h from its output's;
    with ``real``, of the step that keeps ``h`` where ``real`` is False (padding)."""
    rz, candidate, h, h_n = saved
    n = h.size(1)
    r, z = rz[:, :n], rz[:, n:]
    g = grad if real is None else grad * real  # zero on padding, where the state is carried
    grad_n = g - g * z  # d/d n_t: g (1 - z)
    grad_h = grad - grad_n  # g z, and on padding all of grad
    grad_x = h.new_empty(h.size(0), 3 * n)  # d/d gates_x, gate order r, z, n
    pre_n = grad_x[:, 2 * n :]
    torch.ops.aten.tanh_backward.grad_input(grad_n, candidate, grad_input=pre_n)
    torch.mul(pre_n, h_n, out=grad_x[:, :n])  # d/d r
    torch.mul(g, h - candidate, out=grad_x[:, n : 2 * n])  # d/d z
    torch.ops.aten.sigmoid_backward.grad_input(grad_x[:, : 2 * n], rz, grad_input=grad_x[:, : 2 * n])
    grad_gates_h = torch.empty_like(grad_x)  # the same for r and z
    grad_gates_h[:, : 2 * n] = grad_x[:, : 2 * n]
    torch.mul(pre_n, r, out=grad_gates_h[:, 2 * n :])  # r (W_hn h + b_hn)
    return grad_x, grad_gates_h, grad_h


class _CompiledGRUGates(torch.autograd.Function):
    """:func:`fused_gru_gates` by the compiled kernels (:mod:`nmt.model.native`): one pass
    forward and one backward, the gates recomputed there rather than kept."""

    @staticmethod
    def forward(ctx, gates_h: Tensor, h: Tensor, real: Tensor | None, compiled, *gates_x: Tensor) -> Tensor:
        ctx.save_for_backward(gates_h, h, real, *gates_x)
        ctx.compiled = compiled
        return compiled.gru_forward(gates_x if len(gates_x) > 1 else gates_x[0], gates_h, h, real)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        gates_h, h, real, *gates_x = ctx.saved_tensors
        parts = tuple(gates_x) if len(gates_x) > 1 else gates_x[0]
        grad_x, grad_gates_h, grad_h = ctx.compiled.gru_backward(parts, gates_h, h, real, grad)
        return grad_gates_h, grad_h, None, None, *grad_x.split([part.size(0) for part in gates_x])


GRUCell = ExactGRUCell | FusedGRUCell


def make_gru_cell(cell: str, input_size: int, hidden_size: int) -> GRUCell:
    """The cell named by ``cell`` (``"exact"`` or ``"fused"``)."""
    if cell == "exact":
        return ExactGRUCell(input_size, hidden_size)
    if cell == "fused":
        return FusedGRUCell(input_size, hidden_size)
    raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")


def run_gru(
    step: Callable[[Tensor, Tensor], Tensor], gates_x: Tensor, mask: Tensor, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """Run a GRU over a right-padded batch, starting from a zero state.

    On padding the state is carried through unchanged, so the forward direction
    ends on each sentence's last real token. Running ``reverse`` from the last
    column to the first, the state stays zero through the trailing padding and
    starts at each sentence's own last token: the same as reversing every
    sentence within its length (Bahdanau et al. 2015, section 3.2).

    :param step: one time step, ``(gates_x[:, t], h_{t-1}) -> h_t``, e.g. a cell's ``step``
    :param gates_x: ``[batch, src_len, 3 * hidden]``, e.g. from ``cell.project_input``
    :param mask: ``[batch, src_len]`` bool, True on real tokens
    :param reverse: run from the end of the sentence to its start
    :return: states ``[batch, src_len, hidden]`` (zero on padding) and the
        final state ``[batch, hidden]``
    """
    batch_size, src_len, _ = gates_x.shape
    h = gates_x.new_zeros(batch_size, gates_x.size(2) // 3)
    steps = range(src_len - 1, -1, -1) if reverse else range(src_len)
    outputs: list[Tensor] = [h] * src_len
    gates_t, real_t = gates_x.unbind(1), mask.unsqueeze(2).unbind(1)  # cheaper backward than [:, t]
    for t in steps:
        real = real_t[t]  # batch x 1
        h = torch.where(real, step(gates_t[t], h), h)
        outputs[t] = h
    states = torch.stack(outputs, dim=1) * mask.unsqueeze(2)  # batch x src_len x hidden
    return states, h
