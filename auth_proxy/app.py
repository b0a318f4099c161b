"""mvp-auth: the only service clients talk to.

Request path: CORS -> request id -> key -> limits (in flight, body size, requests per minute,
audio seconds per day) -> streamed forward to the bridge -> usage record (committed before the
response ends) -> streamed answer.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from limits import RateLimitItemPerMinute
from starlette.background import BackgroundTask
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from auth_proxy.bridges import Bridge, BridgePool, answer_from_pool
from auth_proxy.config import ProxySettings
from auth_proxy.forwarding import SSEUsageScanner, downstream_headers, file_chunks, form_field, upstream_headers
from auth_proxy.keys import ApiKey, KeyStore
from auth_proxy.limiter import Limiter, redact
from auth_proxy.metrics import ROUTES, ProxyMetrics
from auth_proxy.realtime import realtime_session
from auth_proxy.usage_store import UsageRecord, UsageStore
from common.access import AccessMiddleware, access_record, key_hint, serve_metrics
from common.errors import APIError, error_response, validation_error_response
from common.openapi import error as openapi_error
from common.openapi import proxy_schema

log = logging.getLogger("auth_proxy")

FORWARDED_PREFIXES = ("/v1/audio/", "/v1/models")
STATIC = Path(__file__).resolve().parent / "static"
mimetypes.add_type("text/javascript", ".mjs")  # module scripts need a JavaScript type (not every Python knows .mjs)


@dataclass
class ProxyState:
    settings: ProxySettings
    keys: KeyStore
    usage: UsageStore
    client: httpx.AsyncClient
    limiter: Limiter
    metrics: ProxyMetrics
    pool: BridgePool | None = None  # several bridges (BRIDGE_URLS); None: the one BRIDGE_URL
    in_flight: int = 0
    realtime_sessions: dict[str, int] = field(default_factory=dict)  # open live sessions by key id
    export_task: asyncio.Task[None] | None = None
    retry_task: asyncio.Task[None] | None = None
    unwritten: list[Callable[[], Any]] = field(default_factory=list)  # usage writes the store refused, in order
    dirty: asyncio.Event = field(default_factory=asyncio.Event)


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


def start_of_utc_day(now: float) -> float:
    day = datetime.fromtimestamp(now, tz=timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


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
    quota = key.audio_seconds_per_day if key.audio_seconds_per_day is not None \
        else state.settings.default_audio_seconds_per_day
    if quota and is_transcription:
        now = time.time()
        used = state.usage.audio_seconds_since(key.id, start_of_utc_day(now))
        headers["x-ratelimit-limit-audio-seconds"] = f"{quota:g}"
        headers["x-ratelimit-remaining-audio-seconds"] = f"{max(0.0, quota - used):.3f}"
        if used >= quota:
            until_midnight = start_of_utc_day(now) + 86400 - now
            raise APIError(429, f"Daily audio quota of {quota:g} s used up for key {key.name!r}; "
                           "it resets at 00:00 UTC", code="insufficient_quota", retry_after=until_midnight,
                           should_retry=False, headers=headers)
    return headers


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
        state = ProxyState(settings, keys, usage, client, limiter, metrics)
        if settings.bridge_urls:
            state.pool = BridgePool(settings.bridge_urls, poll_seconds=settings.bridge_poll_seconds,
                                    make_client=bridge_client)
            await state.pool.start()
        app.state.proxy = state
        if settings.usage_json is not None:
            state.export_task = asyncio.create_task(export_loop(state))
        state.retry_task = asyncio.create_task(retry_loop(state))
        log.info("proxy ready: forwarding to %s, %d key(s), usage in %s, rate limits in %s",
                 ", ".join(settings.bridge_urls) if settings.bridge_urls else settings.bridge_url, len(keys),
                 "PostgreSQL" if usage.postgres else settings.usage_db, redact(settings.rate_limit_storage))
        try:
            yield
        finally:
            if state.export_task is not None:
                state.export_task.cancel()
            state.retry_task.cancel()
            await client.aclose()
            if state.pool is not None:
                await state.pool.close()
            while state.unwritten and write_usage(state, state.unwritten[0], "a record kept for later"):
                state.unwritten.pop(0)
            if state.unwritten:
                log.error("%d usage writes could not be made before the stop (the store is down); see the "
                          "warnings above for each", len(state.unwritten))
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
        totals, records = await asyncio.gather(
            asyncio.to_thread(state.usage.totals, key_id, since, until),
            asyncio.to_thread(state.usage.records, key_id, since, until, limit),
        )
        return JSONResponse({"object": "usage", "since": since, "until": until, "totals": totals,
                             "records": records})

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await realtime_session(ws, ws.app.state.proxy)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; see the proxy log", code="internal_error", type="server_error")

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def forward(request: Request, path: str) -> Response:
        return await forward_request(request)

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


async def body_chunks(request: Request, timeout: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that sends nothing for ``timeout`` seconds (a slow
    upload holding a slot: slowloris) gets a 408."""
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body stalled: nothing arrived for {timeout:g} s (BODY_READ_TIMEOUT)",
                           code="request_timeout") from None
        yield chunk


