"""Fair scheduling of audio pieces over the engine's connections.

Each request's pieces wait in their own queue; ``workers`` (one per engine connection) take the
next piece round-robin across requests, so a short request is not queued behind every piece of a
long one, and the pieces of one long request still run in parallel when nothing else waits.
One request never holds every connection: with more than one worker, one is always left for
whoever comes next, so a short request starts at once instead of waiting for a long piece to end.
Other long work of a request (a meeting's speaker diarization) is queued the same way with
``submit_call``: it takes one worker's turn like a piece, so it cannot starve short requests either.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from bridge.ports import EngineResult, ModelEngine

T = TypeVar("T")


@dataclass
class _Job:
    run: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]


class FairScheduler:
    def __init__(self, workers: int) -> None:
        self._queues: OrderedDict[int, deque[_Job]] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._workers = [asyncio.create_task(self._work(), name=f"piece-worker-{i}") for i in range(workers)]
        self._keys = itertools.count()
        self._running: dict[int, int] = {}
        self._per_request = max(1, workers - 1)
        self.busy = 0

    def new_request(self) -> int:
        return next(self._keys)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def connections(self) -> int:
        return len(self._workers)

    def submit(self, key: int, engine: ModelEngine, samples: np.ndarray,
               keywords: tuple[str, ...] = ()) -> asyncio.Future[EngineResult]:
        return self.submit_call(key, lambda: engine.transcribe(samples, keywords))

    def submit_call(self, key: int, run: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Queue ``run()`` (awaited by a worker when it is this request's turn)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(_Job(run, future))
        self._wakeup.set()
        return future

    def cancel(self, key: int) -> None:
        for job in self._queues.pop(key, ()):
            job.future.cancel()

    def _next(self) -> tuple[int, _Job] | None:
        for key in list(self._queues):
            if self._running.get(key, 0) >= self._per_request:
                continue
            queue = self._queues.pop(key)
            job = None
            while queue and job is None:
                candidate = queue.popleft()
                if not candidate.future.done():
                    job = candidate
            if queue:
                self._queues[key] = queue  # back of the line: round-robin
            if job is not None:
                return key, job
        return None

    async def _work(self) -> None:
        while True:
            picked = self._next()
            if picked is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key, job = picked
            self._running[key] = self._running.get(key, 0) + 1
            self.busy += 1
            run = asyncio.ensure_future(job.run())
            try:
                await asyncio.wait({run, job.future}, return_when=asyncio.FIRST_COMPLETED)
                if job.future.done():  # the request went away: stop the engine work too
                    run.cancel()
                    with contextlib.suppress(BaseException):
                        await run
                    continue
                try:
                    job.future.set_result(run.result())
                except Exception as exc:  # noqa: BLE001 - handed to the request that owns it
                    job.future.set_exception(exc)
            finally:
                self.busy -= 1
                self._running[key] -= 1
                if not self._running[key]:
                    del self._running[key]
                self._wakeup.set()  # a capped request may take this connection now

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for key in list(self._queues):
            self.cancel(key)
