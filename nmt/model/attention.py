"""Additive attention (Bahdanau et al. 2015, section 3.1 and appendix A.1.2)."""

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class AdditiveAttention(nn.Module):
    """The alignment model of Bahdanau et al. (2015), appendix A.1.2::

        e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j)       (energies)
        a_ij = exp(e_ij) / sum_k exp(e_ik)               (section 3.1, eq. 6)
        c_i  = sum_j a_ij h_j                            (section 3.1, eq. 5)

    ``U_a h_j`` does not depend on the decoder state, so :meth:`compute_keys` computes
    it once per sentence; each decoder step then costs one ``W_a s_{i-1}``.
    As in the paper, none of the three projections has a bias.

    In training on a CPU, the energies have their own backward (:class:`_Energies`):
    plain autograd computes the outer product in their gradient as a matmul with an
    inner size of 1, which on a CPU takes several times longer than the broadcast
    multiplication used here. (In teacher forcing the decoder computes the context with
    a :class:`~nmt.model.loop_weight.LoopWeight` of the annotations: their gradient, a sum
    of outer products over the steps, is one batched matmul after the loop.)
    In decoding on a CPU, the energies are computed block by block
    (:func:`_blocked_energies`).
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
        return self.key_layer(annotations)

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

    def alignment(self, projected_query: Tensor, keys: Tensor, mask: Tensor, v_a: Tensor | None = None) -> Tensor:
        """The weights a_ij of :meth:`attend` alone (teacher forcing computes the context
        with a :class:`~nmt.model.loop_weight.LoopWeight` of the annotations).

        :param projected_query: ``[batch * g, attn_dim]``, ``g`` rows per sentence (see :meth:`attend`)
        :param v_a: ``[attn_dim]`` this module's ``v_a``, cast once per pass, or None
        :return: ``[batch * g, src_len]``, in at least float32
        """
        if v_a is None:
            v_a = self.energy_layer.weight.squeeze(0)  # attn_dim
        v_a = v_a.to(keys.dtype)
        query = projected_query.to(keys.dtype)
        batch, src_len = mask.shape
        group = query.size(0) // batch  # query rows per sentence
        # Training on a CPU: the hand-written backward. Decoding on a CPU: the energies
        # block by block, in the cache. A GPU runs these small steps at the speed it
        # launches kernels: there the plain formulas, with the fewest operations.
        on_cpu = keys.device.type == "cpu"
        if on_cpu and torch.is_grad_enabled():
            if group > 1:  # one query row per sentence, as in teacher forcing
                keys, mask = keys.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
                batch, group = batch * group, 1
            energies = _Energies.apply(query, keys, v_a)  # batch x src_len
        elif on_cpu:
            energies = _blocked_energies(query, keys, v_a)
        else:
            energies = torch.add(keys.unsqueeze(1), query.view(batch, group, 1, -1)).tanh_() @ v_a
        energies = torch.where(mask.unsqueeze(1), energies.view(batch, group, src_len), float("-inf"))
        # normalise in at least float32, also under bfloat16 autocast
        dtype = torch.promote_types(energies.dtype, torch.float32)
        return torch.softmax(energies, dim=2, dtype=dtype).view(batch * group, src_len)


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
