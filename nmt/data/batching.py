"""Token-based batches with length bucketing, and collation into padded tensors.

Every epoch's batch order is a pure function of (seed, epoch), so a resumed or
distributed run recomputes exactly the batches it would have seen; nothing about data
order needs to be stored beyond the epoch and the position inside it.
"""

from __future__ import annotations

import numpy as np
import torch

from nmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def batch_cost(n_sentences: int, longest_src: int, longest_trg: int) -> int:
    """Padded tokens of a batch: sentences x the longer side (+1 for eos / bos)."""
    return n_sentences * (max(longest_src, longest_trg) + 1)


def token_batches(
    src_lengths: np.ndarray,
    trg_lengths: np.ndarray,
    *,
    batch_tokens: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    skip: int = 0,
) -> list[np.ndarray]:
    """Split a corpus into batches of at most `batch_tokens` padded tokens.

    Sentences are sorted by (target length, source length) with random tie-breaking, so
    neighbours have nearly equal lengths and padding is small; batches are cut greedily
    and then shuffled. `skip` drops the first batches of that order (those a resumed run
    has trained on). With `world_size` > 1, rank r then takes batches r, r + world_size,
    ... of what is left (the tail that does not divide evenly is dropped), so every rank
    gets the same number of batches and one update of W ranks with accumulation A
    consumes the next W x A batches of the order, whatever W and A are.

    Args:
        src_lengths: [N] source lengths in pieces (without eos)
        trg_lengths: [N] target lengths in pieces (without bos/eos)
    Returns:
        a list of index arrays into the corpus
    """
    src_lengths = np.asarray(src_lengths, dtype=np.int64)
    trg_lengths = np.asarray(trg_lengths, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    tiebreak = rng.permutation(len(src_lengths)) if shuffle else np.arange(len(src_lengths))
    order = np.lexsort((tiebreak, src_lengths, trg_lengths))

    batches: list[np.ndarray] = []
    start, longest = 0, 0
    for i, idx in enumerate(order):
        longest_now = max(longest, int(src_lengths[idx]), int(trg_lengths[idx]))
        if i > start and batch_cost(i - start + 1, longest_now, 0) > batch_tokens:
            batches.append(order[start:i])
            start, longest_now = i, max(int(src_lengths[idx]), int(trg_lengths[idx]))
        longest = longest_now
    if start < len(order):
        batches.append(order[start:])

    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    batches = batches[skip:]
    if world_size > 1:
        usable = len(batches) - len(batches) % world_size
        batches = batches[rank:usable:world_size]
    return batches


def pad(seqs: list[np.ndarray], *, prefix: int | None = None, suffix: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id sequences into a [batch x max_len] LongTensor, with optional bos/eos.

    Returns:
        ids: [B, T] padded with PAD_ID
        lengths: [B] lengths including the added prefix/suffix
    """
    extra = (prefix is not None) + (suffix is not None)
    lengths = torch.tensor([len(s) + extra for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(seqs):
        col = 0
        if prefix is not None:
            ids[row, 0] = prefix
            col = 1
        if len(seq):
            ids[row, col : col + len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        if suffix is not None:
            ids[row, col + len(seq)] = suffix
    return ids, lengths


def collate(corpus, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """Tensors for one training batch, built with whole-batch numpy operations (a loop over
    sentences cost 12 ms a batch, a third of a GPU update).

    Returns:
        src: [B, S] source ids + eos, padded; src_lengths: [B]
        trg_in: [B, T] bos + target ids (decoder inputs)
        trg_out: [B, T] target ids + eos (what the decoder must predict)
    """
    src_ids, src_len = corpus.padded("src", indices, PAD_ID)
    trg_ids, trg_len = corpus.padded("trg", indices, PAD_ID)
    rows = np.arange(len(src_len))
    src = np.pad(src_ids, ((0, 0), (0, 1)), constant_values=PAD_ID)
    src[rows, src_len] = EOS_ID
    trg_in = np.pad(trg_ids, ((0, 0), (1, 0)), constant_values=BOS_ID)
    trg_out = np.pad(trg_ids, ((0, 0), (0, 1)), constant_values=PAD_ID)
    trg_out[rows, trg_len] = EOS_ID
    src, trg_in, trg_out = (torch.from_numpy(a) for a in (src, trg_in, trg_out))
    src_lengths = torch.from_numpy(src_len + 1)
    return {"src": src, "src_lengths": src_lengths, "trg_in": trg_in, "trg_out": trg_out}
