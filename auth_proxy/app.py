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

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from auth_proxy.bridges import BridgePool
from auth_proxy.config import ProxySettings
from auth_proxy.keys import KeyStore
from auth_proxy.limiter import Limiter, redact
from auth_proxy.metering import UsageWriter, export_loop, retry_loop
from auth_proxy.metrics import ROUTES, ProxyMetrics
from auth_proxy.routes import STATIC, add_routes
from auth_proxy.state import ProxyState
from auth_proxy.usage_store import UsageStore
from common.access import AccessMiddleware, serve_metrics
from common.errors import APIError, error_response, validation_error_response
from common.serving import KEEP_ALIVE_SECONDS

log = logging.getLogger("auth_proxy")

mimetypes.add_type("text/javascript", ".mjs")  # module scripts need a JavaScript type (not every Python knows .mjs)


def create_app(settings: ProxySettings) -> FastAPI:
    """The proxy: its state opened at start and closed at stop, its error handlers, its routes
    (``auth_proxy.routes``), CORS and the access log."""
    metrics = ProxyMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop_metrics = serve_metrics(metrics.registry, settings.auth_metrics_host or settings.auth_host,
                                     settings.auth_metrics_port, "AUTH_METRICS_PORT")
        app.state.proxy = state = await open_state(settings, metrics)
        try:
            yield
        finally:
            await close_state(state)
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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; see the proxy log", code="internal_error", type="server_error")

    add_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

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


async def open_state(settings: ProxySettings, metrics: ProxyMetrics) -> ProxyState:
    """What the proxy holds while it runs: keys, the usage store (a start that cannot open it fails,
    saying why), the bridges' clients, the limiter, and the usage store's background tasks."""
    keys = KeyStore(settings.api_keys_file)
    if len(keys) == 0:
        log.warning("no API keys in %s: every request will get 401. Create one with: "
                    "python -m auth_proxy keys add NAME", settings.api_keys_file)
    try:
        usage = UsageStore(settings.usage_db)
    except Exception as exc:  # a read-only or missing disk, PostgreSQL down or refusing: say which
        raise RuntimeError(f"cannot open the usage store (USAGE_DB={redact(settings.usage_db)}): "
                           f"{exc.__class__.__name__}: {exc}") from exc
    limiter = Limiter(settings.rate_limit_storage, on_fallback=metrics.limits_local.set)
    writer = UsageWriter(usage, metrics)
    state = ProxyState(settings, keys, usage, writer, bridge_client(settings, settings.bridge_url), limiter, metrics)
    if settings.bridge_urls:
        state.pool = BridgePool(settings.bridge_urls, poll_seconds=settings.bridge_poll_seconds,
                                make_client=lambda url: bridge_client(settings, url))
        await state.pool.start()
    if settings.usage_json is not None:
        state.export_task = asyncio.create_task(export_loop(writer, settings.usage_json))
    state.retry_task = asyncio.create_task(retry_loop(writer))
    log.info("proxy ready: forwarding to %s, %d key(s), usage in %s, rate limits in %s",
             ", ".join(settings.bridge_urls) if settings.bridge_urls else settings.bridge_url, len(keys),
             "PostgreSQL" if usage.postgres else settings.usage_db, redact(settings.rate_limit_storage))
    return state


def bridge_client(settings: ProxySettings, url: str) -> httpx.AsyncClient:
    """The proxy's connections to one bridge. An idle one is let go well before the bridge closes
    it (``KEEP_ALIVE_SECONDS``): with both at 5 s, a request sent on a connection the bridge is
    closing fails with "server disconnected", and an upload streamed on cannot be sent again, so
    the caller gets a 503 (the likely cause of one 503 in a load test)."""
    return httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(connect=5.0, read=settings.bridge_timeout, write=60.0, pool=10.0),
        limits=httpx.Limits(max_connections=settings.max_in_flight + 8,
                            max_keepalive_connections=settings.max_in_flight,
                            keepalive_expiry=KEEP_ALIVE_SECONDS / 2),
    )


async def close_state(state: ProxyState) -> None:
    """Stop the background tasks, let the requests the stop cut off write their outcome, close
    the clients and the usage store (exported last when ``USAGE_JSON`` is set)."""
    if state.export_task is not None:
        state.export_task.cancel()
    if state.retry_task is not None:
        state.retry_task.cancel()
    # Requests the stop cut off unwind after this starts: each frees its slot and asks for
    # its outcome to be written. Wait a moment for them, so that their writes are drained.
    deadline = time.monotonic() + 5
    while state.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await state.client.aclose()
    if state.pool is not None:
        await state.pool.close()
    state.writer.close()
    if state.settings.usage_json is not None:
        state.usage.export_json(state.settings.usage_json)
    state.usage.close()
