"""The detect micro-batcher and predictor cache (asyncio, no server: deterministic and fast)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from api.batcher import MicroBatcher, PredictorCache


class FakeModel:
    """Records its batches; ``predict_loaded`` takes a little time like a real session call."""

    def __init__(self, delay: float = 0.02):
        self.batches: list[list[Any]] = []
        self.delay = delay
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()

    def predict_loaded(self, images: list[Any]) -> list[list[dict[str, Any]]]:
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            self.batches.append(list(images))
            time.sleep(self.delay)
            if any(x == "bad" for x in images):
                raise ValueError("bad image")
            return [[{"echo": x}] for x in images]
        finally:
            with self._lock:
                self.concurrent -= 1


def test_concurrent_requests_share_calls_and_get_their_own_answers() -> None:
    model = FakeModel()
    sizes: list[int] = []

    async def main() -> list[Any]:
        b = MicroBatcher(model.predict_loaded, max_batch=8, max_wait_s=0.01, on_batch=sizes.append)
        out = await asyncio.gather(*(b.submit(i) for i in range(20)))
        await b.close()
        return out

    out = asyncio.run(main())
    assert out == [[{"echo": i}] for i in range(20)]
    assert sum(len(x) for x in model.batches) == 20 and sizes == [len(x) for x in model.batches]
    assert max(sizes) <= 8 and len(model.batches) <= 4  # 20 requests in at most 4 calls, not 20
    assert model.max_concurrent == 1  # one session call at a time per model


def test_lone_request_waits_at_most_max_wait() -> None:
    model = FakeModel(delay=0.0)

    async def main() -> float:
        b = MicroBatcher(model.predict_loaded, max_batch=8, max_wait_s=0.05)
        t = time.perf_counter()
        await b.submit("x")
        dt = time.perf_counter() - t
        await b.close()
        return dt

    assert asyncio.run(main()) < 0.5
    assert model.batches == [["x"]]


def test_bad_image_fails_only_its_own_request() -> None:
    model = FakeModel()

    async def main() -> list[Any]:
        b = MicroBatcher(model.predict_loaded, max_batch=8, max_wait_s=0.01)
        out = await asyncio.gather(*(b.submit(x) for x in ["a", "bad", "c"]), return_exceptions=True)
        await b.close()
        return out

    a, bad, c = asyncio.run(main())
    assert a == [{"echo": "a"}] and c == [{"echo": "c"}]
    assert isinstance(bad, ValueError)


def test_predictor_cache_is_lru_and_loads_once() -> None:
    loads: list[str] = []

    def loader(key: str) -> FakeModel:
        loads.append(key)
        time.sleep(0.01)
        return FakeModel(delay=0.0)

    async def main() -> None:
        cache = PredictorCache(loader, capacity=2)
        first = await asyncio.gather(*(cache.get("m1") for _ in range(5)))  # opened once, shared
        assert all(f is first[0] for f in first)
        await cache.get("m2")
        await cache.get("m1")  # m1 is now the most recent
        await cache.get("m3")  # evicts m2
        assert cache.loaded() == ["m1", "m3"]
        await cache.get("m2")
        await cache.close()

    asyncio.run(main())
    assert loads == ["m1", "m2", "m3", "m2"]


def test_predictor_cache_load_error_propagates_and_is_not_cached() -> None:
    calls = 0

    def loader(key: str) -> FakeModel:
        nonlocal calls
        calls += 1
        raise FileNotFoundError(key)

    async def main() -> None:
        cache = PredictorCache(loader)
        for _ in range(2):
            with pytest.raises(FileNotFoundError):
                await cache.get("gone")

    asyncio.run(main())
    assert calls == 2
