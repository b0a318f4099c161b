"""One admitted request on its way to a bridge and back (``ForwardedRequest``).

It owns what the request holds: its in-flight slot, its body spooled to disk (with several
bridges), the bridge serving it and its usage record. Metered before it is served: the pending
record is written before anything reaches a bridge and is on disk (fsync, run while the bridge
works: ``auth_proxy.metering.Metered``) before any of the answer goes out; a request the store
cannot record is refused, never served free. ``finish`` gives everything back and completes the
record, once, on every way out: the first outcome stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from auth_proxy.admission import Slot
from auth_proxy.bridges import Bridge
from auth_proxy.forwarding import (
    SSEUsageScanner,
    downstream_headers,
    file_chunks,
    form_field,
    spool_body,
    upstream_headers,
)
from auth_proxy.keys import ApiKey
from auth_proxy.metering import Metered
from auth_proxy.state import ProxyState
from auth_proxy.usage_store import UsageRecord
from common.access import access_record
from common.errors import APIError, error_response

log = logging.getLogger("auth_proxy")

WHOLE_ANSWER_BYTES = 1 << 20  # a bridge's answer up to this size with a Content-Length is passed on whole
UNREACHED = (httpx.ConnectError, httpx.ConnectTimeout)  # a bridge never reached: another may take the body
OwnAnswer = Callable[["ForwardedRequest"], Awaitable[Response | None]]  # what the proxy answers itself


class ForwardedRequest:
    """An admitted request (its slot taken), from its pending usage record to its answer's end."""

    def __init__(self, state: ProxyState, request: Request, key: ApiKey, slot: Slot, started: float) -> None:
        self.state, self.request, self.key, self.slot, self.started = state, request, key, slot, started
        self.record = access_record(request)
        self.path = request.url.path
        self.is_transcription = self.path.startswith("/v1/audio/")
        self.metered = Metered(state.writer, UsageRecord(
            request_id=self.record.request_id, key_id=key.id, key_name=key.name, model="", route=self.path,
            status=0, audio_seconds=0.0, latency_ms=0.0, created=time.time()))
        self.spooled: str | None = None  # the body on disk (several bridges)
        self.length: int | None = None
        self.bridge: Bridge | None = None  # with several bridges: the one serving it
        self.released = False

    @classmethod
    async def start(cls, state: ProxyState, request: Request, key: ApiKey, slot: Slot,
                    started: float) -> ForwardedRequest:
        """The request with its pending usage record written; refused (its slot given back) when
        the record cannot be written, or the client left meanwhile."""
        forwarded = cls(state, request, key, slot, started)
        try:
            await forwarded.metered.written()
        except BaseException as exc:
            forwarded.finish(exc.status if isinstance(exc, APIError) else 499, 0.0, "")
            raise
        return forwarded

    def finish(self, status: int, audio_seconds: float, model: str) -> asyncio.Future[bool]:
        """Give back the slot, the spooled body and the bridge, and complete the usage record
        (queued at once; the caller may await its writing). Later calls change only the record."""
        if self.released:  # the first outcome stands
            return self.metered.finish(status=status, model=model, audio_seconds=audio_seconds, latency_ms=0.0)
        self.released = True
        self.slot.release()
        if self.bridge is not None:
            self.bridge.in_flight -= 1
        if self.spooled is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spooled)
        self.record.status, self.record.model = status, model
        self.record.audio_seconds = audio_seconds if self.is_transcription else None
        return self.metered.finish(status=status, model=model, audio_seconds=audio_seconds,
                                   latency_ms=(time.monotonic() - self.started) * 1000)

    # ------------------------------------------------------------------ there

    async def send(self, own_answer: OwnAnswer | None = None) -> httpx.Response | Response:
        """The body read (spooled to disk with several bridges) and sent to a bridge: its answer,
        still streaming. Or an answer without a bridge: ``own_answer``'s (with several bridges), or
        a 503 when no bridge can be reached."""
        settings = self.state.settings
        try:
            cap, several = settings.max_upload_bytes + 64 * 1024, self.state.pool is not None
            body, self.length, self.spooled = await spool_body(self.request, cap, settings.body_read_timeout,
                                                               spool=several)
            target = self._target()
            if self.state.pool is None:
                return await self.state.client.send(self._build(self.state.client, target, body), stream=True)
            own = await own_answer(self) if own_answer is not None else None
            if own is not None:
                await self.metered.durable()
                await asyncio.shield(self.finish(own.status_code, 0.0, ""))
                return own
            self.bridge, upstream = await self.state.pool.reach(await self._named_model(),
                                                                lambda bridge: self._send_to(bridge, target),
                                                                UNREACHED)
            return upstream
        except APIError as exc:
            await asyncio.shield(self.finish(exc.status, 0.0, ""))
            raise
        except httpx.HTTPError as exc:
            await asyncio.shield(self.finish(503, 0.0, ""))
            self.state.metrics.bridge_errors.labels("unreachable").inc()
            log.warning("bridge unreachable: %r", exc)
            return error_response(503, "the transcription service is not reachable; retry shortly",
                                  code="bridge_unavailable", type="server_error", retry_after=5)
        except BaseException:
            self.finish(499, 0.0, "")
            raise

    def _target(self) -> httpx.URL:
        """The path and query as the client encoded them (the checks read the path decoded): "%2F"
        stays one segment, and bytes that are no URL's are never re-encoded into something else."""
        raw_path = self.request.scope.get("raw_path") or self.path.encode()
        query = self.request.scope.get("query_string") or b""
        try:
            return httpx.URL((raw_path + b"?" + query if query else raw_path).decode("latin-1"))
        except httpx.InvalidURL:
            raise APIError(400, "the request path is not a valid URL path", code="invalid_request") from None

    def _build(self, client: httpx.AsyncClient, target: httpx.URL, content: Any) -> httpx.Request:
        get = self.request.method == "GET"
        return client.build_request(
            self.request.method, target, content=None if get else content,
            headers=upstream_headers(self.request.headers.items(), self.record.request_id,
                                     None if get else self.length))

    async def _named_model(self) -> str:
        """The upload's ``model`` field, read from the spooled body ("" for none)."""
        if not (self.is_transcription and self.spooled is not None):
            return ""
        named = await asyncio.to_thread(form_field, self.spooled, self.request.headers.get("content-type", ""), "model")
        return named or ""

    async def _send_to(self, bridge: Bridge, target: httpx.URL) -> httpx.Response:
        bridge.in_flight += 1
        try:
            content = file_chunks(self.spooled) if self.spooled is not None else b""
            return await bridge.client.send(self._build(bridge.client, target, content), stream=True)
        except BaseException as exc:
            bridge.in_flight -= 1
            if isinstance(exc, UNREACHED):
                self.state.metrics.bridge_errors.labels("unreachable").inc()
            raise

    # ------------------------------------------------------------------ and back

    async def answer(self, upstream: httpx.Response, limit_headers: dict[str, str]) -> Response:
        """The bridge's answer passed on once the usage record is on disk: whole when short, else
        streamed; the record completed with the audio seconds the bridge reported before the answer
        ends."""
        try:
            await self.metered.durable()  # the fsync ran while the bridge worked: usually done by now
        except BaseException as exc:
            completed = self.finish(exc.status if isinstance(exc, APIError) else 499, 0.0, "")
            await asyncio.shield(upstream.aclose())
            if isinstance(exc, APIError):
                await asyncio.shield(completed)
            raise
        headers = {**downstream_headers(upstream.headers), **limit_headers}
        scanner = SSEUsageScanner() if upstream.headers.get("content-type", "").startswith("text/event-stream") \
            else None
        length = upstream.headers.get("content-length", "")
        if scanner is None and length.isdigit() and int(length) <= WHOLE_ANSWER_BYTES:
            return await self._whole(upstream, headers)
        return StreamingResponse(self._relay(upstream, scanner), status_code=upstream.status_code, headers=headers,
                                 media_type=upstream.headers.get("content-type"),
                                 background=BackgroundTask(self._never_started, upstream))

    async def _whole(self, upstream: httpx.Response, headers: dict[str, str]) -> Response:
        """A short answer the bridge sent whole (a transcript, an error), passed on whole: nothing is
        gained by streaming it, and a plain response is cheaper than a stream."""
        model = upstream.headers.get("x-model-id", "")
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            await asyncio.shield(self.finish(502, 0.0, model))
            self.state.metrics.bridge_errors.labels("stream_broken").inc()
            log.warning("bridge answer broke off: %r", exc)
            return error_response(502, "the transcription service's answer broke off; retry", code="bridge_error",
                                  type="server_error", retry_after=1)
        except BaseException:
            self.finish(499, 0.0, model)
            raise
        finally:
            await asyncio.shield(upstream.aclose())
        completed = self.finish(upstream.status_code, answered_seconds(upstream, None), model)
        return Response(content, status_code=upstream.status_code, headers=headers,
                        media_type=upstream.headers.get("content-type"),
                        background=BackgroundTask(committed, completed))

    async def _relay(self, upstream: httpx.Response, scanner: SSEUsageScanner | None) -> AsyncIterator[bytes]:
        """The answer's bytes as they come, the stream's usage read on the way; the record queued at
        once when it ends (a cancelled task cannot await) and committed before the response ends."""
        status = upstream.status_code
        try:
            async for chunk in upstream.aiter_raw():
                if scanner is not None:
                    scanner.feed(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            self.state.metrics.bridge_errors.labels("stream_broken").inc()
            log.warning("bridge stream broke: %r", exc)
            status = 502
        except BaseException:
            status = 499  # the client went away
            raise
        finally:
            completed = self.finish(status, answered_seconds(upstream, scanner), upstream.headers.get("x-model-id", ""))
            await asyncio.shield(upstream.aclose())
            if status != 499:
                await asyncio.shield(completed)

    async def _never_started(self, upstream: httpx.Response) -> None:
        """Runs after the response in every case; matters only when the client left before the body
        was iterated (then the relay's ``finally`` never ran): record it and free the slot."""
        if not self.released:
            self.finish(499, 0.0, upstream.headers.get("x-model-id", ""))
            await upstream.aclose()


async def committed(completed: asyncio.Future[bool]) -> None:
    """The usage record's write, awaited before the response ends (the client has it all by then)."""
    await asyncio.shield(completed)


def answered_seconds(upstream: httpx.Response, scanner: SSEUsageScanner | None) -> float:
    """The audio seconds the bridge reported: in the stream's last event, else in ``x-audio-seconds``."""
    seconds = scanner.audio_seconds if scanner is not None else None
    if seconds is None:
        try:
            seconds = float(upstream.headers.get("x-audio-seconds", "0"))
        except ValueError:
            seconds = 0.0
    return seconds or 0.0
