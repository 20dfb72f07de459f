"""Micro-batching for ``/detect``: requests that arrive together share one ONNX Runtime call.

One :class:`MicroBatcher` per loaded model. The first request of a batch waits at most ``max_wait_s``
for company (or until ``max_batch`` requests are waiting), then the batch runs in a worker thread while
the event loop goes on collecting the next one. Under load a batch forms while the previous one runs,
so waiting adds nothing; alone, a request waits ``max_wait_s`` at most.

:class:`PredictorCache` keeps the most recently used models' predictors (LRU) so a model's session is
opened once, not per request.

Backpressure: a batcher holds at most ``max_queue`` requests (waiting or running); one more raises
:class:`Overloaded` at once, with a Retry-After estimated from how long batches take, instead of joining a queue
that only grows. A request may carry a deadline (the event loop's clock); one still waiting when its deadline
passes is dropped before it reaches a batch (:class:`DeadlineExceeded`), so no core is spent on an answer nobody
waits for.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PredictFn = Callable[[list[Any]], list[list[dict[str, Any]]]]


class Overloaded(Exception):
    """The model's queue is full; ``retry_after`` (whole seconds) is when it is likely to have room."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the detect queue of this model is full ({depth} requests waiting or running)")
        self.depth, self.retry_after = depth, retry_after


class DeadlineExceeded(Exception):
    """The request's deadline passed before it could be run."""


@dataclass
class _Pending:
    image: Any
    future: asyncio.Future
    deadline: float | None = None  # the event loop's clock


class MicroBatcher:
    """Collects single-image requests into batches for ``predict_fn(images) -> per-image results``."""

    def __init__(
        self,
        predict_fn: PredictFn,
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.004,
        on_batch: Callable[[int], None] | None = None,
        max_queue: int = 64,
    ):
        self.predict_fn, self.max_batch, self.max_wait_s, self.on_batch = predict_fn, max_batch, max_wait_s, on_batch
        self.max_queue = max_queue
        self.depth = 0  # requests submitted and not yet answered
        self._batch_seconds = 0.05  # a running mean of one batch's run time, for Retry-After
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        # One batch at a time per model: the session already uses every core for one call.
        self._run_lock = asyncio.Lock()

    async def submit(self, image: Any, deadline: float | None = None) -> list[dict[str, Any]]:
        """Detections for one image, decoded by the caller (``deploy.runtime.load_image``) so that a bad
        image never reaches a batch; raises what ``predict_fn`` raised for it, :class:`Overloaded` when
        ``max_queue`` requests are in already, :class:`DeadlineExceeded` when ``deadline`` (the event loop's
        clock) passes before its batch runs."""
        self.check_room()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._collect())
        fut = asyncio.get_running_loop().create_future()
        self.depth += 1
        try:
            self._queue.put_nowait(_Pending(image, fut, deadline))
            return await fut
        finally:
            self.depth -= 1

    def check_room(self) -> None:
        """Raise :class:`Overloaded` when ``max_queue`` requests are in: a caller can refuse before it spends
        anything on the request (decoding its image)."""
        if self.depth >= self.max_queue:
            batches_ahead = math.ceil(self.depth / self.max_batch)
            raise Overloaded(self.depth, max(1, math.ceil(batches_ahead * self._batch_seconds)))

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
            now = asyncio.get_running_loop().time()
            for p in batch:
                if p.deadline is not None and now >= p.deadline:
                    _set(p.future, exc=DeadlineExceeded("its deadline passed while it waited for a batch"))
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            if self.on_batch:
                self.on_batch(len(live))
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.predict_fn, [p.image for p in live])
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - started)
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
        max_queue: int = 64,
    ):
        self.loader, self.capacity = loader, capacity
        self.max_batch, self.max_wait_s, self.on_batch, self.max_queue = max_batch, max_wait_s, on_batch, max_queue
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
                                         on_batch=self.on_batch, max_queue=self.max_queue))  # fmt: skip
        self._entries[key] = entry
        # The least recently used idle models go; one with requests in it stays until they are answered (after a
        # deployment's switch its in-flight requests finish on the old model), even beyond ``capacity``.
        for old_key in [k for k, (_, b) in self._entries.items() if k != key and b.depth == 0]:
            if len(self._entries) <= self.capacity:
                break
            await self._entries.pop(old_key)[1].close()
        fut.set_result(entry)
        return entry

    def loaded(self) -> list[str]:
        return list(self._entries)

    def depth(self, key: str) -> int:
        """Requests waiting or running on ``key``'s model (0 when it is not loaded)."""
        entry = self._entries.get(key)
        return entry[1].depth if entry else 0

    async def close(self) -> None:
        for _, b in self._entries.values():
            await b.close()
        self._entries.clear()
