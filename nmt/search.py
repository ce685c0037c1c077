"""Greedy and beam search: free functions, tensors in, hypotheses out.

Search uses only the model's decoding contract (:class:`Decodable`: ``encode``,
``init_state``, ``decode_step``, ``reorder_state``, ``EncoderOutput.select`` and the
special ids), so any model that offers it can be decoded.

Rules shared by both searches:

* Sentences and beams are decoded together as one batch; a sentence leaves the
  batch as soon as it is finished, so the work shrinks as decoding proceeds.
* ``pad`` and ``bos`` are never emitted (their log-probabilities are set to -inf,
  nothing is renormalised).
* A sentence of ``n`` source tokens may emit at most
  ``max_len = int(max_len_a * n + max_len_b)`` tokens before eos. At step
  ``max_len`` only eos is allowed, with its own log-probability, so every score
  is the model's log-probability ``log p(y_1 .. y_m, eos | x)`` of a hypothesis
  with ``m <= max_len``: the search space is exactly these sequences.
* Call ``model.eval()`` first; search does not change the model's mode. It runs
  under ``torch.inference_mode()``.
"""

from dataclasses import dataclass
from typing import Any, ContextManager, Protocol

import torch
from torch import Tensor

from nmt.model.native import kernels
from nmt.model.seq2seq import EncoderOutput

LENGTH_NORMS = ("gnmt", "average", "none")


# A decoder state is opaque to search: it only passes it to ``decode_step`` and
# ``reorder_state`` (a tensor for a GRU decoder, a pair of tensors for an LSTM).
State = Any


class Decodable(Protocol):
    """The decoding contract search relies on; :class:`nmt.model.Seq2Seq` implements it."""

    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput: ...

    def init_state(self, enc: EncoderOutput) -> State: ...

    def decode_step(
        self, prev_tokens: Tensor, state: State, enc: EncoderOutput
    ) -> tuple[Tensor, State, Tensor]:
        """One step for ``k`` consecutive rows of ``prev_tokens`` and ``state`` per
        sentence of ``enc`` (``k`` = 1 in greedy search, the beams in beam search)."""
        ...

    def reorder_state(self, state: State, index: Tensor) -> State: ...

    def reusing_decoding_weights(self) -> ContextManager[None]:
        """A block within which the parameters do not change, so that what a search
        prepares from them is made once for many batches (``translate_ids`` wraps its
        batches in it)."""
        ...


@dataclass
class Hypothesis:
    """One translation.

    :ivar tokens: target ids, without bos and eos
    :ivar score: log-probability of ``tokens`` followed by eos, after the length penalty
    :ivar attention: ``[len(tokens) + 1, src_len]`` attention weights, one row per
        emitted token (eos included), over this sentence's own source positions
    """

    tokens: list[int]
    score: float
    attention: Tensor


