"""Fair scheduling of audio pieces over the engine's connections.

Each request's pieces wait in their own queue; ``workers`` (one per engine connection) take the
next piece round-robin across requests, so a short request is not queued behind every piece of a
long one, and the pieces of one long request still run in parallel when nothing else waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from bridge.ports import EngineResult, ModelEngine


@dataclass
class _Job:
    engine: ModelEngine
    samples: np.ndarray
    future: asyncio.Future[EngineResult]


class FairScheduler:
    def __init__(self, workers: int) -> None:
        self._queues: OrderedDict[int, deque[_Job]] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._workers = [asyncio.create_task(self._work(), name=f"piece-worker-{i}") for i in range(workers)]
        self._keys = itertools.count()
        self.busy = 0

    def new_request(self) -> int:
        return next(self._keys)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def submit(self, key: int, engine: ModelEngine, samples: np.ndarray) -> asyncio.Future[EngineResult]:
        future: asyncio.Future[EngineResult] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(_Job(engine, samples, future))
        self._wakeup.set()
        return future

    def cancel(self, key: int) -> None:
        for job in self._queues.pop(key, ()):
            job.future.cancel()

    def _next(self) -> _Job | None:
        while self._queues:
            key, queue = self._queues.popitem(last=False)
            job = queue.popleft()
            if queue:
                self._queues[key] = queue  # back of the line: round-robin
            if not job.future.done():
                return job
        return None

    async def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self.busy += 1
            run = asyncio.ensure_future(job.engine.transcribe(job.samples))
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

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for key in list(self._queues):
            self.cancel(key)
