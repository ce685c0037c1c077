"""Attentional recurrent decoder with a deep output (Bahdanau et al. 2015, appendix A.2.2)."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn

from nmt.model import shapes
from nmt.model.attention import AdditiveAttention, Attend
from nmt.model.cells import CELLS, make_cell
from nmt.model.decoder_loop import loop_pass, runs_loop
from nmt.model.dropout import dropout
from nmt.model.gru import ExactGRUCell
from nmt.model.loop_weight import LoopWeight, autocast_dtype

INIT_STATES = ("bridge", "mean", "zero")
_REUSE_LOCK = threading.Lock()  # Decoder.reusing_decoding_weights's entries and exits


class StepWeights(NamedTuple):
    """The products each decoder step computes (:class:`LoopWeight`): ``W_a s`` for the
    attention query, ``W_c c`` for the context's share of the layer-1 gates, and
    ``W_hh h + b_hh`` for layer 1's recurrent share (None for the exact GRU, whose step
    multiplies ``W_hh`` in two parts); and the attention over the pass's keys and
    annotations (:meth:`AdditiveAttention.attender`)."""

    query: LoopWeight
    context: LoopWeight
    recurrent: LoopWeight | None
    attend: Attend


class DecodingWeights(NamedTuple):
    """The matrices of :meth:`Decoder.step`, stacked so that the products that read the
    same input are one matmul: for ``E y_{i-1}`` the layer-1 gates' and the deep
    output's columns, for ``c_i`` the same, and for ``s_{i-1}`` the attention query's
    and, in a one-layer decoder whose cell takes ``W_hh h + b_hh`` (PyTorch's GRU layout,
    LSTM), the recurrent product's: a one-layer GRU decoder's step runs five matmuls, not
    six, and those are wider. Search makes them once per batch (``EncoderOutput.decoding``).
    """

    embedding: Tensor  # [gates + deep, emb_dim], gates = gate_count * hidden, deep = pool * out_dim
    embedding_bias: Tensor  # [gates + deep]: the layer-1 input bias and b_t
    context: Tensor  # [gates + deep, annotation_size]
    state: Tensor  # [attn_dim (+ gates), hidden]: W_a (and W_hh)
    state_bias: Tensor | None  # [attn_dim + gates]: zero and b_hh, when W_hh is in ``state``
    deep_state: Tensor  # [deep, hidden]: the deep output's columns for s_i
    output: Tensor  # [vocab, out_dim]: W_o
    output_bias: Tensor  # [vocab]: b_o


# The decoder state of every layer: ``[layers, batch, hidden]`` for a GRU; for an LSTM
# the pair ``(h, c)`` of two such tensors, outputs and memories.
DecoderState = Tensor | tuple[Tensor, Tensor]


def hidden_of(state: DecoderState) -> Tensor:
    """The outputs ``[layers, batch, hidden]`` that attention and deep output read."""
    return state[0] if isinstance(state, tuple) else state


def map_state(state: DecoderState, fn) -> DecoderState:
    """Apply ``fn`` to every tensor of a state (to pick, repeat or slice batch entries)."""
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


def _layer(state: DecoderState, layer: int):
    """One layer's state: ``[batch, hidden]``, or ``(h, c)`` of that shape."""
    return map_state(state, lambda s: s[layer])


def _layers(state: DecoderState) -> list:
    """The per-layer states of a state (see :func:`_layer`)."""
    return [_layer(state, layer) for layer in range(hidden_of(state).size(0))]


def _stack_layers(states: list) -> DecoderState:
    """One state ``[layers, ...]`` from the per-layer states of a step."""
    if len(states) == 1:  # a view, not a copy: one kernel less per step
        return map_state(states[0], lambda s: s.unsqueeze(0))
    if isinstance(states[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*states))
    return torch.stack(states)


