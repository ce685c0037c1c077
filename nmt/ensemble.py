"""Ensembles: several models decoded as one, their log-probabilities averaged.

:class:`Ensemble` offers the decoding contract of :class:`nmt.search.Decodable`, so
greedy and beam search run on it unchanged. At each step every member predicts from
its own state and attention; the ensemble's score of a word is the mean of the
members' log-probabilities (a normalised geometric mean of their distributions, up to
the normalisation, as in fairseq's `--path A:B`), and its attention is the mean of
theirs. The members must share one target vocabulary and one source tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EnsembleEncoderOutput:
    """One encoder output per member, selected together."""

    parts: list

    def select(self, index: Tensor) -> "EnsembleEncoderOutput":
        return EnsembleEncoderOutput([part.select(index) for part in self.parts])


class Ensemble:
    """Decode with several models at once (see the module docstring)."""

    def __init__(self, models: list):
        if not models:
            raise ValueError("an ensemble needs at least one model")
        first = models[0]
        for m in models[1:]:
            if (m.pad_id, m.bos_id, m.eos_id) != (first.pad_id, first.bos_id, first.eos_id):
                raise ValueError("ensemble members disagree on the special ids")
        self.models = list(models)
        self.pad_id, self.bos_id, self.eos_id = first.pad_id, first.bos_id, first.eos_id

    def eval(self) -> "Ensemble":
        for m in self.models:
            m.eval()
        return self

    def encode(self, src: Tensor, src_lengths: Tensor) -> EnsembleEncoderOutput:
        return EnsembleEncoderOutput([m.encode(src, src_lengths) for m in self.models])

    def init_state(self, enc: EnsembleEncoderOutput) -> list:
        return [m.init_state(part) for m, part in zip(self.models, enc.parts)]

    def decode_step(self, prev_tokens: Tensor, state: list, enc: EnsembleEncoderOutput) -> tuple[Tensor, list, Tensor]:
        """:return: mean log-probabilities ``[batch * k, trg_vocab]``, the members' states,
        mean attention ``[batch * k, src_len]`` (``k`` rows per sentence of ``enc``, as
        :meth:`nmt.model.Seq2Seq.decode_step`)"""
        steps = [m.decode_step(prev_tokens, s, part) for m, s, part in zip(self.models, state, enc.parts)]
        if len(steps) == 1:
            return steps[0][0], [steps[0][1]], steps[0][2]
        log_probs = torch.stack([s[0] for s in steps]).mean(0)
        attention = torch.stack([s[2] for s in steps]).mean(0)
        return log_probs, [s[1] for s in steps], attention

    def reorder_state(self, state: list, index: Tensor) -> list:
        return [m.reorder_state(s, index) for m, s in zip(self.models, state)]

    @contextmanager
    def reusing_decoding_weights(self) -> Iterator[None]:
        """Every member's :meth:`nmt.model.Seq2Seq.reusing_decoding_weights`."""
        with ExitStack() as stack:
            for m in self.models:
                stack.enter_context(m.reusing_decoding_weights())
            yield


def load_ensemble(paths: list, device="cpu"):
    """Load one checkpoint (a plain LoadedModel) or several as one Ensemble LoadedModel.

    The first checkpoint supplies the tokenizers, recipe and decoding defaults; every
    member must use the same vocabularies.
    """
    from nmt.checkpoint import CheckpointError, LoadedModel, load_model

    members = [load_model(p, device) for p in paths]
    first = members[0]
    if len(members) == 1:
        return first
    for m in members[1:]:
        if not (m.src_tok.same_vocabulary(first.src_tok) and m.trg_tok.same_vocabulary(first.trg_tok)):
            raise CheckpointError(f"{m.path}: its vocabulary differs from {first.path}'s; "
                                  "the models of an ensemble must share one")
    return LoadedModel(model=Ensemble([m.model for m in members]), src_tok=first.src_tok, trg_tok=first.trg_tok,
                       max_src_len=min(m.max_src_len for m in members), recipe=first.recipe, path=first.path,
                       payload=first.payload)
