"""Token batches: every sentence once per epoch, within budget, reproducible, shardable."""

import numpy as np
import pytest
import torch

from nmt.data.batching import BOS_ID, EOS_ID, PAD_ID, batch_cost, collate, pad, token_batches
from nmt.data.corpus import EncodedCorpus


@pytest.fixture
def lengths():
    rng = np.random.default_rng(0)
    return rng.integers(1, 40, 500), rng.integers(1, 40, 500)


def test_every_sentence_once_and_within_budget(lengths):
    src, trg = lengths
    batches = token_batches(src, trg, batch_tokens=300, seed=1, epoch=0)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for b in batches:
        assert len(b) == 1 or batch_cost(len(b), src[b].max(), trg[b].max()) <= 300


def test_bucketing_keeps_padding_small(lengths):
    src, trg = lengths
    batches = token_batches(src, trg, batch_tokens=600, seed=1, epoch=0)
    real = sum(int(trg[b].sum()) for b in batches)
    padded = sum(len(b) * int(trg[b].max()) for b in batches)
    assert real / padded > 0.9


def test_order_is_a_function_of_seed_and_epoch(lengths):
    src, trg = lengths
    a = token_batches(src, trg, batch_tokens=300, seed=1, epoch=3)
    b = token_batches(src, trg, batch_tokens=300, seed=1, epoch=3)
    c = token_batches(src, trg, batch_tokens=300, seed=1, epoch=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_ranks_take_disjoint_shards(lengths):
    src, trg = lengths
    full = token_batches(src, trg, batch_tokens=300, seed=1, epoch=0)
    r0 = token_batches(src, trg, batch_tokens=300, seed=1, epoch=0, rank=0, world_size=2)
    r1 = token_batches(src, trg, batch_tokens=300, seed=1, epoch=0, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(full) // 2
    assert not set(np.concatenate(r0).tolist()) & set(np.concatenate(r1).tolist())


def test_pad_and_collate():
    ids, lengths = pad([np.array([5, 6]), np.array([7])], prefix=BOS_ID, suffix=EOS_ID)
    assert ids.tolist() == [[BOS_ID, 5, 6, EOS_ID], [BOS_ID, 7, EOS_ID, PAD_ID]]
    assert lengths.tolist() == [4, 3]

    src = [np.array([4]), np.array([4, 4])]
    trg = [np.array([9, 9]), np.array([9])]
    corpus = _corpus(src, trg)
    b = collate(corpus, np.array([0, 1]))
    assert b["src"].tolist() == [[4, EOS_ID, PAD_ID], [4, 4, EOS_ID]]
    assert b["src_lengths"].tolist() == [2, 3]
    assert b["trg_in"].tolist() == [[BOS_ID, 9, 9], [BOS_ID, 9, PAD_ID]]
    assert b["trg_out"].tolist() == [[9, 9, EOS_ID], [9, EOS_ID, PAD_ID]]
    assert b["src"].dtype == torch.long


def _corpus(src: list[np.ndarray], trg: list[np.ndarray]) -> EncodedCorpus:
    def side(seqs):
        offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
        return np.concatenate(seqs + [np.zeros(0)]).astype(np.uint16), offsets
    (src_ids, src_off), (trg_ids, trg_off) = side(src), side(trg)
    return EncodedCorpus("train", {"src": src_ids, "trg": trg_ids}, {"src": src_off, "trg": trg_off})


def test_collate_equals_padding_each_sentence():
    """The vectorised collate gives what padding sentence by sentence gives, for any
    mix of lengths (empty sentences too) and any order of indices, repeats included."""
    rng = np.random.default_rng(0)
    src = [rng.integers(4, 500, size=rng.integers(0, 30)) for _ in range(200)]
    trg = [rng.integers(4, 500, size=rng.integers(0, 30)) for _ in range(200)]
    corpus = _corpus(src, trg)
    for _ in range(20):
        indices = rng.integers(-200, 200, size=rng.integers(1, 50))
        b = collate(corpus, indices)
        chosen = [int(i) % 200 for i in indices]
        expect_src, expect_len = pad([src[i] for i in chosen], suffix=EOS_ID)
        assert torch.equal(b["src"], expect_src) and torch.equal(b["src_lengths"], expect_len)
        assert torch.equal(b["trg_in"], pad([trg[i] for i in chosen], prefix=BOS_ID)[0])
        assert torch.equal(b["trg_out"], pad([trg[i] for i in chosen], suffix=EOS_ID)[0])
    with pytest.raises(IndexError, match="sentence 200 out of range"):
        collate(corpus, np.array([3, 200]))


@pytest.mark.parametrize("world_size,accum", [(1, 1), (2, 2), (3, 1)])
def test_an_update_takes_the_next_world_x_accum_batches(lengths, world_size, accum):
    """Whatever the world size and accumulation, update u trains on batches
    skip + u*W*A ... of the epoch's single order: a run resumed on another number of
    processes goes on where the last one stopped, nothing repeated or skipped."""
    src, trg = lengths
    full = token_batches(src, trg, batch_tokens=300, seed=1, epoch=2)
    skip = 5  # e.g. 5 updates done on 1 process before the resume
    shards = [token_batches(src, trg, batch_tokens=300, seed=1, epoch=2, rank=r, world_size=world_size, skip=skip)
              for r in range(world_size)]
    updates = len(shards[0]) // accum
    assert updates > 3 and all(len(s) == len(shards[0]) for s in shards)
    for u in range(updates):
        taken = sorted(np.concatenate([s[i] for s in shards for i in range(u * accum, (u + 1) * accum)]).tolist())
        start = skip + u * world_size * accum
        expected = sorted(np.concatenate(full[start : start + world_size * accum]).tolist())
        assert taken == expected
