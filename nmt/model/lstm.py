"""The long short-term memory cell (Hochreiter & Schmidhuber 1997, with the forget gate
of Gers et al. 2000), as ``torch.nn.LSTMCell`` computes it.

It offers the GRU cells' interface (:mod:`nmt.model.gru`): ``project_input`` outside
the time loop, ``step`` inside it. Its state is a pair ``(h, c)``: the output ``h``,
which the next layer and the attention read, and the memory ``c``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from nmt.model.gru import TorchLayoutCell

LSTMState = tuple[Tensor, Tensor]


class LSTMCell(TorchLayoutCell):
    """The cell of ``torch.nn.LSTMCell`` (and cuDNN), with the same parameter layout
    (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``; gate order i, f, g, o)::

        i_t = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)      input gate
        f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)      forget gate
        g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)         candidate
        o_t = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)      output gate
        c_t = f_t * c_{t-1} + i_t * g_t
        h_t = o_t * tanh(c_t)
    """

    gates = 4  # i, f, g, o

    def step(self, gates_x: Tensor, state: LSTMState, gates_h: Tensor | None = None) -> LSTMState:
        """One ``nn.LSTMCell`` step.

        :param gates_x: ``[batch, 4 * hidden]`` from ``project_input``
        :param state: ``(h, c)``, each ``[batch, hidden]``
        :param gates_h: ``W_hh h + b_hh`` if the caller computed it already
        :return: the new ``(h, c)``
        """
        h, c = state
        if gates_h is None:
            gates_h = F.linear(h, self.weight_hh, self.bias_hh)
        gates = gates_x + gates_h
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, x: Tensor, state: LSTMState) -> LSTMState:
        """One step from the raw input ``[batch, input]``."""
        return self.step(self.project_input(x), state)