async def spool_body(request: Request, cap: int, timeout: float = 30.0,
                     spool: bool = False) -> tuple[Any, int, str | None]:
    """Returns (body to forward, its length, temp path to delete).

    With Content-Length the body streams straight through (checked against the cap first), unless
    ``spool``. A chunked body, or any body with ``spool`` (several bridges: the body is read for
    its model and may be sent to a second bridge), is spooled to a temporary file while counting,
    so an oversized one is refused before anything reaches a bridge."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"request body larger than {cap // (1024 * 1024)} MiB", code="file_too_large",
                         param="file", should_retry=False)
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise APIError(400, "invalid Content-Length", code="invalid_request") from None
        if length > cap:
            raise too_large

    if declared is not None and not spool:

        async def counted() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in body_chunks(request, timeout):
                seen += len(chunk)
                if seen > cap:
                    raise too_large
                yield chunk

        return counted(), length, None
    if request.method in ("GET", "DELETE") and declared is None:
        return b"", 0, None
    tmp = tempfile.NamedTemporaryFile(prefix="auth-upload-", delete=False)
    size = 0
    try:
        async for chunk in body_chunks(request, timeout):
            size += len(chunk)
            if size > cap:
                raise too_large
            await asyncio.to_thread(tmp.write, chunk)
        tmp.close()
    except BaseException:
        tmp.close()
        import os

        os.unlink(tmp.name)
        raise
    return file_chunks(tmp.name), size, tmp.name


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
        record_usage(state, UsageRecord(request_id=request_id, key_id=key.id, key_name=key.name, model="",
                                        route=path, status=exc.status, audio_seconds=0.0,
                                        latency_ms=(time.monotonic() - started) * 1000, created=time.time()))
        raise
    except Exception:  # the quota could not be read: the store is down
        raise usage_unavailable() from None
    # Metered before it is served: a request the store cannot record is refused, never served free.
    pending = UsageRecord(request_id=request_id, key_id=key.id, key_name=key.name, model="", route=path, status=0,
                          audio_seconds=0.0, latency_ms=0.0, created=time.time())
    rows: list[int] = []
    if not write_usage(state, lambda: rows.append(state.usage.begin(pending)), pending):
        raise usage_unavailable()
    row = rows[0]
    state.in_flight += 1
    state.metrics.in_flight.inc()
    released = False
    spooled: str | None = None
    chosen: Bridge | None = None  # with several bridges: the one serving this request

    def finish(status: int, audio_seconds: float, model: str) -> None:
        nonlocal released
        if released:
            return
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
        latency_ms = (time.monotonic() - started) * 1000

        def complete() -> None:
            state.usage.complete(row, status=status, model=model, audio_seconds=audio_seconds, latency_ms=latency_ms)

        # Synchronous: a cancelled task cannot await. If the store refuses it now, kept for later.
        if state.unwritten or not write_usage(state, complete, pending):
            state.unwritten.append(complete)

    try:
        body, length, spooled = await spool_body(request, settings.max_upload_bytes + 64 * 1024,
                                                 settings.body_read_timeout, spool=state.pool is not None)
        # The path as the client encoded it (the checks above read it decoded): "%2F" stays one
        # segment, and bytes that are no URL's are never re-encoded into something else.
        raw_path = request.scope.get("raw_path") or path.encode()
        try:
            target = httpx.URL(raw_path.decode("latin-1"))
        except httpx.InvalidURL:
            raise APIError(400, "the request path is not a valid URL path", code="invalid_request") from None

        def build(client: httpx.AsyncClient, content: Any) -> httpx.Request:
            return client.build_request(
                request.method, target, params=request.query_params,
                headers=upstream_headers(request.headers.items(), request_id,
                                         length if request.method != "GET" else None),
                content=content if request.method != "GET" else None,
            )

        if state.pool is None:
            upstream = await state.client.send(build(state.client, body), stream=True)
        else:
            local = await answer_from_pool(state.pool, request, path, spooled, request_id)
            if local is not None:
                finish(local.status_code, 0.0, "")
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
        finish(exc.status, 0.0, "")
        raise
    except httpx.HTTPError as exc:
        finish(503, 0.0, "")
        state.metrics.bridge_errors.labels("unreachable").inc()
        log.warning("bridge unreachable: %r", exc)
        return error_response(503, "the transcription service is not reachable; retry shortly",
                              code="bridge_unavailable", type="server_error", retry_after=5)
    except BaseException:
        finish(499, 0.0, "")
        raise

    headers = downstream_headers(upstream.headers)
    headers.update(limit_headers)
    is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
    scanner = SSEUsageScanner() if is_sse else None

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
            seconds = scanner.audio_seconds if scanner is not None else None
            if seconds is None:
                try:
                    seconds = float(upstream.headers.get("x-audio-seconds", "0"))
                except ValueError:
                    seconds = 0.0
            # Committed before the response ends, synchronously: a cancelled task cannot await.
            finish(status, seconds or 0.0, upstream.headers.get("x-model-id", ""))
            await asyncio.shield(upstream.aclose())

    async def never_started() -> None:
        # Runs after the response in every case; matters only when the client left before the
        # body was iterated (then relay's finally never ran): record it and free the slot.
        if not released:
            finish(499, 0.0, upstream.headers.get("x-model-id", ""))
            await upstream.aclose()

    return StreamingResponse(relay(), status_code=upstream.status_code, headers=headers,
                             media_type=upstream.headers.get("content-type"),
                             background=BackgroundTask(never_started))
