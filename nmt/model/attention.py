"""Additive attention (Bahdanau et al. 2015, section 3.1 and appendix A.1.2)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from nmt.model import shapes
from nmt.model.loop_weight import LoopWeight
from nmt.model.native import KERNEL_DTYPES, kernels


class AdditiveAttention(nn.Module):
    """The alignment model of Bahdanau et al. (2015), appendix A.1.2::

        e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j)       (energies)
        a_ij = exp(e_ij) / sum_k exp(e_ik)               (section 3.1, eq. 6)
        c_i  = sum_j a_ij h_j                            (section 3.1, eq. 5)

    ``U_a h_j`` does not depend on the decoder state, so :meth:`compute_keys` computes
    it once per sentence; each decoder step then costs one ``W_a s_{i-1}``.
    As in the paper, none of the three projections has a bias.

    On a CPU a step is one call of the compiled kernels of :mod:`nmt.model.native`:
    energies, softmax and context in one pass over the keys and annotations, forward and
    backward (:meth:`attend`, :meth:`attender`). Without them, training has a
    hand-written backward for the energies (:class:`_Energies`): plain autograd computes
    the outer product in their gradient as a matmul with an inner size of 1, several
    times slower on a CPU than the broadcast multiplication used there; decoding computes
    them block by block (:func:`_blocked_energies`); and teacher forcing computes the
    context with a :class:`~nmt.model.loop_weight.LoopWeight` of the annotations: their
    gradient, a sum of outer products over the steps, is one batched matmul after the loop.
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
        Without gradients on a CPU, one call of the compiled kernels.
        """
        compiled = _compiled(keys, annotations)
        if compiled is not None and not torch.is_grad_enabled():
            v_a = self.energy_layer.weight.squeeze(0).float()
            query = projected_query.to(keys.dtype).contiguous()
            keys, annotations, mask = keys.contiguous(), annotations.contiguous(), mask.contiguous()
            return compiled.attention_forward(query, keys, v_a, mask, annotations)
        weights = self.alignment(projected_query, keys, mask)  # batch*g x src_len
        batch, src_len = mask.shape
        a = weights.type_as(annotations).view(batch, -1, src_len)  # batch x g x src_len
        context = torch.bmm(a, annotations).flatten(0, 1)  # batch*g x key_size
        return context, weights

    def attender(self, keys: Tensor, annotations: Tensor, mask: Tensor) -> Attend:
        """:meth:`attend` over these keys and annotations as a function of the projected
        query ``[batch, attn_dim]`` (one row per sentence) -> (context, weights): in
        teacher forcing, make it once and call it at every step.

        (A one-layer fused-GRU decoder in training, on a CPU or in float32 on a GPU, runs
        the attention in its own loop instead: :mod:`nmt.model.decoder_loop`.) In training
        on a CPU, with the compiled kernels, each step is one call forward and one backward,
        and the gradients of the keys, the annotations and v_a are summed over the steps in
        float32 and handed to autograd once (:class:`_CompiledAttention`).
        Otherwise the energies of :meth:`energies`, the softmax of :meth:`alignment` and
        the context through a :class:`~nmt.model.loop_weight.LoopWeight` of the annotations.
        """
        compiled = _compiled(keys, annotations)
        if compiled is not None and torch.is_grad_enabled():
            return _CompiledAttention(compiled, keys, annotations, self.energy_layer.weight.squeeze(0), mask)
        energies = self.energies(keys)
        context_weight = LoopWeight(annotations.mT)  # c_i = a_i^T H: H is the weight

        def attend(query: Tensor) -> tuple[Tensor, Tensor]:
            weights = self.alignment(query, keys, mask, energies)
            return context_weight(weights.to(annotations.dtype).unsqueeze(1)).squeeze(1), weights

        return attend

    def alignment(
        self, projected_query: Tensor, keys: Tensor, mask: Tensor, energies: Energies | None = None
    ) -> Tensor:
        """The weights a_ij of :meth:`attend` alone.

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
        src_len]``, where the compiled kernels do not run (see :meth:`attend`): in
        training on a CPU with :class:`_Energies`' hand-written backward; in decoding on a
        CPU block by block in the cache (:func:`_blocked_energies`). A GPU runs these small
        steps at the speed it launches kernels: there the plain formulas.

        :param keys: ``[batch, src_len, attn_dim]`` from :meth:`compute_keys`
        """
        v_a = self.energy_layer.weight.squeeze(0).to(keys.dtype)  # under autocast, cast once
        on_cpu = keys.device.type == "cpu"
        if on_cpu and torch.is_grad_enabled():
            return functools.partial(_eager_energies, keys=keys, v_a=v_a)
        if on_cpu:
            return lambda query: _blocked_energies(query.to(keys.dtype), keys, v_a)

        def plain(query: Tensor) -> Tensor:
            query = query.to(keys.dtype).view(keys.size(0), -1, 1, keys.size(2))  # batch x g x 1 x attn_dim
            return (torch.add(keys.unsqueeze(1), query).tanh_() @ v_a).flatten(0, 1)

        return plain


Energies = Callable[[Tensor], Tensor]
Attend = Callable[[Tensor], tuple[Tensor, Tensor]]


def _compiled(keys: Tensor, annotations: Tensor):
    """The compiled kernels, where they take these keys and annotations: on a CPU, of one
    dtype they store."""
    if keys.device.type != "cpu" or keys.dtype not in KERNEL_DTYPES or annotations.dtype != keys.dtype:
        return None
    return kernels()


def _eager_energies(query: Tensor, keys: Tensor, v_a: Tensor) -> Tensor:
    """:class:`_Energies` for ``g`` query rows per sentence: ``[batch * g, src_len]``."""
    group = query.size(0) // keys.size(0)
    if group > 1:  # one query row per sentence, as in teacher forcing
        keys = keys.repeat_interleave(group, 0)
    return _Energies.apply(query.to(keys.dtype), keys, v_a)


class _CompiledAttention:
    """The attention of one teacher-forcing pass in training, by the compiled kernels.

    Every step's backward adds the gradients of the keys and annotations, ``[batch,
    src_len, ...]``, into one float32 sum each for the pass (and v_a's into another)
    instead of returning its own for autograd to add up; :class:`_HandOver`'s backward,
    reached after the last step's, returns the sums (as :mod:`nmt.model.loop_weight`
    does for the weights).
    """

    def __init__(self, compiled, keys: Tensor, annotations: Tensor, v_a: Tensor, mask: Tensor) -> None:
        # The autograd nodes hold the pass, not this object with its aliases, whose
        # grad_fn is one of them: no reference cycle through the graph, which would keep
        # the pass's tensors until Python's cycle collector ran.
        self.pass_ = _AttentionPass(compiled, keys, annotations, v_a, mask)
        self.aliases = _HandOver.apply(self.pass_, keys, annotations, v_a)

    def __call__(self, query: Tensor) -> tuple[Tensor, Tensor]:
        if query.size(0) != self.pass_.keys.size(0):
            raise ValueError(f"teacher forcing attends with one query row per sentence, got {query.size(0)} rows "
                             f"for {self.pass_.keys.size(0)} sentences")
        return _CompiledAttentionStep.apply(query, *self.aliases, self.pass_)


class _AttentionPass:
    """What the steps of a :class:`_CompiledAttention` share: the kernels, the keys,
    annotations, v_a and mask, and the gradient sums of each backward pass."""

    def __init__(self, compiled, keys: Tensor, annotations: Tensor, v_a: Tensor, mask: Tensor) -> None:
        self.compiled = compiled
        self.keys, self.annotations = keys.detach().contiguous(), annotations.detach().contiguous()
        self.v_a, self.mask = v_a.detach().float(), mask.contiguous()
        self.sums: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # backward pass id -> gradient sums

    def sums_for(self, task: int) -> tuple[Tensor, Tensor, Tensor]:
        """The gradient sums (keys, annotations, v_a) of backward pass ``task``, zeros at first."""
        if task not in self.sums:
            self.sums[task] = tuple(torch.zeros(t.shape) for t in (self.keys, self.annotations, self.v_a))
        return self.sums[task]


class _HandOver(torch.autograd.Function):
    """Hands the keys, annotations and v_a to the steps of :class:`_CompiledAttention`;
    its backward returns their gradients, summed over the steps."""

    @staticmethod
    def forward(ctx, attention: _AttentionPass, keys: Tensor, annotations: Tensor, v_a: Tensor):
        ctx.attention = attention
        ctx.set_materialize_grads(False)  # the steps send no gradient here: no zero tensors
        return keys.view_as(keys), annotations.view_as(annotations), v_a.view_as(v_a)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        # Only this backward pass's sums: one that asked for other gradients alone
        # (autograd.grad(..., inputs)) may have left its own.
        attention = ctx.attention
        sums = attention.sums.pop(torch._C._current_graph_task_id(), None)
        if sums is None:
            return None, *grads
        dtypes = (attention.keys.dtype, attention.annotations.dtype, attention.v_a.dtype)
        return None, *((s if g is None else s.add_(g)).to(d) for s, g, d in zip(sums, grads, dtypes))


class _CompiledAttentionStep(torch.autograd.Function):
    """One step of :class:`_CompiledAttention`: query ``[batch, attn_dim]`` -> context
    ``[batch, key_size]`` (the annotations' dtype) and weights ``[batch, src_len]``
    float32."""

    @staticmethod
    def forward(ctx, query: Tensor, keys: Tensor, annotations: Tensor, v_a: Tensor, attention: _AttentionPass):
        ctx.query_dtype = query.dtype
        query = query.to(attention.keys.dtype).contiguous()
        context, weights = attention.compiled.attention_forward(
            query, attention.keys, attention.v_a, attention.mask, attention.annotations
        )
        ctx.save_for_backward(query, weights)
        ctx.attention = attention
        ctx.set_materialize_grads(False)
        return context, weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_context: Tensor | None, grad_weights: Tensor | None):
        if grad_context is None and grad_weights is None:
            return None, None, None, None, None
        query, weights = ctx.saved_tensors
        attention = ctx.attention
        annotations = attention.annotations
        if grad_context is None:
            grad_context = annotations.new_zeros(query.size(0), annotations.size(2))
        grad_query = attention.compiled.attention_backward(
            query, attention.keys, attention.v_a, attention.mask, annotations, weights,
            grad_context.to(annotations.dtype).contiguous(),
            grad_weights.float().contiguous() if grad_weights is not None else None,
            attention.sums_for(torch._C._current_graph_task_id()),
        )
        return grad_query.to(ctx.query_dtype), None, None, None, None


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
