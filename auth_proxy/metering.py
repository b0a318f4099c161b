"""Recording usage, off the event loop.

Every read and write of the usage store runs on one thread of its own (``UsageWriter``), in the
order asked: an fsync'd SQLite commit (about 0.7 ms here) no longer holds every other request up,
and a read asked after a write sees it. Each write is timed and counted. A write the store refuses
for something already served is kept in memory and written again, in order, once the store takes
writes (``retry_loop``); the JSON summary is rewritten in the background (``export_loop``).

A forwarded request is metered by ``Metered``: its pending record is written before anything is
forwarded, and put on disk while the bridge works; none of the answer goes out before it is, so a
request the store cannot record is refused, never served unmetered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from auth_proxy.metrics import ProxyMetrics
from auth_proxy.usage_store import UsageRecord, UsageStore
from common.errors import APIError

log = logging.getLogger("auth_proxy")
T = TypeVar("T")


def usage_unavailable() -> APIError:
    return APIError(503, "usage cannot be recorded right now, so nothing is served; retry shortly",
                    code="usage_unavailable", type="server_error", retry_after=5)


class UsageWriter:
    """The usage store's one thread; built in the proxy's lifespan, closed (and drained) at its end."""

    def __init__(self, store: UsageStore, metrics: ProxyMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self.unwritten: list[Callable[[], Any]] = []  # writes of things served that the store refused, in order
        self.dirty = asyncio.Event()  # something was written since the JSON summary was
        self._loop = asyncio.get_running_loop()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="usage")

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on the store's thread, after everything asked before it. Once the writer is
        closed (the proxy is stopping) it runs at once, here: a request cut off by the stop still
        gets its outcome written while the store is open."""
        try:
            return asyncio.wrap_future(self._thread.submit(fn, *args), loop=self._loop)
        except RuntimeError:  # cannot schedule new futures after shutdown
            done: asyncio.Future[T] = self._loop.create_future()
            try:
                done.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed to whoever awaits it
                done.set_exception(exc)
            return done

    def write(self, write: Callable[[], Any], what: object) -> bool:
        """On the store's thread: one write, timed and counted; False (logged) when refused."""
        started = time.monotonic()
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - the caller decides: refuse, or keep it for later
            self.metrics.usage_write_errors.inc()
            log.warning("usage store unavailable (%s: %s) for %s", exc.__class__.__name__, exc, what)
            return False
        self.metrics.usage_write_seconds.observe(time.monotonic() - started)
        self._loop.call_soon_threadsafe(self.dirty.set)
        return True

    def keep(self, write: Callable[[], Any], what: object) -> bool:
        """On the store's thread: write something already served; kept for ``retry`` if refused."""
        if self.unwritten or not self.write(write, what):
            self.unwritten.append(write)
            return False
        return True

    def record(self, rec: UsageRecord) -> asyncio.Future[bool]:
        """Record something already served (a refusal, a live turn); never refused."""
        return self.run(self.keep, lambda: self.store.record(rec), rec)

    def retry(self) -> None:
        """On the store's thread: write what was kept, in order, until the store refuses one."""
        while self.unwritten and self.write(self.unwritten[0], "a record kept for later"):
            self.unwritten.pop(0)
            if not self.unwritten:
                log.info("usage store back: every record kept meanwhile is written")

    def close(self) -> None:
        """Wait for every write asked for, then try once more what was kept (the proxy is stopping)."""
        self._thread.shutdown(wait=True)
        self.retry()
        if self.unwritten:
            log.error("%d usage writes could not be made before the stop (the store is down); see the "
                      "warnings above for each", len(self.unwritten))


class Metered:
    """One forwarded request's usage record, on the store's thread: the pending record (status 0) is
    written at once and then put on disk. ``written`` waits for the first, ``durable`` for both
    (each raises 503 when the store refused); ``finish`` fills in the outcome once, however the
    request ended."""

    def __init__(self, writer: UsageWriter, rec: UsageRecord) -> None:
        self.writer = writer
        self.rec = rec
        self._row: int | None = None
        self._completed: asyncio.Future[bool] | None = None
        self._begun = writer.run(self._begin)
        self._synced = writer.run(self._sync)

    def _begin(self) -> bool:
        def begin() -> None:
            self._row = self.writer.store.begin(self.rec)

        return self.writer.write(begin, self.rec)

    def _sync(self) -> bool:
        return self._row is not None and self.writer.write(self.writer.store.sync, self.rec)

    async def written(self) -> None:
        """Returns once the pending record is written; raises 503 ``usage_unavailable`` if it cannot be."""
        await self._passed(self._begun)

    async def durable(self) -> None:
        """Returns once the pending record is on disk; raises 503 ``usage_unavailable`` if it cannot be."""
        await self._passed(self._synced)

    @staticmethod
    async def _passed(step: asyncio.Future[bool]) -> None:
        if not await asyncio.shield(step):
            raise usage_unavailable()

    def finish(self, *, status: int, model: str, audio_seconds: float, latency_ms: float) -> asyncio.Future[bool]:
        """Complete the record (asked once; later calls return the first one's future). The write
        is queued at once, so it is made even if the caller cannot wait for it (a cancelled task)."""
        if self._completed is None:
            self._completed = self.writer.run(self._complete, status, model, audio_seconds, latency_ms)
        return self._completed

    def _complete(self, status: int, model: str, audio_seconds: float, latency_ms: float) -> bool:
        row = self._row  # the begin ran before this on the same thread
        if row is None:
            return True  # the pending record was never written: the request was refused, not served
        return self.writer.keep(lambda: self.writer.store.complete(
            row, status=status, model=model, audio_seconds=audio_seconds, latency_ms=latency_ms), self.rec)


async def retry_loop(writer: UsageWriter) -> None:
    """Writes what the store refused earlier, in order, once it takes writes again."""
    while True:
        await asyncio.sleep(2)
        if writer.unwritten:
            await writer.run(writer.retry)


async def export_loop(writer: UsageWriter, path: Path) -> None:
    while True:
        await writer.dirty.wait()
        writer.dirty.clear()
        try:
            await writer.run(writer.store.export_json, path)
        except Exception as exc:  # noqa: BLE001 - the export is a convenience; the database is the record
            log.warning("writing %s failed: %s", path, exc)
            writer.dirty.set()  # again on the next round
        await asyncio.sleep(5)
