"""The predict path's dynamic batcher and model cache, with real threads (no server needed)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.api.batcher import Batcher, BatcherClosed
from app.api.inference import LRUCache


class RecordingForward:
    """rows -> 10 x rows, remembering each batch size; `gate` holds the first batch until set."""

    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None):
        self.sizes: list[int] = []
        self.gate, self.fail_on = gate, fail_on

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait(10)
        self.sizes.append(len(pixels))
        if self.fail_on is not None and len(self.sizes) == self.fail_on:
            raise RuntimeError("the model broke")
        return pixels * 10


def rows(first: int, count: int) -> torch.Tensor:
    return torch.arange(first, first + count, dtype=torch.float32).unsqueeze(1)


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows():
    gate = threading.Event()
    forward = RecordingForward(gate)
    batcher = Batcher(forward, max_batch=16, max_wait_ms=50)
    sizes = [1, 3, 2, 1, 4, 1, 2, 2, 1, 3] * 3
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    futures = [batcher.submit(rows(start, size)) for start, size in zip(starts, sizes)]
    gate.set()  # everything is queued behind the first batch: later batches fill up
    for future, start, size in zip(futures, starts, sizes):
        assert torch.equal(future.result(timeout=10), rows(start, size) * 10)
    assert sum(forward.sizes) == sum(sizes)
    assert len(forward.sizes) < len(sizes) / 2
    assert max(forward.sizes) <= 16
    batcher.close()


def test_submits_from_many_threads():
    forward = RecordingForward()
    batcher = Batcher(forward, max_batch=8, max_wait_ms=20)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: batcher.submit(rows(i * 2, 2)).result(timeout=10), range(64)))
    for i, result in enumerate(results):
        assert torch.equal(result, rows(i * 2, 2) * 10)
    assert sum(forward.sizes) == 128 and max(forward.sizes) <= 8
    batcher.close()


def test_a_request_larger_than_the_batch_runs_alone_and_the_one_that_did_not_fit_goes_next():
    gate = threading.Event()
    forward = RecordingForward(gate)
    batcher = Batcher(forward, max_batch=4, max_wait_ms=50)
    first = batcher.submit(rows(0, 1))
    big = batcher.submit(rows(1, 10))
    small = batcher.submit(rows(11, 2))
    gate.set()
    assert torch.equal(big.result(timeout=10), rows(1, 10) * 10)
    assert torch.equal(small.result(timeout=10), rows(11, 2) * 10)
    assert first.result(timeout=10).shape == (1, 1)
    assert forward.sizes == [1, 10, 2]
    batcher.close()


def test_a_failed_batch_fails_its_requests_and_the_batcher_goes_on():
    gate = threading.Event()
    forward = RecordingForward(gate, fail_on=1)
    batcher = Batcher(forward, max_batch=4, max_wait_ms=50)
    doomed = [batcher.submit(rows(i, 1)) for i in range(2)]
    gate.set()
    for future in doomed:
        with pytest.raises(RuntimeError, match="the model broke"):
            future.result(timeout=10)
    assert torch.equal(batcher.submit(rows(7, 1)).result(timeout=10), rows(7, 1) * 10)
    batcher.close()


def test_a_closed_batcher_finishes_what_is_queued_then_refuses():
    gate = threading.Event()
    batcher = Batcher(RecordingForward(gate), max_batch=2, max_wait_ms=0)
    queued = [batcher.submit(rows(i, 1)) for i in range(3)]
    batcher.close()
    gate.set()
    assert [f.result(timeout=10).item() for f in queued] == [0.0, 10.0, 20.0]
    with pytest.raises(BatcherClosed):
        batcher.submit(rows(0, 1)).result(timeout=1)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Batcher(RecordingForward(), max_batch=0, max_wait_ms=5)


def test_loading_one_model_does_not_stall_another_and_racing_loads_load_once():
    evicted: list[str] = []
    cache: LRUCache[str] = LRUCache(2, on_evict=evicted.append)
    slow_started, release = threading.Event(), threading.Event()
    loads: list[str] = []

    def slow_load() -> str:
        loads.append("slow")
        slow_started.set()
        release.wait(10)
        return "slow model"

    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(cache.get, "slow", slow_load) for _ in range(3)]
        assert slow_started.wait(10)
        # While "slow" is loading, another key loads and is served at once.
        assert cache.get("fast", lambda: "fast model") == "fast model"
        assert not any(f.done() for f in slow)
        release.set()
        assert [f.result(timeout=10) for f in slow] == ["slow model"] * 3
    assert loads == ["slow"]
    cache.get("third", lambda: "third model")  # over the size: the least recently used goes
    assert evicted == ["fast model"]
    cache.discard("slow")
    assert evicted == ["fast model", "slow model"]