@torch.inference_mode()
def greedy_search(
    model: Decodable,
    src: Tensor,
    src_lengths: Tensor,
    *,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[list[Hypothesis]]:
    """Pick the most probable word at every step.

    :param model: a :class:`~nmt.model.Seq2Seq`, in eval mode
    :param src: ``[batch, src_len]`` source ids, right-padded
    :param src_lengths: ``[batch]`` source lengths
    :param max_len_a: ``max_len = int(max_len_a * src_length + max_len_b)``
    :param max_len_b: see ``max_len_a``
    :return: for every sentence a list holding one hypothesis, scored by its
        log-probability (no length penalty)
    """
    batch_size = src.size(0)
    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)
    max_lens = _max_lengths(src_lengths.cpu(), max_len_a, max_len_b)  # batch, on the CPU
    sentence_ids = torch.arange(batch_size, device=src.device)  # batch row -> sentence
    prev_tokens = torch.full_like(sentence_ids, model.bos_id)
    scores = torch.zeros(batch_size, device=src.device)
    tokens = src.new_empty(batch_size, 0)  # batch x step
    attention = torch.empty(batch_size, 0, src.size(1), device=src.device)  # batch x step x src_len
    results: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    src_lens = src_lengths.tolist()

    step = 0
    while sentence_ids.numel() > 0:
        log_probs, state, weights = model.decode_step(prev_tokens, state, enc)
        log_probs = _restrict(log_probs, model, force_eos=max_lens <= step)  # batch x vocab
        best_log_probs, prev_tokens = log_probs.max(dim=1)  # batch
        scores = scores + best_log_probs
        tokens = torch.cat([tokens, prev_tokens.unsqueeze(1)], dim=1)
        attention = torch.cat([attention, weights.unsqueeze(1)], dim=1)

        done = prev_tokens == model.eos_id  # batch
        if done.any():
            rows = done.nonzero().squeeze(1)
            for sid, hyp_tokens, score, hyp_attention in zip(
                sentence_ids[rows].tolist(),
                tokens[rows, :-1].tolist(),
                scores[rows].tolist(),
                attention[rows],
            ):
                hyp_attention = hyp_attention[:, : src_lens[sid]]
                results[sid].append(Hypothesis(hyp_tokens, score, hyp_attention))
            keep = (~done).nonzero().squeeze(1)  # unfinished sentences stay in the batch
            sentence_ids, max_lens = sentence_ids[keep], max_lens[keep.cpu()]
            prev_tokens = prev_tokens[keep]
            scores, tokens, attention = scores[keep], tokens[keep], attention[keep]
            state, enc = model.reorder_state(state, keep), enc.select(keep)
        step += 1
    return results


