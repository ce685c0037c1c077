"""Bidirectional recurrent encoder (Bahdanau et al. 2015, section 3.2 and appendix A.2.1)."""

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.model import shapes
from nmt.model.cells import CELLS
from nmt.model.dropout import dropout
from nmt.model.gru import fused_gru_gates, make_gru_cell, run_gru
from nmt.model.loop_weight import LoopWeight, autocast_dtype


class Encoder(nn.Module):
    """Embeds a source sentence and reads it in both directions.

    The annotation of word j is ``h_j = [forward h_j ; backward h_j]`` (section 3.2),
    taken from the top of ``layers`` stacked bidirectional layers; layer l > 1 reads
    the concatenated annotations of layer l - 1, with dropout in between.

    ``cell="fused"`` holds a ``torch.nn.GRU`` and ``cell="lstm"`` a ``torch.nn.LSTM``,
    run over packed sequences (cuDNN on a GPU); in training on a CPU the GRU's equations
    and parameters run in a masked time loop instead (:meth:`_encode_loop`).
    ``cell="exact"`` runs :class:`~nmt.model.gru.ExactGRUCell` in that loop. Either way
    padding does not change a sentence's annotations.
    """

    def __init__(
        self,
        vocab_size: int,
        emb_dim: int,
        hidden_size: int,
        layers: int = 1,
        cell: str = "fused",
        dropout_emb: float = 0.0,
        dropout_hidden: float = 0.0,
        pad_id: int = 0,
    ) -> None:
        """
        :param vocab_size: source vocabulary size
        :param emb_dim: word embedding size
        :param hidden_size: state size per direction (annotations are twice this)
        :param layers: number of stacked bidirectional layers
        :param cell: ``"fused"``, ``"exact"`` (see :mod:`nmt.model.gru`) or ``"lstm"``
        :param dropout_emb: dropout on the word embeddings
        :param dropout_hidden: dropout between stacked layers
        :param pad_id: padding token id (its embedding stays zero)
        """
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        self.cell = cell
        self.hidden_size = hidden_size
        self.layers = layers
        self.dropout_emb = dropout_emb
        self.dropout_hidden = dropout_hidden
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        if cell in ("fused", "lstm"):
            self.rnn = (nn.GRU if cell == "fused" else nn.LSTM)(
                emb_dim,
                hidden_size,
                num_layers=layers,
                bidirectional=True,
                batch_first=True,
                dropout=dropout_hidden if layers > 1 else 0.0,
            )
        else:
            sizes = [emb_dim] + [2 * hidden_size] * (layers - 1)
            self.forward_cells = nn.ModuleList(make_gru_cell(cell, n, hidden_size) for n in sizes)
            self.backward_cells = nn.ModuleList(make_gru_cell(cell, n, hidden_size) for n in sizes)

    def forward(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a right-padded batch.

        :param src: ``[batch, src_len]`` token ids, right-padded
        :param src_lengths: ``[batch]`` number of real tokens per sentence (>= 1)
        :return: annotations ``[batch, src_len, 2 * hidden]`` (zero on padding) and the
            top layer's final backward state ``[batch, hidden]``, i.e. backward h_1,
            from which the decoder's initial state is computed (appendix A.2.2)
        """
        x = self.embed(src)  # batch x src_len x emb
        # The fused GRU runs in the time loop in training on a CPU (see _encode_loop), and
        # over packed sequences otherwise (cuDNN on a GPU), as the LSTM always does.
        in_loop = self.cell == "exact" or (
            self.cell == "fused" and x.device.type == "cpu" and torch.is_grad_enabled()
        )
        if not in_loop:
            return self._encode_packed(dropout(x, self.dropout_emb, self.training), src_lengths)
        # Under autocast, the loop's input in its dtype once, not in each direction's projection.
        x = dropout(x.to(autocast_dtype(x.device.type) or x.dtype), self.dropout_emb, self.training)
        mask = torch.arange(src.size(1), device=src.device) < src_lengths.unsqueeze(1)
        return self._encode_loop(x, mask)

    def _encode_loop(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Every layer and direction in a masked time loop.

        For the fused cell this is ``self.rnn`` (an ``nn.GRU``) computed by hand, for
        training on a CPU: PyTorch's CPU GRU over packed sequences slices the input gates
        at every step, and the backward of each slice adds a zero-filled gradient the
        size of the whole batch, work that grows with the square of the sentence length.
        Here each step reads a view, and the recurrent weights' gradients are computed
        once per sentence batch (:class:`~nmt.model.loop_weight.LoopWeight`): the
        encoder's forward and backward run 1.4-1.8x faster on one core. Without a
        backward pass to prepare for (decoding), the packed GRU is as fast.
        """
        for layer in range(self.layers):
            if layer > 0:  # dropout between layers, as nn.GRU's
                x = dropout(x, self.dropout_hidden, self.training)
            if self.cell == "exact":
                forward, backward = self.forward_cells[layer], self.backward_cells[layer]
                forward_states, _ = run_gru(forward.step, forward.project_input(x), mask)
                backward_states, backward_h1 = run_gru(backward.step, backward.project_input(x), mask, reverse=True)
            else:
                forward_states, backward_states, backward_h1 = self._fused_layer(layer, x, mask)
            x = torch.cat([forward_states, backward_states], dim=2)  # batch x src_len x 2*hidden
        return x, backward_h1  # the top layer's backward h_1

    def _fused_layer(self, layer: int, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Both directions of the fused cell's ``layer`` in one time loop, as one batch of
        twice the sentences: the backward direction reads each sentence reversed in time,
        so that its step t is the forward direction's. At every step the two recurrent
        products ``W_h h + b_h`` are one batched matmul (``[2, batch, hidden]`` by ``[2,
        hidden, 3 * hidden]``), and the gates one kernel call: on a CPU, two threads then
        share two small matmuls rather than splitting each one.

        :param x: ``[batch, src_len, input]``, in the autocast dtype under autocast
        :param mask: ``[batch, src_len]`` bool, True on real tokens
        :return: forward and backward states ``[batch, src_len, hidden]`` (zero on
            padding) and the backward direction's last state (backward h_1) ``[batch, hidden]``
        """
        batch, src_len = mask.shape
        params = [[getattr(self.rnn, f"{name}_l{layer}{suffix}") for suffix in ("", "_reverse")]
                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]  # nn.GRU's names
        (w_ih, w_ih_reverse), weight_hh, (b_ih, b_ih_reverse), bias_hh = params
        # Reversed in time, a sentence's trailing padding comes first: the state stays zero
        # through it (on padding a step keeps h) and starts at the sentence's last word.
        forward_gates = shapes.linear(x, w_ih, b_ih).unbind(1)  # batch x 3*hidden each
        backward_gates = shapes.linear(x.flip(1), w_ih_reverse, b_ih_reverse).unbind(1)
        recurrent = LoopWeight(torch.stack(weight_hh), torch.stack(bias_hh))  # 2 x 3*hidden x hidden
        real = torch.cat([mask, mask.flip(1)]).unsqueeze(2)  # 2*batch x src_len x 1
        h = x.new_zeros(2 * batch, self.hidden_size)
        states = []
        for t, real_t in enumerate(real.unbind(1)):
            gates_h = recurrent(h.view(2, batch, -1)).view(2 * batch, -1)  # 2*batch x 3*hidden
            h = fused_gru_gates((forward_gates[t], backward_gates[t]), gates_h, h, real_t)
            states.append(h)
        states = torch.stack(states, dim=1) * real  # 2*batch x src_len x hidden
        return states[:batch], states[batch:].flip(1), h[batch:]

    def _encode_packed(self, x: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor]:
        packed = pack_padded_sequence(x, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, h_n = self.rnn(packed)  # h_n: (layers * 2) x batch x hidden
        if self.cell == "lstm":
            h_n = h_n[0]  # (h_n, c_n): the outputs h, not the memories c
        annotations, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=x.size(1))
        return annotations, h_n[-1]  # the top layer's backward direction comes last
