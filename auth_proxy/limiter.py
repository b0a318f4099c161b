"""Requests-per-minute counters (the ``limits`` library, moving windows): in this process's memory,
or in Redis shared by every proxy replica (``RATE_LIMIT_STORAGE=redis://host:6379/0``).

When Redis cannot be reached, the proxy counts in its own memory until Redis answers again (tried
again every ``RETRY_SECONDS``): the limits stay in force, per proxy, so N replicas let through at
most N times a key's limit meanwhile, and no request is refused because Redis is down. Refusing
everything would make Redis a single point of failure for the whole service, and letting
everything through would leave key guessing unchecked; usage and daily quotas are in the usage
store either way, which fails closed on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from limits.util import WindowStats

log = logging.getLogger("auth_proxy.limits")

RETRY_SECONDS = 5.0
T = TypeVar("T")


# What RATE_LIMIT_STORAGE may name besides memory:// (checked by the settings, auth_proxy/config.py).
SHARED_SCHEMES = ("redis://", "rediss://", "redis+unix://")


def shared_storage(uri: str) -> Storage | None:
    """The storage a ``RATE_LIMIT_STORAGE`` value names; None for this process's memory."""
    if uri in ("", "memory://"):
        return None
    storage = storage_from_string(f"async+{uri}", implementation="redispy", socket_timeout=1.0,
                                  socket_connect_timeout=1.0)
    assert isinstance(storage, Storage)
    return storage


class Limiter:
    """``hit``/``test``/``window`` as ``limits``' moving-window strategy has them, over Redis when
    configured and reachable, else over memory. ``on_fallback(True/False)`` is told when it
    changes over (for a metric)."""

    def __init__(self, uri: str, on_fallback: Callable[[bool], None] | None = None) -> None:
        self.uri = uri
        self._local = MovingWindowRateLimiter(MemoryStorage())
        storage = shared_storage(uri)
        self._shared = MovingWindowRateLimiter(storage) if storage is not None else None
        self._retry_at = 0.0
        self.degraded = False
        self._on_fallback = on_fallback

    async def _run(self, call: Callable[[MovingWindowRateLimiter], Awaitable[T]]) -> T:
        if self._shared is not None and time.monotonic() >= self._retry_at:
            try:
                result = await call(self._shared)
            except Exception as exc:  # noqa: BLE001 - any storage failure: count locally meanwhile
                self._retry_at = time.monotonic() + RETRY_SECONDS
                if not self.degraded:
                    self.degraded = True
                    log.error("rate-limit storage %s unreachable (%s: %s): counting limits in this proxy's "
                              "memory until it answers (limits now hold per proxy)", redact(self.uri),
                              exc.__class__.__name__, exc)
                    if self._on_fallback:
                        self._on_fallback(True)
            else:
                if self.degraded:
                    self.degraded = False
                    log.warning("rate-limit storage %s answers again: limits are shared again", redact(self.uri))
                    if self._on_fallback:
                        self._on_fallback(False)
                return result
        return await call(self._local)

    async def hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        return await self._run(lambda s: s.hit(item, *identifiers))

    async def test(self, item: RateLimitItem, *identifiers: str) -> bool:
        return await self._run(lambda s: s.test(item, *identifiers))

    async def window(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        return await self._run(lambda s: s.get_window_stats(item, *identifiers))


def redact(uri: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
