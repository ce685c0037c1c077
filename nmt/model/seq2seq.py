"""The RNN encoder-decoder with attention (Cho et al. 2014; Bahdanau et al. 2015).

:class:`Seq2Seq` exposes exactly what training and search need: ``forward`` (teacher
forcing), ``encode``, ``init_state``, ``decode_step`` and ``reorder_state``.
"""

from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt.model.cells import CELLS, gate_count
from nmt.model.decoder import INIT_STATES, Decoder, DecoderState, DecodingWeights, map_state
from nmt.model.encoder import Encoder
from nmt.model.native import KERNEL_DTYPES, kernels
from nmt.model.output import linear_cross_entropy


@dataclass
class EncoderOutput:
    """Everything the decoder needs from the source, computed once per sentence.

    :ivar annotations: ``[batch, src_len, 2 * enc_hidden]`` the h_j, zero on padding
    :ivar keys: ``[batch, src_len, attn_dim]`` the precomputed ``U_a h_j``
    :ivar mask: ``[batch, src_len]`` bool, True on real tokens
    :ivar backward_h1: ``[batch, enc_hidden]`` final backward encoder state
    :ivar decoding: the decoder's stacked step matrices, made once per batch for search
        (when gradients are off), else None; :meth:`select` passes them on unchanged
    """

    annotations: Tensor
    keys: Tensor
    mask: Tensor
    backward_h1: Tensor
    decoding: DecodingWeights | None = None

    def select(self, index: Tensor) -> "EncoderOutput":
        """Pick sentences along the batch, e.g. to drop finished ones (beams share their
        sentence's row: see :meth:`Seq2Seq.decode_step`).

        :param index: ``[n]`` long, batch positions to keep (repeats allowed)
        """
        return EncoderOutput(
            self.annotations.index_select(0, index),
            self.keys.index_select(0, index),
            self.mask.index_select(0, index),
            self.backward_h1.index_select(0, index),
            self.decoding,
        )


