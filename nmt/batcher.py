"""Dynamic batching: concurrent requests decoded together by one worker thread.

Callers `submit(lines, key)` from any thread and get a `concurrent.futures.Future` of
one result per line, in their order. A single worker thread takes the oldest waiting
request, then gathers more requests with the same key (the same search options) until
the batch holds `max_batch` lines or the oldest request has waited `max_wait_ms`, and
makes one `decode(lines, key)` call for all of them. Requests with another key wait for
a later batch, oldest first, so none is starved. Under load the queue fills while a
batch decodes, and the next batch is gathered from it without waiting.

A request with more than `max_batch` lines is decoded alone, as one call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

log = logging.getLogger("nmt.serve")

_STOP = object()


@dataclass
class _Request:
    lines: Sequence[str]
    key: Hashable
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatcherStats:
    requests: int = 0  # requests decoded (cancelled ones are not)
    sentences: int = 0
    batches: int = 0  # decode calls
    largest_batch: int = 0  # sentences in the largest decode call


class DynamicBatcher:
    """One worker thread that decodes queued requests in shared batches.

    decode(lines, key) must return one result per line, in order. When it raises, the
    batch's requests are decoded again one by one, so that only a request that fails on
    its own gets the exception (through its future); the worker goes on either way.
    """

    def __init__(self, decode: Callable[[list[str], Hashable], list], *, max_batch: int, max_wait_ms: float):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.decode = decode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatcherStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._held: deque[_Request] = deque()  # taken from the queue, waiting for their key's turn
        self._closed = False
        self._lock = threading.Lock()  # orders submit() against close()
        self._thread = threading.Thread(target=self._run, name="nmt-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def submit(self, lines: Sequence[str], key: Hashable) -> Future:
        """Queue `lines` for decoding with options `key`; the future resolves to their results."""
        request = _Request(list(lines), key)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put(request)
        return request.future

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, decode those already queued, and stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        stopping = False
        while True:
            if not self._held:
                if stopping:
                    return
                item = self._queue.get()
                if item is _STOP:
                    return
                self._held.append(item)
            batch, stopping = self._gather(stopping)
            self._decode(batch)

    def _gather(self, stopping: bool) -> tuple[list[_Request], bool]:
        """The oldest held request, the held requests with its key that fit, and then
        requests from the queue until the batch is full or the oldest one's wait is over."""
        first = self._held[0]
        batch: list[_Request] = []
        size = 0
        rest: deque[_Request] = deque()
        for request in self._held:
            if request.key == first.key and (not batch or size + len(request.lines) <= self.max_batch):
                batch.append(request)
                size += len(request.lines)
            else:
                rest.append(request)
        self._held = rest
        deadline = first.arrived + self.max_wait
        while size < self.max_batch and not stopping:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stopping = True
            elif item.key == first.key and size + len(item.lines) <= self.max_batch:
                batch.append(item)
                size += len(item.lines)
            else:
                self._held.append(item)
                if item.key == first.key:
                    break  # the batch is as full as this request allows
        return batch, stopping

    def _decode(self, batch: list[_Request]) -> None:
        # A request whose caller went away (cancelled future) is dropped here, undecoded.
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if batch:
            self._resolve(batch)

    def _resolve(self, batch: list[_Request]) -> None:
        """Decode `batch` (running futures) and resolve each with its own results."""
        try:
            results = self._call(batch)
        except Exception as e:  # noqa: BLE001 - the worker must outlive any one batch
            if len(batch) == 1:
                log.exception("decoding a request of %d sentences failed", len(batch[0].lines))
                batch[0].future.set_exception(e)
                return
            # One bad request must not fail the others: decode each alone.
            log.warning("decoding a batch of %d requests failed (%s); decoding them one by one", len(batch), e)
            for r in batch:
                self._resolve([r])
            return
        start = 0
        for r in batch:
            r.future.set_result(results[start : start + len(r.lines)])
            start += len(r.lines)

    def _call(self, batch: list[_Request]) -> list:
        """One decode call for the lines of `batch`, in order; counted in the stats."""
        lines = [line for r in batch for line in r.lines]
        results = self.decode(lines, batch[0].key) if lines else []
        if len(results) != len(lines):
            raise RuntimeError(f"decode returned {len(results)} results for {len(lines)} lines")
        self.stats.requests += len(batch)
        self.stats.sentences += len(lines)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(lines))
        return results
