"""Recording usage: each write timed and counted; a write the store refuses for something already
served is kept in memory and written again, in order, once the store takes writes (``retry_loop``);
the JSON summary is rewritten in the background (``export_loop``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from auth_proxy.state import ProxyState
from auth_proxy.usage_store import UsageRecord
from common.errors import APIError

log = logging.getLogger("auth_proxy")


def usage_unavailable() -> APIError:
    return APIError(503, "usage cannot be recorded right now, so nothing is served; retry shortly",
                    code="usage_unavailable", type="server_error", retry_after=5)


def write_usage(state: ProxyState, write: Callable[[], Any], what: object) -> bool:
    """Run one usage write, timed and counted; False (logged) when the store refused it."""
    started = time.monotonic()
    try:
        write()
    except Exception as exc:  # noqa: BLE001 - the caller decides: refuse, or keep it for later
        state.metrics.usage_write_errors.inc()
        log.warning("usage store unavailable (%s: %s) for %s", exc.__class__.__name__, exc, what)
        return False
    state.metrics.usage_write_seconds.observe(time.monotonic() - started)
    state.dirty.set()
    return True


def record_usage(state: ProxyState, rec: UsageRecord) -> None:
    """Write one usage record of something already served; kept in memory and written again later
    (``retry_loop``) if the store refuses it now."""
    if state.unwritten or not write_usage(state, lambda: state.usage.record(rec), rec):
        state.unwritten.append(lambda: state.usage.record(rec))


async def retry_loop(state: ProxyState) -> None:
    """Writes what the store refused earlier, in order, once it takes writes again."""
    while True:
        await asyncio.sleep(2)
        while state.unwritten:
            if not await asyncio.to_thread(write_usage, state, state.unwritten[0], "a record kept for later"):
                break
            state.unwritten.pop(0)
            if not state.unwritten:
                log.info("usage store back: every record kept meanwhile is written")


async def export_loop(state: ProxyState) -> None:
    assert state.settings.usage_json is not None
    while True:
        await state.dirty.wait()
        state.dirty.clear()
        try:
            await asyncio.to_thread(state.usage.export_json, state.settings.usage_json)
        except Exception as exc:  # noqa: BLE001 - the export is a convenience; the database is the record
            log.warning("writing %s failed: %s", state.settings.usage_json, exc)
            state.dirty.set()  # again on the next round
        await asyncio.sleep(5)
