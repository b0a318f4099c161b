"""A key's limits: requests per minute (the rate limiter) and audio seconds per UTC day (the usage
store), checked before anything is forwarded; answered 429 with Retry-After and x-ratelimit-*."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from limits import RateLimitItemPerMinute

from auth_proxy.keys import ApiKey
from auth_proxy.state import ProxyState
from common.errors import APIError


def start_of_utc_day(now: float) -> float:
    day = datetime.fromtimestamp(now, tz=timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


def daily_audio_quota(state: ProxyState, key: ApiKey) -> float | None:
    """The key's audio seconds per UTC day: its own, else the default; 0 or None for no quota."""
    return key.audio_seconds_per_day if key.audio_seconds_per_day is not None \
        else state.settings.default_audio_seconds_per_day


async def audio_quota_used_up(state: ProxyState, key: ApiKey) -> bool:
    """Whether the key has used its audio seconds of today (read on the usage store's thread, after
    the writes queued before)."""
    quota = daily_audio_quota(state, key)
    if not quota:
        return False
    used = await state.writer.run(state.usage.audio_seconds_since, key.id, start_of_utc_day(time.time()))
    return bool(used >= quota)


async def check_limits(state: ProxyState, key: ApiKey, is_transcription: bool) -> dict[str, str]:
    """Raises 429 when the key is over a limit; returns the x-ratelimit-* headers."""
    headers: dict[str, str] = {}
    rpm = key.rpm if key.rpm is not None else state.settings.default_rpm
    if rpm:
        item = RateLimitItemPerMinute(rpm)
        allowed = await state.limiter.hit(item, key.id)
        stats = await state.limiter.window(item, key.id)
        reset = max(0.0, stats.reset_time - time.time())
        headers = {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(stats.remaining),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
        }
        if not allowed:
            raise APIError(429, f"Rate limit reached: {rpm} requests per minute for key {key.name!r}",
                           code="rate_limit_exceeded", retry_after=max(1.0, reset), headers=headers)
    quota = daily_audio_quota(state, key)
    if quota and is_transcription:
        now = time.time()
        used = await state.writer.run(state.usage.audio_seconds_since, key.id, start_of_utc_day(now))
        headers["x-ratelimit-limit-audio-seconds"] = f"{quota:g}"
        headers["x-ratelimit-remaining-audio-seconds"] = f"{max(0.0, quota - used):.3f}"
        if used >= quota:
            until_midnight = start_of_utc_day(now) + 86400 - now
            raise APIError(429, f"Daily audio quota of {quota:g} s used up for key {key.name!r}; "
                           "it resets at 00:00 UTC", code="insufficient_quota", retry_after=until_midnight,
                           should_retry=False, headers=headers)
    return headers