@torch.inference_mode()
def beam_search(
    model: Decodable,
    src: Tensor,
    src_lengths: Tensor,
    *,
    beam_size: int = 5,
    length_penalty: float = 1.0,
    length_norm: str = "gnmt",
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    nbest: int = 1,
) -> list[list[Hypothesis]]:
    """Beam search over a batch of sentences.

    Every step extends the ``beam_size`` live hypotheses of each sentence by every
    word and ranks the ``2 * beam_size`` best extensions by log-probability. Those
    that end in eos and rank within the first ``beam_size`` are set aside as
    finished; the ``beam_size`` best that do not end in eos stay live. A sentence is
    finished when ``beam_size`` hypotheses have finished (the usual early stopping,
    as in fairseq) or when it reaches its maximum length (see the module docstring).

    Finished hypotheses are ranked by log-probability divided by a length penalty,
    where ``|Y|`` counts the emitted tokens including eos:

    * ``"gnmt"``: ``((5 + |Y|) / 6) ** length_penalty`` (Wu et al. 2016, section 7);
    * ``"average"``: ``|Y|`` (``length_penalty`` is not used);
    * ``"none"``: 1.

    :param model: a :class:`~nmt.model.Seq2Seq`, in eval mode
    :param src: ``[batch, src_len]`` source ids, right-padded
    :param src_lengths: ``[batch]`` source lengths
    :param beam_size: live hypotheses per sentence
    :param length_penalty: alpha of the gnmt length penalty
    :param length_norm: ``"gnmt"``, ``"average"`` or ``"none"``
    :param max_len_a: ``max_len = int(max_len_a * src_length + max_len_b)``
    :param max_len_b: see ``max_len_a``
    :param nbest: hypotheses to return per sentence (at most ``beam_size``)
    :return: for every sentence its ``nbest`` best hypotheses, best first (fewer
        only if fewer sequences exist)
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest must be between 1 and beam_size ({beam_size}), got {nbest}")
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    k, device = beam_size, src.device
    # n: sentences still in the batch, w: rows per sentence, row s * w + b its beam b. At
    # the first step a sentence has one hypothesis (bos), so one row (w = 1), not k equal
    # ones; from the second on, k. Its encoding is shared by its rows.
    n, w = src.size(0), 1
    src_lens = src_lengths.tolist()
    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)

    sentence_ids = torch.arange(n, device=device)  # batch sentence -> input sentence
    max_lens = _max_lengths(src_lengths.cpu(), max_len_a, max_len_b)  # n, on the CPU
    n_finished = torch.zeros(n, dtype=torch.long, device=device)  # n
    scores = torch.zeros(n, w, device=device)  # n x w, raw log-probs
    prev_tokens = torch.full((n * w,), model.bos_id, dtype=torch.long, device=device)
    tokens = src.new_empty(n * w, 0)  # n*w x step
    attention = torch.empty(n * w, 0, src.size(1), device=device)  # n*w x step x src_len
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]

    step = 0
    while n > 0:
        log_probs, state, weights = model.decode_step(prev_tokens, state, enc)  # n*w x vocab
        if w < k and w * log_probs.size(1) < 2 * k:  # too few words for 2k candidates: k rows,
            rows = torch.arange(n, device=device).repeat_interleave(k)  # all but one at -inf
            log_probs, weights, state = log_probs[rows], weights[rows], model.reorder_state(state, rows)
            tokens, attention = tokens[rows], attention[rows]
            scores = torch.cat([scores, scores.new_full((n, k - w), float("-inf"))], dim=1)
            w = k
        force_eos = (max_lens <= step).repeat_interleave(w)
        log_probs = _restrict(log_probs, model, force_eos)
        # The 2k best extensions of a sentence are among the 2k best of each of its
        # beams: rank each beam's words first, then only k x 2k candidates, instead of
        # adding the scores to, and ranking, the whole k x vocabulary.
        per_beam = min(2 * k, log_probs.size(1))
        beam_scores, beam_tokens = top_per_row(log_probs, per_beam)  # n*w x per_beam
        candidates = (scores.view(-1, 1) + beam_scores).view(n, w * per_beam)
        top_scores, top_ids = candidates.topk(2 * k, dim=1)  # n x 2k
        top_tokens = beam_tokens.view(n, w * per_beam).gather(1, top_ids)  # n x 2k
        top_rows = top_ids // per_beam + w * torch.arange(n, device=device).unsqueeze(1)  # n x 2k
        ends = top_tokens == model.eos_id  # n x 2k

        # Set aside hypotheses that end in eos within the top k.
        new_finished = ends & top_scores.isfinite()
        new_finished[:, k:] = False
        if new_finished.any():
            sentence, position = new_finished.nonzero(as_tuple=True)
            hyp_rows = top_rows[sentence, position]
            hyp_attention = torch.cat(
                [attention[hyp_rows], weights[hyp_rows].unsqueeze(1)], dim=1
            )  # finished x step+1 x src_len
            normaliser = _length_normaliser(step + 1, length_norm, length_penalty)
            for sid, hyp_tokens, score, hyp_attn in zip(
                sentence_ids[sentence].tolist(),
                tokens[hyp_rows].tolist(),
                (top_scores[sentence, position] / normaliser).tolist(),
                hyp_attention,
            ):
                finished[sid].append(Hypothesis(hyp_tokens, score, hyp_attn[:, : src_lens[sid]]))
            n_finished += new_finished.sum(dim=1)

        # The k best extensions that do not end in eos stay live.
        scores, live = top_scores.masked_fill(ends, float("-inf")).topk(k, dim=1)  # n x k
        live_rows = top_rows.gather(1, live)  # n x k
        live_tokens = top_tokens.gather(1, live)  # n x k

        # Finished sentences leave the batch.
        done = (n_finished >= k) | (max_lens <= step).to(device)  # n
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            scores, live_rows, live_tokens = scores[keep], live_rows[keep], live_tokens[keep]
            sentence_ids, max_lens = sentence_ids[keep], max_lens[keep.cpu()]
            n_finished = n_finished[keep]
            n = keep.numel()
            enc = enc.select(keep)
        live_rows, prev_tokens = live_rows.view(-1), live_tokens.view(-1)  # n*k
        state = model.reorder_state(state, live_rows)
        tokens = torch.cat([tokens[live_rows], prev_tokens.unsqueeze(1)], dim=1)
        attention = torch.cat([attention[live_rows], weights[live_rows].unsqueeze(1)], dim=1)
        w = k
        step += 1

    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]


def _max_lengths(src_lengths: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
    """``int(max_len_a * src_length + max_len_b)`` per sentence: ``[batch]`` long."""
    return (src_lengths.double() * max_len_a + max_len_b).long()


def top_per_row(scores: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor]:
    """``scores.topk(k, dim=1)``: the ``k`` largest values of every row, largest first,
    and their columns; on a CPU, faster for rows much wider than ``k``.

    PyTorch's CPU topk copies every row into a buffer of (value, index) pairs before
    selecting: 6.2-6.5 ms for 320 x 8,000 on one core. Here one vectorised pass takes the
    maximum of every block of ``block`` columns; a row's ``k`` largest values lie in its
    ``k`` blocks with the largest maxima (a value outside them has ``k`` block maxima at
    least as large), so topk runs only on those ``k * block`` columns, and on the
    columns after the last whole block: 2.7-3.7 ms. With the compiled kernels
    (:mod:`nmt.model.native`) the same in one pass over each row: 1.2 ms against 2.3 (on
    another machine). Equal values may come in another order.

    :param scores: ``[rows, columns]``
    :return: values and column indices, ``[rows, k]`` each
    """
    rows, columns = scores.shape
    blocks = columns // block
    if scores.device.type != "cpu" or blocks <= 2 * k:  # a GPU's topk is fast; narrow rows gain nothing
        return scores.topk(k, dim=1)
    compiled = kernels() if scores.dtype == torch.float32 and k <= 64 and scores.is_contiguous() else None
    if compiled is not None:  # the same, in one pass over each row
        return compiled.top_k(scores, k, block)
    whole = blocks * block
    maxima = scores[:, :whole].unflatten(1, (blocks, block)).amax(2)  # rows x blocks
    best_blocks = maxima.topk(k, dim=1).indices  # rows x k
    offsets = torch.arange(block, device=scores.device)
    candidates = (best_blocks.unsqueeze(2) * block + offsets).flatten(1)  # rows x k*block
    if whole < columns:
        tail = torch.arange(whole, columns, device=scores.device).expand(rows, -1)
        candidates = torch.cat([candidates, tail], dim=1)
    values, picked = scores.gather(1, candidates).topk(k, dim=1)
    return values, candidates.gather(1, picked)


def _restrict(log_probs: Tensor, model: Decodable, force_eos: Tensor) -> Tensor:
    """Forbid pad and bos everywhere, and everything but eos where ``force_eos``, in place.

    In place and row by row, because this runs on a ``[batch, vocab]`` matrix every
    step: out-of-place masks cost five passes over it.

    :param log_probs: ``[batch, vocab]``, a fresh tensor of this step's (modified)
    :param force_eos: ``[batch]`` bool on the CPU, rows that have reached their maximum length
    :return: ``log_probs``, forbidden entries at -inf (not renormalised)
    """
    log_probs[:, model.pad_id] = float("-inf")
    log_probs[:, model.bos_id] = float("-inf")
    if force_eos.any():
        rows = force_eos.nonzero().squeeze(1).to(log_probs.device)
        eos = log_probs[rows, model.eos_id]
        log_probs[rows] = float("-inf")
        log_probs[rows, model.eos_id] = eos
    return log_probs


def _length_normaliser(length: int, length_norm: str, alpha: float) -> float:
    """What a hypothesis's log-probability is divided by; ``length`` includes eos."""
    if length_norm == "gnmt":  # Wu et al. (2016), section 7
        return ((5 + length) / 6) ** alpha
    if length_norm == "average":
        return float(length)
    return 1.0
