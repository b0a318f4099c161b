"""Who is let in, in one order for HTTP requests and live sessions alike: the caller's key (with
the guard against guessing, ``auth_proxy.auth``), then a free slot (requests in flight, or live
sessions per key), then the key's limits (``auth_proxy.quotas``), then the slot taken. Every refusal
is an ``APIError`` in OpenAI's shape, counted in ``stt_proxy_refused_total`` by its reason; a
usage store that cannot be read refuses with 503, never lets the caller in unmetered.
"""

from __future__ import annotations

from typing import Protocol

from auth_proxy.keys import ApiKey
from auth_proxy.metering import usage_unavailable
from auth_proxy.quotas import check_limits
from auth_proxy.state import ProxyState
from common.errors import APIError


class Slot(Protocol):
    """Room for one more request or session."""

    def check(self) -> None:
        """Raise the refusal when none is free."""

    def take(self) -> None: ...

    def release(self) -> None: ...


class RequestSlot:
    """One of the proxy's ``MAX_IN_FLIGHT`` requests."""

    def __init__(self, state: ProxyState, key: ApiKey) -> None:
        self.state, self.key = state, key

    def check(self) -> None:
        if self.state.in_flight >= self.state.settings.max_in_flight:
            refused(self.state, self.key, "in_flight")
            raise APIError(503, "too many requests in flight; retry shortly", code="overloaded",
                           type="server_error", retry_after=2)

    def take(self) -> None:
        self.state.in_flight += 1
        self.state.metrics.in_flight.inc()

    def release(self) -> None:
        self.state.in_flight -= 1
        self.state.metrics.in_flight.dec()


class SessionSlot:
    """One of a key's ``REALTIME_SESSIONS_PER_KEY`` live sessions."""

    def __init__(self, state: ProxyState, key: ApiKey) -> None:
        self.state, self.key = state, key

    def check(self) -> None:
        most = self.state.settings.realtime_sessions_per_key
        open_now = self.state.realtime_sessions.get(self.key.id, 0)
        if open_now >= most:
            refused(self.state, self.key, "sessions")
            raise APIError(429, f"key {self.key.name!r} has {open_now} live sessions open, the most allowed "
                           f"(REALTIME_SESSIONS_PER_KEY={most})", code="too_many_sessions", type="rate_limit_error")

    def take(self) -> None:
        sessions = self.state.realtime_sessions
        sessions[self.key.id] = sessions.get(self.key.id, 0) + 1

    def release(self) -> None:
        sessions = self.state.realtime_sessions
        sessions[self.key.id] -= 1
        if not sessions[self.key.id]:
            del sessions[self.key.id]


def refused(state: ProxyState, key: ApiKey, reason: str) -> None:
    state.metrics.refused.labels(key.name, reason).inc()


async def admit(state: ProxyState, key: ApiKey, slot: Slot, *, is_transcription: bool) -> dict[str, str]:
    """Let ``key`` in: a free ``slot``, then the key's limits (requests per minute; audio seconds per
    day when it transcribes), then the slot taken (the caller gives it back). Returns the limits'
    ``x-ratelimit-*`` headers; raises the refusal (503 when the usage store cannot be read)."""
    slot.check()
    try:
        headers = await check_limits(state, key, is_transcription)
    except APIError as exc:
        refused(state, key, "audio_quota" if exc.code == "insufficient_quota" else "rpm")
        raise
    except Exception:  # the quota could not be read: the store is down
        raise usage_unavailable() from None
    slot.take()
    return headers
