"""Micro-batching for ``/detect``: requests that arrive together share one ONNX Runtime call.

One :class:`MicroBatcher` per loaded model. The first request of a batch waits at most ``max_wait_s``
for company (or until ``max_batch`` requests are waiting), then the batch runs in a worker thread while
the event loop goes on collecting the next one. Under load a batch forms while the previous one runs,
so waiting adds nothing; alone, a request waits ``max_wait_s`` at most.

:class:`PredictorCache` keeps the most recently used models' predictors (LRU) so a model's session is
opened once, not per request.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PredictFn = Callable[[list[Any]], list[list[dict[str, Any]]]]


@dataclass
class _Pending:
    image: Any
    future: asyncio.Future


class MicroBatcher:
    """Collects single-image requests into batches for ``predict_fn(images) -> per-image results``."""

    def __init__(
        self,
        predict_fn: PredictFn,
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.004,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.predict_fn, self.max_batch, self.max_wait_s, self.on_batch = predict_fn, max_batch, max_wait_s, on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        # One batch at a time per model: the session already uses every core for one call.
        self._run_lock = asyncio.Lock()

    async def submit(self, image: Any) -> list[dict[str, Any]]:
        """Detections for one image, decoded by the caller (``deploy.runtime.load_image``) so that a bad
        image never reaches a batch; raises what ``predict_fn`` raised for it."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._collect())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(image, fut))
        return await fut

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            deadline = loop.time() + self.max_wait_s
            # Wait for the previous batch to finish first: requests arriving meanwhile join this one.
            await self._run_lock.acquire()
            batch = [first]
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            asyncio.create_task(self._run(batch))

    async def _run(self, batch: Sequence[_Pending]) -> None:
        try:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            if self.on_batch:
                self.on_batch(len(live))
            try:
                results = await asyncio.to_thread(self.predict_fn, [p.image for p in live])
            except Exception:
                # One bad input must not fail its neighbours: retry one by one to find it.
                for p in live:
                    try:
                        (res,) = await asyncio.to_thread(self.predict_fn, [p.image])
                    except Exception as e:
                        _set(p.future, exc=e)
                    else:
                        _set(p.future, res)
                return
            for p, res in zip(live, results, strict=True):
                _set(p.future, res)
        finally:
            self._run_lock.release()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None


def _set(fut: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():  # the client went away
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class PredictorCache:
    """LRU of ``key -> (predictor, MicroBatcher)``; ``loader(key)`` opens a predictor (in a thread).

    A predictor is anything with ``predict_loaded(images) -> per-image detections`` on decoded images, as
    ``deploy.runtime.Predictor`` has; its batcher calls that.
    """

    def __init__(
        self,
        loader: Callable[[str], Any],
        *,
        capacity: int = 4,
        max_batch: int = 16,
        max_wait_s: float = 0.004,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.loader, self.capacity = loader, capacity
        self.max_batch, self.max_wait_s, self.on_batch = max_batch, max_wait_s, on_batch
        self._entries: OrderedDict[str, tuple[Any, MicroBatcher]] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}

    async def get(self, key: str) -> tuple[Any, MicroBatcher]:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        if key in self._loading:  # another request is opening it already
            return await asyncio.shield(self._loading[key])
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            predictor = await asyncio.to_thread(self.loader, key)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            self._loading.pop(key, None)
        entry = (predictor, MicroBatcher(predictor.predict_loaded, max_batch=self.max_batch, max_wait_s=self.max_wait_s,
                                         on_batch=self.on_batch))  # fmt: skip
        self._entries[key] = entry
        while len(self._entries) > self.capacity:
            _, (_, old) = self._entries.popitem(last=False)
            await old.close()
        fut.set_result(entry)
        return entry

    def loaded(self) -> list[str]:
        return list(self._entries)

    async def close(self) -> None:
        for _, b in self._entries.values():
            await b.close()
        self._entries.clear()
