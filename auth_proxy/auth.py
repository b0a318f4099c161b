"""Who is calling: the API key from ``Authorization: Bearer``, and the guard against guessing keys
(an address with too many wrong keys in a minute is refused outright, right key or not). Used by
the HTTP routes and the live sessions alike."""

from __future__ import annotations

import time
from typing import Any

from limits import RateLimitItemPerMinute
from starlette.requests import Request

from auth_proxy.keys import ApiKey
from auth_proxy.state import ProxyState
from common.access import access_record, key_hint
from common.errors import APIError


def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def client_address(scope: Any) -> str:
    """The peer's address: limits are keyed by it, never by a header the client sets."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


async def check_guessing(state: ProxyState, address: str) -> None:
    """An address with too many failed keys in the last minute is refused outright (429) until the
    window moves on, valid key or not: key guessing cannot go on at full speed."""
    per_minute = state.settings.auth_failures_per_minute
    if not per_minute:
        return
    item = RateLimitItemPerMinute(per_minute)
    if not await state.limiter.test(item, "auth-failures", address):
        reset = max(1.0, (await state.limiter.window(item, "auth-failures", address)).reset_time - time.time())
        state.metrics.refused.labels("-", "auth_failures").inc()
        raise APIError(429, f"too many requests with a wrong API key from this address; retry in {reset:.0f} s",
                       code="too_many_auth_failures", type="rate_limit_error", retry_after=reset)


async def note_auth_failure(state: ProxyState, address: str) -> None:
    if state.settings.auth_failures_per_minute:
        item = RateLimitItemPerMinute(state.settings.auth_failures_per_minute)
        await state.limiter.hit(item, "auth-failures", address)


async def authenticate(state: ProxyState, request: Request) -> ApiKey:
    address = client_address(request.scope)
    await check_guessing(state, address)
    token = bearer_token(request)
    key = state.keys.authenticate(token) if token else None
    record = access_record(request)
    if key is None:
        await note_auth_failure(state, address)
        record.key_hint = key_hint(token) if token else ""
        raise APIError(401, "Incorrect API key provided. Create one with: python -m auth_proxy keys add NAME"
                       if token else "Missing API key: send Authorization: Bearer <key>",
                       code="invalid_api_key", should_retry=False)
    record.key = key.name
    return key