class Decoder(nn.Module):
    """Predicts the next target word from the previous one, the source and its state.

    One step i (Bahdanau et al. 2015, section 3.1 and appendix A.2.2):

    1. context ``c_i = attention(s_{i-1}, h)`` from the previous top-layer state;
    2. new states ``s_i = GRU([E y_{i-1}; c_i], s_{i-1})`` in layer 1 (or an LSTM,
       whose output ``h`` plays the part of ``s``), each higher layer reading the new
       state of the layer below;
    3. deep output (Pascanu et al. 2014) ``t_i = tanh(W_t [s_i; E y_{i-1}; c_i] + b_t)``,
       or with ``maxout`` a linear map to ``2 * out_dim`` and a max over pairs
       (appendix A.2.2), then hidden dropout and ``logits_i = W_o t_i + b_o``.

    In teacher forcing only steps 1 and 2 run in the time loop: the embeddings'
    share of the layer-1 gates is projected for all steps in one matmul beforehand,
    and step 3 runs on all steps at once afterwards (its last product, the logits, with
    the loss). In training on a CPU, and in float32 on a GPU, a one-layer fused-GRU
    decoder runs the loop as one autograd function with its own backward loop
    (:mod:`nmt.model.decoder_loop`).
    """

    def __init__(
        self,
        vocab_size: int,
        emb_dim: int,
        annotation_size: int,
        hidden_size: int,
        layers: int = 1,
        attn_dim: int = 512,
        out_dim: int = 256,
        maxout: bool = False,
        cell: str = "fused",
        init_state: str = "bridge",
        dropout_emb: float = 0.0,
        dropout_hidden: float = 0.0,
        pad_id: int = 0,
    ) -> None:
        """
        :param vocab_size: target vocabulary size
        :param emb_dim: target word embedding size
        :param annotation_size: size of the encoder annotations h_j (2 * encoder hidden)
        :param hidden_size: decoder state size, every layer
        :param layers: number of stacked recurrent layers
        :param attn_dim: hidden size of the alignment model
        :param out_dim: size of the deep output t_i
        :param maxout: maxout with pool size 2 in the deep output instead of tanh
        :param cell: ``"fused"``, ``"exact"`` (see :mod:`nmt.model.gru`) or ``"lstm"``
        :param init_state: ``"bridge"``, ``"mean"`` or ``"zero"`` (see :meth:`init_state`)
        :param dropout_emb: dropout on the target word embeddings
        :param dropout_hidden: dropout on t_i and between stacked layers
        :param pad_id: padding token id (its embedding stays zero)
        """
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        if init_state not in INIT_STATES:
            raise ValueError(f"init_state must be one of {INIT_STATES}, got {init_state!r}")
        self.emb_dim = emb_dim
        self.hidden_size = hidden_size
        self.layers = layers
        self.out_dim = out_dim
        self.maxout = maxout
        self.init_state_kind = init_state
        self.lstm = cell == "lstm"
        self.dropout_emb = dropout_emb
        self.dropout_hidden = dropout_hidden

        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        self.attention = AdditiveAttention(annotation_size, hidden_size, attn_dim)
        sizes = [emb_dim + annotation_size] + [hidden_size] * (layers - 1)
        self.cells = nn.ModuleList(make_cell(cell, n, hidden_size) for n in sizes)
        if init_state == "bridge":  # W_s backward h_1; backward states are half the annotation
            self.bridge = nn.Linear(annotation_size // 2, layers * hidden_size)
        elif init_state == "mean":  # W_s mean_j h_j
            self.bridge = nn.Linear(annotation_size, layers * hidden_size)
        pool = 2 if maxout else 1
        self.deep_output = nn.Linear(hidden_size + emb_dim + annotation_size, pool * out_dim)
        self.output_layer = nn.Linear(out_dim, vocab_size)  # W_o
        self._reused: dict | None = None  # see reusing_decoding_weights: autocast dtype -> weights
        self._reusers = 0  # its blocks open

    def init_state(self, annotations: Tensor, backward_h1: Tensor, src_mask: Tensor) -> DecoderState:
        """The initial state s_0 of every layer.

        ``bridge``: ``tanh(W_s backward_h_1)`` (appendix A.2.2); ``mean``:
        ``tanh(W_s mean_j h_j)`` over real tokens; ``zero``: zeros. An LSTM starts
        from that ``h`` and an empty memory ``c = 0``.

        :param annotations: ``[batch, src_len, annotation_size]``
        :param backward_h1: ``[batch, annotation_size / 2]`` final backward encoder state
        :param src_mask: ``[batch, src_len]`` bool, True on real tokens
        :return: ``[layers, batch, hidden]``, or for an LSTM ``(h, c)`` of that shape
        """
        batch_size = annotations.size(0)
        if self.init_state_kind == "zero":
            state = annotations.new_zeros(self.layers, batch_size, self.hidden_size)
        else:
            if self.init_state_kind == "bridge":
                summary = backward_h1  # batch x annotation_size/2
            else:
                mask = src_mask.unsqueeze(2).type_as(annotations)  # batch x src_len x 1
                summary = (annotations * mask).sum(1) / mask.sum(1)  # batch x annotation_size
            state = torch.tanh(self.bridge(summary))  # batch x layers*hidden
            state = state.view(batch_size, self.layers, self.hidden_size).transpose(0, 1).contiguous()
        return (state, torch.zeros_like(state)) if self.lstm else state

    def forward(
        self, trg_in: Tensor, state: DecoderState, keys: Tensor, annotations: Tensor, src_mask: Tensor
    ) -> Tensor:
        """Teacher forcing over whole target sentences, up to the output layer: the logits
        are ``output_layer(t)``, which training computes together with its loss
        (:func:`nmt.model.output.linear_cross_entropy`).

        :param trg_in: ``[batch, trg_len]`` previous words y_{i-1} (bos first)
        :param state: initial state from :meth:`init_state`
        :param keys: ``[batch, src_len, attn_dim]`` precomputed ``U_a h_j``
        :param annotations: ``[batch, src_len, annotation_size]``
        :param src_mask: ``[batch, src_len]`` bool, True on real tokens
        :return: the deep output t_i (after hidden dropout) ``[batch, trg_len, out_dim]``
        """
        emb = self.embed(trg_in)  # batch x trg_len x emb
        dtype = autocast_dtype(emb.device.type) or emb.dtype
        # Under autocast, the embeddings in its dtype once, not in each product that reads them.
        emb = dropout(emb.to(dtype), self.dropout_emb, self.training)
        if runs_loop(self, dtype, keys, annotations):
            states, contexts = loop_pass(self, emb, state, keys, annotations, src_mask)
        else:
            states, contexts = self._loop(emb, state, keys, annotations, src_mask)
        deep = self.deep_output
        return self._activate(shapes.linear(torch.cat([states, emb, contexts], dim=-1), deep.weight, deep.bias))

    def _loop(self, emb: Tensor, state: DecoderState, keys: Tensor, annotations: Tensor,
              src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 1 and 2 of :meth:`forward` for every target word, step by step through
        autograd: the states of the top layer ``[batch, trg_len, hidden]`` and the contexts
        ``[batch, trg_len, annotation_size]``."""
        emb_gates = self.cells[0].project_input(emb)  # batch x trg_len x gates*hidden
        weights = self._step_weights(emb_gates.dtype, keys, annotations, src_mask)
        layers = _layers(state)  # a list: the steps select no layer from a stacked state
        states, contexts = [], []
        # unbind, not emb_gates[:, i]: each indexing's backward would zero-fill a full-size gradient
        for gates_i in emb_gates.unbind(1):
            layers, context, _ = self._recur(gates_i, layers, weights)
            states.append(hidden_of(layers[-1]))
            contexts.append(context)
        return torch.stack(states, dim=1), torch.stack(contexts, dim=1)

    def step(
        self,
        prev_tokens: Tensor,
        state: DecoderState,
        keys: Tensor,
        annotations: Tensor,
        src_mask: Tensor,
        weights: DecodingWeights | None = None,
    ) -> tuple[Tensor, DecoderState, Tensor]:
        """One decoding step: the equations of :meth:`forward` for one word, with the
        stacked matrices of :class:`DecodingWeights`.

        :param prev_tokens: ``[batch]`` previous words y_{i-1}
        :param state: previous states s_{i-1} (see :meth:`init_state`)
        :param keys: ``[batch, src_len, attn_dim]``
        :param annotations: ``[batch, src_len, annotation_size]``
        :param src_mask: ``[batch, src_len]`` bool, True on real tokens
        :param weights: from :meth:`decoding_weights`, made once per search; made here if None
        :return: the deep output t_i ``[batch, out_dim]``, whose logits are
            ``weights.output_bias + t_i weights.output^T`` (:meth:`logits`), new states (same
            form as ``state``) and attention weights ``[batch, src_len]``
        """
        w = weights if weights is not None else self.decoding_weights()
        dtype = w.state.dtype  # the autocast dtype under autocast
        gates_size = w.context.size(0) - w.deep_state.size(0)
        attn_dim = self.attention.query_layer.out_features
        emb = dropout(self.embed(prev_tokens), self.dropout_emb, self.training)  # batch x emb
        from_emb = torch.addmm(w.embedding_bias, emb.to(dtype), w.embedding.t())  # batch x gates+deep
        top = hidden_of(state)[-1].to(dtype)
        from_state = top @ w.state.t() if w.state_bias is None else torch.addmm(w.state_bias, top, w.state.t())
        # Search under autocast keeps the attention in the keys' float32 (see Seq2Seq.encode).
        with torch.autocast(keys.device.type, enabled=False) if keys.dtype != dtype else nullcontext():
            context, attention = self.attention.attend(from_state[:, :attn_dim], keys, annotations, src_mask)
        # layer-1 gates and the deep output's pre-activation, but for its s_i term
        from_context = torch.addmm(from_emb, context.to(dtype), w.context.t())  # batch x gates+deep
        gates, deep = from_context[:, :gates_size], from_context[:, gates_size:]
        layers = _layers(state)
        if w.state_bias is None:
            new_first = self.cells[0].step(gates, layers[0])
        else:
            new_first = self.cells[0].step(gates, layers[0], from_state[:, attn_dim:])
        new_state = _stack_layers(self._upper_layers(new_first, layers))
        t = torch.addmm(deep, hidden_of(new_state)[-1].to(dtype), w.deep_state.t())
        return self._activate(t), new_state, attention

    @staticmethod
    def logits(features: Tensor, weights: DecodingWeights) -> Tensor:
        """The output layer ``W_o t_i + b_o`` of :meth:`step`'s deep output ``[batch, out_dim]``."""
        return torch.addmm(weights.output_bias, features, weights.output.t())

    @contextmanager
    def reusing_decoding_weights(self) -> Iterator[None]:
        """A block within which the parameters do not change, such as the batches of one
        translation: there :meth:`decoding_weights` without gradients is made once per
        autocast dtype, not for every batch (in bf16 its casts took 2-3% of beam search).
        Nothing is kept past the block: an optimizer may change the parameters in place
        without a trace to check (PyTorch's fused Adam does not move their version counters)."""
        with _REUSE_LOCK:  # (a server's threads may translate with one model at once)
            self._reusers += 1
            if self._reused is None:
                self._reused = {}
        try:
            yield
        finally:
            with _REUSE_LOCK:
                self._reusers -= 1
                if self._reusers == 0:  # the last block open, nested or in another thread
                    self._reused = None

    def decoding_weights(self) -> DecodingWeights:
        """The stacked matrices of :meth:`step` (see :class:`DecodingWeights`), cast to the
        autocast dtype under autocast: make them once per search, not at every step (once
        per translation inside :meth:`reusing_decoding_weights`)."""
        reused = self._reused
        if reused is None or torch.is_grad_enabled():
            return self._decoding_weights()
        dtype = autocast_dtype(self.output_layer.weight.device.type)
        if dtype not in reused:
            reused[dtype] = self._decoding_weights()
        return reused[dtype]

    def _decoding_weights(self) -> DecodingWeights:
        cell, deep = self.cells[0], self.deep_output
        hidden, emb = self.hidden_size, self.emb_dim
        input_bias = cell.bias if isinstance(cell, ExactGRUCell) else cell.bias_ih
        query = self.attention.query_layer.weight
        state, state_bias = query, None
        if self.layers == 1 and not isinstance(cell, ExactGRUCell):  # one matmul reads s_{i-1}
            state = torch.cat([query, cell.weight_hh])
            state_bias = torch.cat([query.new_zeros(query.size(0)), cell.bias_hh])
        weights = DecodingWeights(
            embedding=torch.cat([cell.weight_ih[:, :emb], deep.weight[:, hidden : hidden + emb]]),
            embedding_bias=torch.cat([input_bias, deep.bias]),
            context=torch.cat([cell.weight_ih[:, emb:], deep.weight[:, hidden + emb :]]),
            state=state,
            state_bias=state_bias,
            deep_state=deep.weight[:, :hidden],
            output=self.output_layer.weight,
            output_bias=self.output_layer.bias,
        )
        dtype = autocast_dtype(query.device.type)
        if dtype is None:
            return weights
        return DecodingWeights(*(t.to(dtype) if t is not None else None for t in weights))

    def _step_weights(self, dtype: torch.dtype, keys: Tensor, annotations: Tensor, src_mask: Tensor) -> StepWeights:
        """The matrices every step multiplies, for one pass over the target (see
        :mod:`nmt.model.loop_weight`: in training their gradients are computed once)."""
        cell = self.cells[0]
        # Slice the context's columns of the layer-1 input weights once, not per step:
        # a slice's backward allocates a zero gradient the size of the whole weight.
        # (.to(dtype): under autocast, cast once rather than at every step.)
        context = cell.weight_ih[:, self.emb_dim :].to(dtype)
        recurrent = None if isinstance(cell, ExactGRUCell) else LoopWeight(cell.weight_hh, cell.bias_hh)
        query = LoopWeight(self.attention.query_layer.weight)
        attend = self.attention.attender(keys, annotations, src_mask)
        return StepWeights(query, LoopWeight(context), recurrent, attend)

    def _recur(self, emb_gates: Tensor, layers: list, weights: StepWeights) -> tuple[list, Tensor, Tensor]:
        """Steps 1 and 2: attention from s_{i-1}, then the stacked recurrent update.

        :param emb_gates: ``[batch, gates * hidden]`` layer-1 gates from E y_{i-1} (with bias)
        :param layers: s_{i-1} of each layer, ``[batch, hidden]`` (a pair of them for an LSTM)
        :param weights: from :meth:`_step_weights`
        :return: s_i of each layer (same form as ``layers``), c_i ``[batch, annotation_size]``,
            a_i ``[batch, src_len]``
        """
        query = weights.query(hidden_of(layers[-1]))  # W_a s_{i-1}
        context, attention = weights.attend(query)  # c_i, a_i
        gates = weights.context(context, add=emb_gates)  # E y_{i-1} part + W_c c_i
        first = layers[0]  # layer 1 reads [E y_{i-1}; c_i]
        if weights.recurrent is None:
            new_first = self.cells[0].step(gates, first)
        else:
            new_first = self.cells[0].step(gates, first, weights.recurrent(hidden_of(first)))
        return self._upper_layers(new_first, layers), context, attention

    def _upper_layers(self, new_first, layers: list) -> list:
        """s_i of every layer from layer 1's new state: each higher layer reads the new
        state of the layer below (with hidden dropout) and its own s_{i-1} from ``layers``."""
        new_layers = [new_first]
        for layer in range(1, self.layers):
            below = dropout(hidden_of(new_layers[-1]), self.dropout_hidden, self.training)
            new_layers.append(self.cells[layer](below, layers[layer]))
        return new_layers

    def _activate(self, t: Tensor) -> Tensor:
        """The deep output's nonlinearity (tanh, or maxout over pairs of units) and the
        hidden dropout: ``[..., pool * out_dim]`` -> ``[..., out_dim]``."""
        if self.maxout:  # max over pairs of units (Goodfellow et al. 2013)
            t = t.unflatten(-1, (self.out_dim, 2)).amax(-1)
        else:
            t = torch.tanh(t)  # ... x out_dim
        return dropout(t, self.dropout_hidden, self.training)
