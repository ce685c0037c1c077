"""Additive attention (Bahdanau et al. 2015, section 3.1 and appendix A.1.2)."""

import torch
from torch import Tensor, nn


class AdditiveAttention(nn.Module):
    """The alignment model of Bahdanau et al. (2015), appendix A.1.2::

        e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j)       (energies)
        a_ij = exp(e_ij) / sum_k exp(e_ik)               (section 3.1, eq. 6)
        c_i  = sum_j a_ij h_j                            (section 3.1, eq. 5)

    ``U_a h_j`` does not depend on the decoder state, so :meth:`compute_keys` computes
    it once per sentence; each decoder step then costs one ``W_a s_{i-1}``.
    As in the paper, none of the three projections has a bias.
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
        """:meth:`forward` from ``W_a s_{i-1}`` ``[batch, attn_dim]``, already computed."""
        query = projected_query.unsqueeze(1)  # batch x 1 x attn_dim
        energies = self.energy_layer(torch.tanh(query + keys)).squeeze(2)  # batch x src_len
        energies = torch.where(mask, energies, float("-inf"))
        # normalise in at least float32, also under bfloat16 autocast
        dtype = torch.promote_types(energies.dtype, torch.float32)
        weights = torch.softmax(energies, dim=1, dtype=dtype)  # batch x src_len
        context = torch.bmm(weights.unsqueeze(1).type_as(annotations), annotations)
        return context.squeeze(1), weights  # batch x key_size, batch x src_len
