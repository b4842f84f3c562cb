"""Dynamic batching for predict: concurrent requests for one classifier share forward passes.

As in Triton's dynamic batcher: each request's images (already decoded and transformed, in the
request's own thread) join the queue of their model; one thread per model takes what is queued,
waits at most `max_wait_ms` for more while the batch holds fewer than `max_batch` images, runs one
forward pass and hands every request its own rows. A request larger than `max_batch` is one batch
of its own. A lone request waits at most `max_wait_ms`; under load, batches fill and the wait ends
early, so the model runs on full batches instead of one image at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger("app.batcher")


class BatcherClosed(RuntimeError):
    pass


@dataclass
class _Request:
    pixels: torch.Tensor
    result: Future = field(default_factory=Future)


class Batcher:
    """One model's queue and the thread that runs its batches. `submit` is thread-safe."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_ms: float,
                 name: str = "model", on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.forward, self.max_batch, self.max_wait_s = forward, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._held: _Request | None = None  # taken from the queue but not in the last batch: first in the next
        self._closing, self._closed = threading.Lock(), False  # nothing is queued behind the stop marker
        self._thread = threading.Thread(target=self._serve, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, pixels: torch.Tensor) -> Future:
        """A future of the [n, C] outputs for these n inputs (BatcherClosed once `close` was called)."""
        request = _Request(pixels)
        with self._closing:
            if self._closed:
                request.result.set_exception(BatcherClosed("this model's batcher is closed"))
            else:
                self._queue.put(request)
        return request.result

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._closing:
            if not self._closed:
                self._closed = True
                self._queue.put(None)

    def _next_batch(self) -> list[_Request] | None:
        first = self._held if self._held is not None else self._queue.get()
        self._held = None
        if first is None:
            return None
        batch, count = [first], len(first.pixels)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            try:
                remaining = deadline - time.monotonic()
                request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if request is None:  # closed: this batch is the last
                self._queue.put(None)
                break
            if count + len(request.pixels) > self.max_batch:
                self._held = request  # too big to join: the next batch starts with it
                break
            batch.append(request)
            count += len(request.pixels)
        return batch

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                outputs = self.forward(torch.cat([request.pixels for request in batch]))
            except Exception as error:  # noqa: BLE001 - every waiting request learns why
                log.exception("batch of %d requests failed", len(batch))
                for request in batch:
                    request.result.set_exception(error)
                continue
            if self.on_batch is not None:
                self.on_batch(len(outputs))
            start = 0
            for request in batch:
                request.result.set_result(outputs[start:start + len(request.pixels)])
                start += len(request.pixels)
