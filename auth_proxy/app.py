"""mvp-auth: the only service clients talk to.

Request path: CORS -> request id -> key -> limits (in flight, body size, requests per minute,
audio seconds per day) -> streamed forward to the bridge -> usage record (committed before the
response ends) -> streamed answer.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.background import BackgroundTask
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from auth_proxy.auth import authenticate
from auth_proxy.bridges import Bridge, BridgePool, answer_from_pool
from auth_proxy.config import ProxySettings
from auth_proxy.forwarding import (
    SSEUsageScanner,
    downstream_headers,
    file_chunks,
    form_field,
    spool_body,
    upstream_headers,
)
from auth_proxy.keys import KeyStore
from auth_proxy.limiter import Limiter, redact
from auth_proxy.metering import Metered, UsageWriter, export_loop, retry_loop, usage_unavailable
from auth_proxy.metrics import ROUTES, ProxyMetrics
from auth_proxy.quotas import check_limits
from auth_proxy.realtime import realtime_session
from auth_proxy.state import ProxyState
from auth_proxy.usage_store import UsageRecord, UsageStore
from common.access import AccessMiddleware, access_record, serve_metrics
from common.errors import APIError, error_response, validation_error_response
from common.openapi import error as openapi_error
from common.openapi import proxy_schema

log = logging.getLogger("auth_proxy")

FORWARDED_PREFIXES = ("/v1/audio/", "/v1/models")
WHOLE_ANSWER_BYTES = 1 << 20  # a bridge's answer up to this size with a Content-Length is passed on whole
STATIC = Path(__file__).resolve().parent / "static"
mimetypes.add_type("text/javascript", ".mjs")  # module scripts need a JavaScript type (not every Python knows .mjs)


def create_app(settings: ProxySettings) -> FastAPI:
    metrics = ProxyMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop_metrics = serve_metrics(metrics.registry, settings.auth_metrics_host or settings.auth_host,
                                     settings.auth_metrics_port, "AUTH_METRICS_PORT")
        keys = KeyStore(settings.api_keys_file)
        if len(keys) == 0:
            log.warning("no API keys in %s: every request will get 401. Create one with: "
                        "python -m auth_proxy keys add NAME", settings.api_keys_file)
        try:
            usage = UsageStore(settings.usage_db)
        except Exception as exc:  # a read-only or missing disk, PostgreSQL down or refusing: say which
            raise RuntimeError(f"cannot open the usage store (USAGE_DB={redact(settings.usage_db)}): "
                               f"{exc.__class__.__name__}: {exc}") from exc

        def bridge_client(url: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=url,
                timeout=httpx.Timeout(connect=5.0, read=settings.bridge_timeout, write=60.0, pool=10.0),
                limits=httpx.Limits(max_connections=settings.max_in_flight + 8,
                                    max_keepalive_connections=settings.max_in_flight),
            )

        client = bridge_client(settings.bridge_url)
        limiter = Limiter(settings.rate_limit_storage, on_fallback=metrics.limits_local.set)
        writer = UsageWriter(usage, metrics)
        state = ProxyState(settings, keys, usage, writer, client, limiter, metrics)
        if settings.bridge_urls:
            state.pool = BridgePool(settings.bridge_urls, poll_seconds=settings.bridge_poll_seconds,
                                    make_client=bridge_client)
            await state.pool.start()
        app.state.proxy = state
        if settings.usage_json is not None:
            state.export_task = asyncio.create_task(export_loop(writer, settings.usage_json))
        state.retry_task = asyncio.create_task(retry_loop(writer))
        log.info("proxy ready: forwarding to %s, %d key(s), usage in %s, rate limits in %s",
                 ", ".join(settings.bridge_urls) if settings.bridge_urls else settings.bridge_url, len(keys),
                 "PostgreSQL" if usage.postgres else settings.usage_db, redact(settings.rate_limit_storage))
        try:
            yield
        finally:
            if state.export_task is not None:
                state.export_task.cancel()
            state.retry_task.cancel()
            # Requests the stop cut off unwind after this starts: each frees its slot and asks for
            # its outcome to be written. Wait a moment for them, so that their writes are drained.
            deadline = time.monotonic() + 5
            while state.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await client.aclose()
            if state.pool is not None:
                await state.pool.close()
            writer.close()
            if settings.usage_json is not None:
                usage.export_json(settings.usage_json)
            usage.close()
            if stop_metrics is not None:
                stop_metrics()
            log.info("proxy stopped")

    app = FastAPI(title="mvp-auth", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return validation_error_response(list(exc.errors()))

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> Response:
        # The audio API's contract (common.openapi) behind a key, and the proxy's own routes.
        if app.openapi_schema is None:
            own = get_openapi(title=app.title, version=app.version, routes=app.routes)["paths"]
            usage = own["/v1/usage"]["get"]
            usage.update(security=[{"bearer": []}], responses={
                "200": {"description": "usage totals and records", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["object", "totals", "records"]}}}},
                **{str(s): openapi_error(s) for s in (400, 401, 403, 429, 503)}})
            app.openapi_schema = proxy_schema(app.title, app.version, {"/v1/usage": {"get": usage}})
        return JSONResponse(app.openapi_schema)

    # The toolbar page: static files, no key needed to load them; every call it makes sends the key
    # typed in. It may talk to this origin only.
    page_headers = {"Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; "
                    "style-src 'self' 'unsafe-inline'; media-src 'self' blob:; frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def toolbar() -> Response:
        return FileResponse(STATIC / "index.html", headers=page_headers)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/health", include_in_schema=False)
    async def health(request: Request) -> Response:
        state: ProxyState = request.app.state.proxy
        if state.pool is not None:
            ready = bool(state.pool.ready())
            body = {"status": "ready" if ready else "not_ready", "models": state.pool.loaded_models(),
                    "bridges": [b.describe() for b in state.pool.bridges.values() if not b.gone]}
            return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})
        try:
            r = await state.client.get("/health", timeout=5.0)
            bridge = r.json()
            ready = r.status_code == 200
        except (httpx.HTTPError, ValueError) as exc:
            bridge, ready = {"error": f"bridge unreachable: {exc.__class__.__name__}"}, False
        body = {"status": "ready" if ready else "not_ready", "bridge": bridge}
        return JSONResponse(body, status_code=200 if ready else 503,
                            headers={} if ready else {"Retry-After": "5"})

    @app.get("/v1/usage")
    async def usage(request: Request, since: float | None = None, until: float | None = None,
                    key: str | None = None, limit: int = 100) -> Response:
        state: ProxyState = request.app.state.proxy
        caller = await authenticate(state, request)
        key_id: str | None = caller.id
        if caller.admin:
            key_id = None
            if key is not None:
                matches = [k for k in state.keys._keys if k.name == key or k.id == key]
                key_id = matches[0].id if matches else key
        elif key is not None and key not in (caller.name, caller.id):
            raise APIError(403, "only admin keys can read other keys' usage", code="forbidden", should_retry=False)
        limit = max(1, min(limit, 1000))
        totals = await state.writer.run(state.usage.totals, key_id, since, until)
        records = await state.writer.run(state.usage.records, key_id, since, until, limit)
        return JSONResponse({"object": "usage", "since": since, "until": until, "totals": totals,
                             "records": records})

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await realtime_session(ws, ws.app.state.proxy)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; see the proxy log", code="internal_error", type="server_error")

    # A plain Starlette route: nothing for FastAPI's parameter handling to do on the hot path.
    app.add_route("/v1/{path:path}", forward_request, methods=["GET", "POST"], include_in_schema=False)

    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=False,  # keys travel in Authorization, never in cookies
        allow_methods=["GET", "POST", "OPTIONS"],
        # The OpenAI JS SDK sends Authorization, Content-Type and a changing set of x-stainless-*
        # headers; with credentials off, allowing the requested headers is safe.
        allow_headers=["*"],
        expose_headers=["x-request-id", "retry-after", "x-ratelimit-limit-requests",
                        "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "x-model-id",
                        "x-audio-seconds"],
        max_age=600,
    )
    app.add_middleware(AccessMiddleware, logger="auth_proxy.access", routes=ROUTES, observe=metrics.observe_request)
    return app


async def forward_request(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    settings = state.settings
    record = access_record(request)
    request_id = record.request_id
    started = time.monotonic()
    path = request.url.path
    key = await authenticate(state, request)
    segments = path.split("/")
    if not path.startswith(FORWARDED_PREFIXES) or ".." in segments or "." in segments or "" in segments[1:]:
        raise APIError(404, f"no route {path}", code="not_found", should_retry=False)
    if path == "/v1/models/switch" and not key.admin:
        raise APIError(403, "switching the model changes it for every key: use an admin key "
                       "(python -m auth_proxy keys add NAME --admin)", code="forbidden", should_retry=False)
    is_transcription = path.startswith("/v1/audio/")
    if state.in_flight >= settings.max_in_flight:
        state.metrics.refused.labels(key.name, "in_flight").inc()
        raise APIError(503, "too many requests in flight; retry shortly", code="overloaded", type="server_error",
                       retry_after=2)
    try:
        limit_headers = await check_limits(state, key, is_transcription)
    except APIError as exc:  # refused requests are metered too (status 429, no audio)
        limit = "audio_quota" if exc.code == "insufficient_quota" else "rpm"
        state.metrics.refused.labels(key.name, limit).inc()
        state.writer.record(UsageRecord(request_id=request_id, key_id=key.id, key_name=key.name, model="",
                                        route=path, status=exc.status, audio_seconds=0.0,
                                        latency_ms=(time.monotonic() - started) * 1000, created=time.time()))
        raise
    except Exception:  # the quota could not be read: the store is down
        raise usage_unavailable() from None
    # Metered before it is served: a request the store cannot record is refused, never served free.
    # Its pending record is written before anything reaches a bridge, and on disk (fsync) before
    # any of the answer goes out: the fsync runs while the bridge works (``Metered``).
    metered = Metered(state.writer, UsageRecord(request_id=request_id, key_id=key.id, key_name=key.name, model="",
                                                route=path, status=0, audio_seconds=0.0, latency_ms=0.0,
                                                created=time.time()))
    state.in_flight += 1  # taken before the wait, so that the cap holds while records are written
    state.metrics.in_flight.inc()
    try:
        await metered.written()
    except BaseException as exc:  # refused (the store is down), or the client left meanwhile
        state.in_flight -= 1
        state.metrics.in_flight.dec()
        metered.finish(status=exc.status if isinstance(exc, APIError) else 499, model="", audio_seconds=0.0,
                       latency_ms=(time.monotonic() - started) * 1000)
        raise
    released = False
    spooled: str | None = None
    chosen: Bridge | None = None  # with several bridges: the one serving this request

    def finish(status: int, audio_seconds: float, model: str) -> asyncio.Future[bool]:
        """Frees the request's slot and completes its usage record (queued at once; the caller may
        await it)."""
        nonlocal released
        if released:  # the first outcome stands
            return metered.finish(status=status, model=model, audio_seconds=audio_seconds, latency_ms=0.0)
        released = True
        state.in_flight -= 1
        state.metrics.in_flight.dec()
        if chosen is not None:
            chosen.in_flight -= 1
        if spooled is not None:
            import os

            try:
                os.unlink(spooled)
            except FileNotFoundError:
                pass
        record.status, record.model = status, model
        record.audio_seconds = audio_seconds if is_transcription else None
        return metered.finish(status=status, model=model, audio_seconds=audio_seconds,
                              latency_ms=(time.monotonic() - started) * 1000)

    try:
        body, length, spooled = await spool_body(request, settings.max_upload_bytes + 64 * 1024,
                                                 settings.body_read_timeout, spool=state.pool is not None)
        # The path and query as the client encoded them (the checks above read the path decoded):
        # "%2F" stays one segment, and bytes that are no URL's are never re-encoded into something else.
        raw_path = request.scope.get("raw_path") or path.encode()
        query = request.scope.get("query_string") or b""
        try:
            target = httpx.URL((raw_path + b"?" + query if query else raw_path).decode("latin-1"))
        except httpx.InvalidURL:
            raise APIError(400, "the request path is not a valid URL path", code="invalid_request") from None

        def build(client: httpx.AsyncClient, content: Any) -> httpx.Request:
            return client.build_request(
                request.method, target,
                headers=upstream_headers(request.headers.items(), request_id,
                                         length if request.method != "GET" else None),
                content=content if request.method != "GET" else None,
            )

        if state.pool is None:
            upstream = await state.client.send(build(state.client, body), stream=True)
        else:
            local = await answer_from_pool(state.pool, request, path, spooled, request_id)
            if local is not None:
                await metered.durable()
                await asyncio.shield(finish(local.status_code, 0.0, ""))
                return local
            model = ""
            if is_transcription and spooled is not None:
                named: str | None = await asyncio.to_thread(form_field, spooled,
                                                            request.headers.get("content-type", ""), "model")
                model = named or ""

            async def send(bridge: Bridge) -> httpx.Response:
                bridge.in_flight += 1
                try:
                    content = file_chunks(spooled) if spooled is not None else b""
                    return await bridge.client.send(build(bridge.client, content), stream=True)
                except BaseException as exc:
                    bridge.in_flight -= 1
                    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                        state.metrics.bridge_errors.labels("unreachable").inc()
                    raise

            # A bridge never reached: the body is on disk, so another one gets it.
            chosen, upstream = await state.pool.reach(model, send, (httpx.ConnectError, httpx.ConnectTimeout))
    except APIError as exc:
        await asyncio.shield(finish(exc.status, 0.0, ""))
        raise
    except httpx.HTTPError as exc:
        await asyncio.shield(finish(503, 0.0, ""))
        state.metrics.bridge_errors.labels("unreachable").inc()
        log.warning("bridge unreachable: %r", exc)
        return error_response(503, "the transcription service is not reachable; retry shortly",
                              code="bridge_unavailable", type="server_error", retry_after=5)
    except BaseException:
        finish(499, 0.0, "")
        raise
    try:
        await metered.durable()  # the fsync ran while the bridge worked: usually done by now
    except BaseException as exc:
        completed = finish(exc.status if isinstance(exc, APIError) else 499, 0.0, "")
        await asyncio.shield(upstream.aclose())
        if isinstance(exc, APIError):
            await asyncio.shield(completed)
        raise

    headers = downstream_headers(upstream.headers)
    headers.update(limit_headers)
    is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
    scanner = SSEUsageScanner() if is_sse else None
    model_id = upstream.headers.get("x-model-id", "")

    def answered_seconds() -> float:
        seconds = scanner.audio_seconds if scanner is not None else None
        if seconds is None:
            try:
                seconds = float(upstream.headers.get("x-audio-seconds", "0"))
            except ValueError:
                seconds = 0.0
        return seconds or 0.0

    if scanner is None and upstream.headers.get("content-length", "").isdigit() \
            and int(upstream.headers["content-length"]) <= WHOLE_ANSWER_BYTES:
        # A short answer the bridge sent whole (a transcript, an error): passed on whole. Nothing is
        # gained by streaming it, and a plain response is cheaper than a stream.
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            await asyncio.shield(finish(502, 0.0, model_id))
            state.metrics.bridge_errors.labels("stream_broken").inc()
            log.warning("bridge answer broke off: %r", exc)
            return error_response(502, "the transcription service's answer broke off; retry", code="bridge_error",
                                  type="server_error", retry_after=1)
        except BaseException:
            finish(499, 0.0, model_id)
            raise
        finally:
            await asyncio.shield(upstream.aclose())
        completed = finish(upstream.status_code, answered_seconds(), model_id)

        async def committed() -> None:  # before the response ends; the client has it all by then
            await asyncio.shield(completed)

        return Response(content, status_code=upstream.status_code, headers=headers,
                        media_type=upstream.headers.get("content-type"), background=BackgroundTask(committed))

    async def relay() -> AsyncIterator[bytes]:
        status = upstream.status_code
        try:
            async for chunk in upstream.aiter_raw():
                if scanner is not None:
                    scanner.feed(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            state.metrics.bridge_errors.labels("stream_broken").inc()
            log.warning("bridge stream broke: %r", exc)
            status = 502
        except BaseException:
            status = 499  # the client went away
            raise
        finally:
            # Queued at once (a cancelled task cannot await), and committed before the response ends.
            completed = finish(status, answered_seconds(), model_id)
            await asyncio.shield(upstream.aclose())
            if status != 499:
                await asyncio.shield(completed)

    async def never_started() -> None:
        # Runs after the response in every case; matters only when the client left before the
        # body was iterated (then relay's finally never ran): record it and free the slot.
        if not released:
            finish(499, 0.0, model_id)
            await upstream.aclose()

    return StreamingResponse(relay(), status_code=upstream.status_code, headers=headers,
                             media_type=upstream.headers.get("content-type"),
                             background=BackgroundTask(never_started))
