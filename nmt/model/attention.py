"""Additive attention (Bahdanau et al. 2015, section 3.1 and appendix A.1.2)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from nmt.model import shapes
from nmt.model.native import KERNEL_DTYPES, kernels


class AdditiveAttention(nn.Module):
    """The alignment model of Bahdanau et al. (2015), appendix A.1.2::

        e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j)       (energies)
        a_ij = exp(e_ij) / sum_k exp(e_ik)               (section 3.1, eq. 6)
        c_i  = sum_j a_ij h_j                            (section 3.1, eq. 5)

    ``U_a h_j`` does not depend on the decoder state, so :meth:`compute_keys` computes
    it once per sentence; each decoder step then costs one ``W_a s_{i-1}``.
    As in the paper, none of the three projections has a bias.

    On a CPU the energies come from the compiled kernels of :mod:`nmt.model.native`
    (one pass over the keys per step, forward and backward; see :meth:`energies`).
    Without them, training has a hand-written backward (:class:`_Energies`): plain
    autograd computes the outer product in their gradient as a matmul with an inner size
    of 1, several times slower on a CPU than the broadcast multiplication used there;
    and decoding computes them block by block (:func:`_blocked_energies`). (In teacher
    forcing the decoder computes the context with a
    :class:`~nmt.model.loop_weight.LoopWeight` of the annotations: their gradient, a sum
    of outer products over the steps, is one batched matmul after the loop.)
    """

    def __init__(self, key_size: int, query_size: int, attn_dim: int) -> None:
        """
        :param key_size: annotation size (2 * encoder hidden size)
        :param query_size: decoder state size
        :param attn_dim: size of the hidden layer of the alignment model
        """
        super().__init__()
        self.key_layer = nn.Linear(key_size, attn_dim, bias=False)  # U_a
        self.query_layer = nn.Linear(query_size, attn_dim, bias=False)  # W_a
        self.energy_layer = nn.Linear(attn_dim, 1, bias=False)  # v_a

    def compute_keys(self, annotations: Tensor) -> Tensor:
        """``U_a h_j`` for every source position.

        :param annotations: ``[batch, src_len, key_size]``
        :return: ``[batch, src_len, attn_dim]``
        """
        return shapes.linear(annotations, self.key_layer.weight)

    def forward(
        self, query: Tensor, keys: Tensor, annotations: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Attend from one decoder state to the source.

        :param query: ``[batch, query_size]`` previous decoder state s_{i-1}
        :param keys: ``[batch, src_len, attn_dim]`` from :meth:`compute_keys`
        :param annotations: ``[batch, src_len, key_size]`` the h_j
        :param mask: ``[batch, src_len]`` bool, True on real tokens
        :return: context c_i ``[batch, key_size]`` and weights a_ij ``[batch, src_len]``,
            which sum to one and are exactly zero on padding
        """
        return self.attend(self.query_layer(query), keys, annotations, mask)

    def attend(
        self, projected_query: Tensor, keys: Tensor, annotations: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` from ``W_a s_{i-1}``, already computed.

        The query may have ``g`` consecutive rows per sentence, ``[batch * g, attn_dim]``
        (the beams of beam search), all attending to that sentence's keys and
        annotations, which are then not repeated for every beam: the context is one
        matmul with ``g`` rows per sentence. The outputs have the query's rows.
        """
        weights = self.alignment(projected_query, keys, mask)  # batch*g x src_len
        batch, src_len = mask.shape
        a = weights.type_as(annotations).view(batch, -1, src_len)  # batch x g x src_len
        context = torch.bmm(a, annotations).flatten(0, 1)  # batch*g x key_size
        return context, weights

    def alignment(
        self, projected_query: Tensor, keys: Tensor, mask: Tensor, energies: Energies | None = None
    ) -> Tensor:
        """The weights a_ij of :meth:`attend` alone (teacher forcing computes the context
        with a :class:`~nmt.model.loop_weight.LoopWeight` of the annotations).

        :param projected_query: ``[batch * g, attn_dim]``, ``g`` rows per sentence (see :meth:`attend`)
        :param energies: from :meth:`energies` for these keys, made once per pass; or None
        :return: ``[batch * g, src_len]``, in at least float32
        """
        energies = (energies or self.energies(keys))(projected_query)  # batch*g x src_len
        batch, src_len = mask.shape
        energies = torch.where(mask.unsqueeze(1), energies.view(batch, -1, src_len), float("-inf"))
        # normalise in at least float32, also under bfloat16 autocast
        dtype = torch.promote_types(energies.dtype, torch.float32)
        return torch.softmax(energies, dim=2, dtype=dtype).view(-1, src_len)

    def energies(self, keys: Tensor) -> Energies:
        """The energies ``e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j)`` over these keys, as a
        function of the projected query ``[batch * g, attn_dim]`` -> ``[batch * g,
        src_len]``: in teacher forcing, make it once and call it at every step.

        On a CPU, with the compiled kernels (:mod:`nmt.model.native`): one pass over the
        keys per step, forward and backward; in training the keys' and v_a's gradients
        are summed over the steps in float32 and handed to autograd once. Without them,
        training has :class:`_Energies`' hand-written backward and decoding computes
        block by block in the cache (:func:`_blocked_energies`). A GPU runs these small
        steps at the speed it launches kernels: there the plain formulas.

        :param keys: ``[batch, src_len, attn_dim]`` from :meth:`compute_keys`
        """
        v_a = self.energy_layer.weight.squeeze(0)  # attn_dim
        on_cpu = keys.device.type == "cpu"
        compiled = kernels() if on_cpu and keys.dtype in KERNEL_DTYPES else None
        if compiled is not None and torch.is_grad_enabled():
            return _CompiledEnergies(compiled, keys, v_a)
        v_a = v_a.to(keys.dtype)  # under autocast, cast once
        if compiled is not None:
            keys, v_a = keys.contiguous(), v_a.float()
            return lambda query: compiled.energies_forward(query.to(keys.dtype).contiguous(), keys, v_a)
        if on_cpu and torch.is_grad_enabled():
            return functools.partial(_eager_energies, keys=keys, v_a=v_a)
        if on_cpu:
            return lambda query: _blocked_energies(query.to(keys.dtype), keys, v_a)

        def plain(query: Tensor) -> Tensor:
            query = query.to(keys.dtype).view(keys.size(0), -1, 1, keys.size(2))  # batch x g x 1 x attn_dim
            return (torch.add(keys.unsqueeze(1), query).tanh_() @ v_a).flatten(0, 1)

        return plain


Energies = Callable[[Tensor], Tensor]


def _eager_energies(query: Tensor, keys: Tensor, v_a: Tensor) -> Tensor:
    """:class:`_Energies` for ``g`` query rows per sentence: ``[batch * g, src_len]``."""
    group = query.size(0) // keys.size(0)
    if group > 1:  # one query row per sentence, as in teacher forcing
        keys = keys.repeat_interleave(group, 0)
    return _Energies.apply(query.to(keys.dtype), keys, v_a)


class _CompiledEnergies:
    """The energies of one teacher-forcing pass in training, by the compiled kernels.

    Every step's backward adds the keys' gradient, ``[batch, src_len, attn_dim]``, into one
    float32 sum for the pass (and v_a's into another) instead of returning its own for
    autograd to add up; :class:`_HandOver`'s backward, reached after the last step's,
    returns the sums (as :mod:`nmt.model.loop_weight` does for the weights).
    """

    def __init__(self, compiled, keys: Tensor, v_a: Tensor) -> None:
        self.compiled = compiled
        self.keys, self.v_a = keys.detach().contiguous(), v_a.detach().float()
        self.sums: dict[int, tuple[Tensor, Tensor]] = {}  # backward pass id -> (keys' sum, v_a's)
        self.keys_alias, self.v_a_alias = _HandOver.apply(self, keys, v_a)

    def __call__(self, query: Tensor) -> Tensor:
        if query.size(0) != self.keys.size(0):  # g rows per sentence: the backward takes one
            return _eager_energies(query, self.keys_alias, self.v_a_alias.to(self.keys.dtype))
        return _CompiledEnergiesStep.apply(query, self.keys_alias, self.v_a_alias, self)

    def sums_for(self, task: int) -> tuple[Tensor, Tensor]:
        """The gradient sums of backward pass ``task``, zeros at first."""
        if task not in self.sums:
            self.sums[task] = torch.zeros(self.keys.shape), torch.zeros(self.v_a.shape)
        return self.sums[task]


class _HandOver(torch.autograd.Function):
    """Hands the keys and v_a to the steps of :class:`_CompiledEnergies`; its backward
    returns their gradients, summed over the steps."""

    @staticmethod
    def forward(ctx, energies: _CompiledEnergies, keys: Tensor, v_a: Tensor):
        ctx.energies = energies
        ctx.set_materialize_grads(False)  # the steps send no gradient here: no zero tensors
        return keys.view_as(keys), v_a.view_as(v_a)

    @staticmethod
    @once_differentiable
    def backward(ctx, keys_grad, v_a_grad):
        # Only this backward pass's sums: one that asked for other gradients alone
        # (autograd.grad(..., inputs)) may have left its own.
        sums = ctx.energies.sums.pop(torch._C._current_graph_task_id(), None)
        if sums is None:
            return None, keys_grad, v_a_grad
        keys_sum, v_a_sum = sums
        if keys_grad is not None:  # the steps that ran without the kernels (g rows per sentence)
            keys_sum += keys_grad
        if v_a_grad is not None:
            v_a_sum += v_a_grad
        return None, keys_sum.to(ctx.energies.keys.dtype), v_a_sum.to(ctx.energies.v_a.dtype)


class _CompiledEnergiesStep(torch.autograd.Function):
    """One step of :class:`_CompiledEnergies`: query ``[batch, attn_dim]`` -> energies
    ``[batch, src_len]`` float32."""

    @staticmethod
    def forward(ctx, query: Tensor, keys: Tensor, v_a: Tensor, energies: _CompiledEnergies) -> Tensor:
        ctx.query_dtype = query.dtype
        query = query.to(energies.keys.dtype).contiguous()
        ctx.save_for_backward(query)
        ctx.energies = energies
        return energies.compiled.energies_forward(query, energies.keys, energies.v_a)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (query,) = ctx.saved_tensors
        energies = ctx.energies
        keys_sum, v_a_sum = energies.sums_for(torch._C._current_graph_task_id())
        grad_query = energies.compiled.energies_backward(
            query, energies.keys, energies.v_a, grad.float().contiguous(), keys_sum, v_a_sum
        )
        return grad_query.to(ctx.query_dtype), None, None, None


# Elements of the [rows, src_len, attn_dim] block that _blocked_energies works on at a time:
# 1 MiB of float32, which stays in a core's L2 cache between the block's operations.
_BLOCK_ELEMENTS = 1 << 18


def _blocked_energies(query: Tensor, keys: Tensor, v_a: Tensor) -> Tensor:
    """The energies of :class:`_Energies` without a gradient, for decoding on a CPU:
    query ``[batch * g, attn_dim]`` (``g`` rows per sentence), keys ``[batch, src_len,
    attn_dim]`` -> ``[batch * g, src_len]``.

    Over the whole ``[batch, src_len, attn_dim]`` tensor, each of the three passes
    (addition, sigmoid, product with ``v_a``) would stream it through memory; here they
    run on blocks of rows small enough to stay in the cache between passes. Against the
    plain ``tanh(q + k) @ v_a``, for 320 x 36 x 512 (beam 5, 64 sentences): 7.3-7.9 ->
    5.4-6.4 ms on one core, 3.2 -> 2.7 ms on two.
    """
    batch, src_len, attn_dim = keys.shape
    group = query.size(0) // batch  # query rows per sentence (beams)
    rows = max(1, _BLOCK_ELEMENTS // (group * src_len * attn_dim))  # sentences per block
    energies = keys.new_empty(batch, group, src_len)
    hidden = keys.new_empty(min(rows, batch), group, src_len, attn_dim)
    query2, keys, v2 = (2 * query).view(batch, group, 1, attn_dim), keys.unsqueeze(1), 2 * v_a
    for start in range(0, batch, rows):
        stop = min(start + rows, batch)
        block = hidden[: stop - start]
        torch.add(query2[start:stop], keys[start:stop], alpha=2, out=block).sigmoid_()
        torch.matmul(block, v2, out=energies[start:stop])
    return energies.view(batch * group, src_len).sub_(v_a.sum())


class _Energies(torch.autograd.Function):
    """``e_ij = v_a^T tanh(q_i + k_ij)``: query ``[batch, attn_dim]``, keys ``[batch,
    src_len, attn_dim]``, ``v_a`` ``[attn_dim]`` -> ``[batch, src_len]``.

    Computed as ``2 v_a^T sigmoid(2 q_i + 2 k_ij) - sum(v_a)``, since ``tanh(x) =
    2 sigmoid(2x) - 1``: this is the largest elementwise operation of a training step,
    and on a CPU PyTorch's bfloat16 sigmoid runs about 3x faster than its bfloat16 tanh.
    (In float32, tanh ran 1.2x faster with torch 2.13, but not measurably so in whole
    decoding runs, so one formula serves both.)
    """

    @staticmethod
    def forward(ctx, query: Tensor, keys: Tensor, v_a: Tensor) -> Tensor:
        # sigmoid(2 q + 2 k), in one addition and one in-place sigmoid
        hidden = torch.add((2 * query).unsqueeze(1), keys, alpha=2).sigmoid_()  # batch x src_len x attn_dim
        ctx.save_for_backward(hidden, v_a)
        return (hidden @ (2 * v_a)).sub_(v_a.sum())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        hidden, v_a = ctx.saved_tensors
        # d e / d k = 4 v_a * sigmoid'(2 q + 2 k)
        grad_pre = grad.unsqueeze(2) * (4 * v_a)  # batch x src_len x attn_dim
        torch.ops.aten.sigmoid_backward.grad_input(grad_pre, hidden, grad_input=grad_pre)
        grad_v = None
        if ctx.needs_input_grad[2]:  # d e / d v_a = tanh = 2 sigmoid - 1
            grad = grad.flatten()
            grad_v = 2 * (grad @ hidden.flatten(0, 1)) - grad.sum()
        return grad_pre.sum(1), grad_pre, grad_v
