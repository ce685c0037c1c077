"""Token batches: every sentence once per epoch, within budget, reproducible, shardable."""

import numpy as np
import pytest
import torch

from nmt.data.batching import BOS_ID, EOS_ID, PAD_ID, batch_cost, collate, pad, token_batches


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

    class Corpus:
        def src(self, i):
            return np.array([4] * (i + 1))

        def trg(self, i):
            return np.array([9] * (2 - i))

    b = collate(Corpus(), np.array([0, 1]))
    assert b["src"].tolist() == [[4, EOS_ID, PAD_ID], [4, 4, EOS_ID]]
    assert b["src_lengths"].tolist() == [2, 3]
    assert b["trg_in"].tolist() == [[BOS_ID, 9, 9], [BOS_ID, 9, PAD_ID]]
    assert b["trg_out"].tolist() == [[9, 9, EOS_ID], [9, EOS_ID, PAD_ID]]
    assert b["src"].dtype == torch.long


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
