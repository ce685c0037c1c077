"""The dynamic batcher: shared batches, size and wait limits, grouping by key, failure isolation."""

import threading
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from nmt.batcher import DynamicBatcher


class Recorder:
    """A decode function that records its calls and can hold the worker on its first call."""

    def __init__(self, hold_first: bool = False, fail_line=None):
        self.calls: list[tuple[object, list[str]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_line = fail_line

    def __call__(self, lines, key):
        self.entered.set()
        self.release.wait(30)
        self.calls.append((key, list(lines)))
        if self.fail_line in lines:
            raise ValueError("poisoned")
        return [f"{key}:{line}" for line in lines]


def held_batcher(recorder, **limits) -> DynamicBatcher:
    """A batcher whose worker is busy with a first request until recorder.release is set."""
    batcher = DynamicBatcher(recorder, **limits)
    batcher.submit(["first"], "k")
    assert recorder.entered.wait(30)
    return batcher


def test_queued_requests_share_batches_up_to_max_batch_in_order():
    recorder = Recorder(hold_first=True)
    batcher = held_batcher(recorder, max_batch=8, max_wait_ms=0)
    sizes = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
    requests = [[f"r{i}s{j}" for j in range(n)] for i, n in enumerate(sizes)]
    futures = [batcher.submit(lines, "k") for lines in requests]
    recorder.release.set()
    for lines, future in zip(requests, futures):
        assert future.result(30) == [f"k:{line}" for line in lines]
    batcher.close()
    # 19 sentences from 10 requests in 3 decode calls, none over 8, requests never split
    assert [len(lines) for _, lines in recorder.calls[1:]] == [7, 8, 4]
    assert [line for _, lines in recorder.calls[1:] for line in lines] == [line for r in requests for line in r]
    assert batcher.stats.batches == 4 and batcher.stats.requests == 11 and batcher.stats.largest_batch == 8


def test_requests_are_grouped_by_key_oldest_first():
    recorder = Recorder(hold_first=True)
    batcher = held_batcher(recorder, max_batch=10, max_wait_ms=0)
    keys = ["a", "b", "a", "b", "a"]
    futures = [batcher.submit([f"s{i}"], key) for i, key in enumerate(keys)]
    recorder.release.set()
    assert [f.result(30) for f in futures] == [[f"{key}:s{i}"] for i, key in enumerate(keys)]
    batcher.close()
    assert recorder.calls[1:] == [("a", ["s0", "s2", "s4"]), ("b", ["s1", "s3"])]


def test_a_full_batch_goes_at_once_and_a_partial_one_after_max_wait():
    recorder = Recorder()
    patient = DynamicBatcher(recorder, max_batch=2, max_wait_ms=60_000)
    first = patient.submit(["x"], "k")
    with pytest.raises(FutureTimeout):
        first.result(0.3)  # alone, it waits for a second sentence (or a minute)
    second = patient.submit(["y"], "k")
    assert first.result(30) == ["k:x"] and second.result(30) == ["k:y"]
    assert recorder.calls == [("k", ["x", "y"])]
    lonely = patient.submit(["z"], "k")
    patient.close()  # closing decodes what is queued without waiting
    assert lonely.result(0) == ["k:z"]

    quick = DynamicBatcher(Recorder(), max_batch=100, max_wait_ms=20)
    assert quick.submit(["w"], "k").result(30) == ["k:w"]  # not full: released by the wait limit
    quick.close()


def test_a_request_larger_than_max_batch_is_decoded_alone():
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch=2, max_wait_ms=0)
    lines = [f"s{i}" for i in range(5)]
    assert batcher.submit(lines, "k").result(30) == [f"k:{s}" for s in lines]
    batcher.close()
    assert recorder.calls == [("k", lines)]


def test_a_failing_request_fails_alone_and_the_worker_goes_on():
    recorder = Recorder(hold_first=True, fail_line="poison")
    batcher = held_batcher(recorder, max_batch=10, max_wait_ms=0)
    before = batcher.submit(["x"], "k")
    bad = batcher.submit(["y", "poison"], "k")
    after = batcher.submit(["z"], "k")
    recorder.release.set()
    with pytest.raises(ValueError, match="poisoned"):
        bad.result(30)
    assert before.result(30) == ["k:x"] and after.result(30) == ["k:z"]
    # the shared batch failed, then each request was decoded on its own
    assert recorder.calls[1:] == [("k", ["x", "y", "poison", "z"]), ("k", ["x"]), ("k", ["y", "poison"]), ("k", ["z"])]
    assert batcher.alive
    assert batcher.submit(["w"], "k").result(30) == ["k:w"]
    batcher.close()


def test_cancelled_requests_are_not_decoded_and_closed_batcher_refuses():
    recorder = Recorder(hold_first=True)
    batcher = held_batcher(recorder, max_batch=10, max_wait_ms=0)
    gone = batcher.submit(["gone"], "k")
    kept = batcher.submit(["kept"], "k")
    assert gone.cancel()
    recorder.release.set()
    assert kept.result(30) == ["k:kept"]
    batcher.close()
    assert recorder.calls[1:] == [("k", ["kept"])]
    assert not batcher.alive
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(["late"], "k")


@pytest.mark.parametrize("limits", [{"max_batch": 0, "max_wait_ms": 1}, {"max_batch": 1, "max_wait_ms": -1}])
def test_bad_limits_are_refused(limits):
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), **limits)