class Seq2Seq(nn.Module):
    """Bidirectional recurrent encoder, additive attention and a recurrent decoder with
    deep output; GRUs (Cho et al. 2014) or LSTMs.

    Parameters are initialised as follows: input-to-hidden recurrent matrices
    Xavier-uniform (per gate), hidden-to-hidden matrices orthogonal (per gate), other
    matrices Xavier-uniform, all biases zero except the LSTM forget gates' (one, as
    Jozefowicz et al. 2015 advise), embeddings ``normal(0, emb_dim ** -0.5)`` with a
    zero padding row.
    """

    def __init__(
        self,
        *,
        src_vocab_size: int,
        trg_vocab_size: int,
        emb_dim: int = 256,
        enc_hidden: int = 256,
        enc_layers: int = 1,
        dec_hidden: int = 512,
        dec_layers: int = 1,
        attn_dim: int = 512,
        out_dim: int = 256,
        maxout: bool = False,
        cell: str = "fused",
        init_state: str = "bridge",
        tie_output: bool = False,
        tie_all: bool = False,
        dropout_emb: float = 0.0,
        dropout_hidden: float = 0.0,
        dropout_word: float = 0.0,
        pad_id: int = 0,
        unk_id: int = 1,
        bos_id: int = 2,
        eos_id: int = 3,
    ) -> None:
        """
        :param src_vocab_size: source vocabulary size (special ids included)
        :param trg_vocab_size: target vocabulary size (special ids included)
        :param emb_dim: word embedding size, source and target
        :param enc_hidden: encoder GRU size per direction
        :param enc_layers: stacked bidirectional encoder layers
        :param dec_hidden: decoder GRU size
        :param dec_layers: stacked decoder layers
        :param attn_dim: hidden size of the alignment model
        :param out_dim: size of the deep output layer
        :param maxout: maxout (pool 2) instead of tanh in the deep output
        :param cell: ``"fused"`` (PyTorch/cuDNN GRU), ``"exact"`` (Cho et al. 2014) or
            ``"lstm"`` (PyTorch/cuDNN LSTM)
        :param init_state: decoder initial state, ``"bridge"``, ``"mean"`` or ``"zero"``
        :param tie_output: share the target embedding with the output projection
            (needs ``out_dim == emb_dim``)
        :param tie_all: also share it with the source embedding (needs equal
            vocabulary sizes); implies ``tie_output``
        :param dropout_emb: dropout on word embeddings
        :param dropout_hidden: dropout on the deep output and between stacked layers
        :param dropout_word: in training, probability of replacing a source or target
            input word (not pad or bos) with ``unk_id``
        :param pad_id: padding id; ``unk_id``, ``bos_id``, ``eos_id``: special ids
        """
        super().__init__()
        self._config = dict(
            src_vocab_size=src_vocab_size, trg_vocab_size=trg_vocab_size, emb_dim=emb_dim,
            enc_hidden=enc_hidden, enc_layers=enc_layers, dec_hidden=dec_hidden,
            dec_layers=dec_layers, attn_dim=attn_dim, out_dim=out_dim, maxout=maxout, cell=cell,
            init_state=init_state, tie_output=tie_output, tie_all=tie_all,
            dropout_emb=dropout_emb, dropout_hidden=dropout_hidden, dropout_word=dropout_word,
            pad_id=pad_id, unk_id=unk_id, bos_id=bos_id, eos_id=eos_id,
        )
        _validate(self._config)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = pad_id, unk_id, bos_id, eos_id
        self.dropout_word = dropout_word

        self.encoder = Encoder(
            vocab_size=src_vocab_size,
            emb_dim=emb_dim,
            hidden_size=enc_hidden,
            layers=enc_layers,
            cell=cell,
            dropout_emb=dropout_emb,
            dropout_hidden=dropout_hidden,
            pad_id=pad_id,
        )
        self.decoder = Decoder(
            vocab_size=trg_vocab_size,
            emb_dim=emb_dim,
            annotation_size=2 * enc_hidden,
            hidden_size=dec_hidden,
            layers=dec_layers,
            attn_dim=attn_dim,
            out_dim=out_dim,
            maxout=maxout,
            cell=cell,
            init_state=init_state,
            dropout_emb=dropout_emb,
            dropout_hidden=dropout_hidden,
            pad_id=pad_id,
        )
        self._reset_parameters()
        if tie_output or tie_all:  # Press & Wolf (2017)
            self.decoder.output_layer.weight = self.decoder.embed.weight
        if tie_all:
            self.encoder.embed.weight = self.decoder.embed.weight

    @property
    def config(self) -> dict:
        """The constructor arguments: ``Seq2Seq(**model.config)`` rebuilds the model."""
        return dict(self._config)

    def forward(
        self,
        src: Tensor,
        src_lengths: Tensor,
        trg_in: Tensor,
        trg_out: Tensor | None = None,
        *,
        label_smoothing: float = 0.0,
    ) -> Tensor:
        """Teacher forcing: the logits, or with ``trg_out`` the training loss.

        The loss is computed with the output layer (:func:`nmt.model.output.linear_cross_entropy`),
        without holding the logits of the whole batch. It goes through ``forward`` so that
        DistributedDataParallel sees every parameter used.

        :param src: ``[batch, src_len]`` source ids, right-padded with ``pad_id``
        :param src_lengths: ``[batch]`` source lengths (>= 1)
        :param trg_in: ``[batch, trg_len]`` target ids shifted right (``bos_id`` first)
        :param trg_out: ``[batch, trg_len]`` the words to predict (``trg_in`` shifted left,
            ``eos_id`` last), ``pad_id`` where there is none
        :param label_smoothing: epsilon of the label-smoothed loss
        :return: logits ``[batch, trg_len, trg_vocab]``, or with ``trg_out`` the
            cross-entropy summed over its tokens other than ``pad_id`` (a float32 scalar)
        """
        if self.training and self.dropout_word > 0:
            src, trg_in = self._word_dropout(src), self._word_dropout(trg_in)
        enc = self._encode(src, src_lengths, search=False)  # also for a validation loss without gradients
        state = self.init_state(enc)
        features = self.decoder(trg_in, state, enc.keys, enc.annotations, enc.mask)  # batch x trg_len x out_dim
        output = self.decoder.output_layer
        if trg_out is None:
            return output(features)
        return linear_cross_entropy(features.flatten(0, 1), output.weight, output.bias, trg_out.flatten(),
                                    smoothing=label_smoothing, ignore_index=self.pad_id)

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        """Encode the source and precompute the attention keys; with gradients off
        (search), also the decoder's stacked step matrices (``EncoderOutput.decoding``).

        :param src: ``[batch, src_len]`` source ids, right-padded
        :param src_lengths: ``[batch]`` source lengths (>= 1)
        """
        return self._encode(src, src_lengths, search=not torch.is_grad_enabled())

    def _encode(self, src: Tensor, src_lengths: Tensor, search: bool) -> EncoderOutput:
        annotations, backward_h1 = self.encoder(src, src_lengths)
        positions = torch.arange(src.size(1), device=src.device)
        mask = positions < src_lengths.unsqueeze(1)  # batch x src_len
        keys = self.decoder.attention.compute_keys(annotations)  # batch x src_len x attn_dim
        if not search:
            # Under autocast the keys come out in its lower precision; cast the annotations
            # once here, not at every decoder step's context product.
            return EncoderOutput(annotations.to(keys.dtype), keys, mask, backward_h1)
        # Search keeps the attention in float32 also under autocast: its elementwise work
        # gains nothing from bfloat16 on a CPU, and there beam 5 ran 1.2x slower with it in
        # bfloat16 and lost 0.1 BLEU on Multi30k (40.40 against 40.51).
        dtype = torch.promote_types(annotations.dtype, torch.float32)
        decoding = self.decoder.decoding_weights()
        return EncoderOutput(annotations.to(dtype), keys.to(dtype), mask, backward_h1, decoding)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        """Initial decoder state ``[layers, batch, dec_hidden]`` (for an LSTM a pair
        ``(h, c)`` of them); search passes it on without looking inside."""
        return self.decoder.init_state(enc.annotations, enc.backward_h1, enc.mask)

    def decode_step(
        self, prev_tokens: Tensor, state: DecoderState, enc: EncoderOutput
    ) -> tuple[Tensor, DecoderState, Tensor]:
        """One decoder step.

        :param prev_tokens: ``[batch * k]`` previous target ids (``bos_id`` at the start),
            ``k`` consecutive rows per sentence of ``enc`` (the beams; 1 in greedy search)
        :param state: from :meth:`init_state` (its rows repeated ``k`` times) or the
            previous step
        :param enc: the (selected) encoder output for this batch, one row per sentence
        :return: log-probabilities ``[batch * k, trg_vocab]`` (float32), the new state and
            attention weights ``[batch * k, src_len]``
        """
        matrices = enc.decoding if enc.decoding is not None else self.decoder.decoding_weights()
        features, state, weights = self.decoder.step(prev_tokens, state, enc.keys, enc.annotations, enc.mask, matrices)
        compiled = kernels() if features.device.type == "cpu" and features.dtype in KERNEL_DTYPES else None
        if compiled is not None and not torch.is_grad_enabled():
            # The output bias added in the kernel's passes, not by addmm in one of its own;
            # bf16 logits read as they are, not cast to float32 first.
            logits = features @ matrices.output.t()
            return compiled.log_softmax(logits, matrices.output_bias.float()), state, weights
        logits = self.decoder.logits(features, matrices)
        return F.log_softmax(logits, dim=-1, dtype=torch.float32), state, weights

    def reusing_decoding_weights(self) -> ContextManager[None]:
        """A block within which the parameters do not change (one translation's batches):
        see :meth:`Decoder.reusing_decoding_weights`."""
        return self.decoder.reusing_decoding_weights()

    @staticmethod
    def reorder_state(state: DecoderState, index: Tensor) -> DecoderState:
        """Pick batch entries of a decoder state (each tensor ``[layers, batch, dec_hidden]``).

        :param index: ``[n]`` long, batch positions to keep (repeats allowed)
        """
        return map_state(state, lambda s: s.index_select(1, index))

    def _word_dropout(self, tokens: Tensor) -> Tensor:
        """Replace each word other than pad and bos with unk with prob. ``dropout_word``.

        :param tokens: ``[batch, len]``; :return: ``[batch, len]``
        """
        drop = torch.rand(tokens.shape, device=tokens.device) < self.dropout_word
        drop &= (tokens != self.pad_id) & (tokens != self.bos_id)
        return tokens.masked_fill(drop, self.unk_id)

    def _reset_parameters(self) -> None:
        gates = gate_count(self._config["cell"])
        for name, param in self.named_parameters():
            if param.dim() == 1:
                nn.init.zeros_(param)
                if gates == 4 and "bias_ih" in name:  # LSTM gate order i, f, g, o
                    nn.init.ones_(param.data.chunk(4)[1])
            elif "weight_hh" in name:  # recurrent matrices, one block per gate
                for block in param.data.chunk(gates, dim=0):
                    nn.init.orthogonal_(block)
            elif "weight_ih" in name:
                for block in param.data.chunk(gates, dim=0):
                    nn.init.xavier_uniform_(block)
            else:
                nn.init.xavier_uniform_(param)
        for embed in (self.encoder.embed, self.decoder.embed):
            nn.init.normal_(embed.weight, 0.0, embed.embedding_dim**-0.5)
            with torch.no_grad():
                embed.weight[embed.padding_idx].zero_()


def _validate(config: dict) -> None:
    """Raise ValueError naming the first bad argument."""
    for key in ("src_vocab_size", "trg_vocab_size", "emb_dim", "enc_hidden", "enc_layers",
                "dec_hidden", "dec_layers", "attn_dim", "out_dim"):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    for key in ("maxout", "tie_output", "tie_all"):
        if not isinstance(config[key], bool):
            raise ValueError(f"{key} must be a bool, got {config[key]!r}")
    for key in ("dropout_emb", "dropout_hidden", "dropout_word"):
        value = config[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"{key} must be in [0, 1), got {value!r}")
    if config["cell"] not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {config['cell']!r}")
    if config["init_state"] not in INIT_STATES:
        raise ValueError(f"init_state must be one of {INIT_STATES}, got {config['init_state']!r}")
    specials = ("pad_id", "unk_id", "bos_id", "eos_id")
    if len({config[key] for key in specials}) != len(specials):
        raise ValueError(f"{', '.join(specials)} must be distinct")
    vocab = min(config["src_vocab_size"], config["trg_vocab_size"])
    for key in specials:
        if not 0 <= config[key] < vocab:
            raise ValueError(f"{key} must be a valid id below both vocabulary sizes ({vocab})")
    if config["tie_all"] and config["src_vocab_size"] != config["trg_vocab_size"]:
        raise ValueError("tie_all needs src_vocab_size == trg_vocab_size")
    if (config["tie_output"] or config["tie_all"]) and config["out_dim"] != config["emb_dim"]:
        raise ValueError("tie_output (and tie_all) need out_dim == emb_dim")
