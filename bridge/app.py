"""The bridge's FastAPI app: state built in the lifespan, routes in ``bridge.routes``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.config import BridgeSettings
from bridge.decoding.pyav_decoder import DecoderPool
from bridge.guard import GuardLimits, PieceGuard
from bridge.languages import DETECTOR
from bridge.metrics import ROUTES, BridgeMetrics
from bridge.models.catalog import Catalog
from bridge.models.engine_factory import create_engine
from bridge.models.engine_manager import EngineFactory, EngineManager
from bridge.models.model_store import ModelStore
from bridge.ports import EngineUnavailable
from bridge.routes import health, models, realtime, transcriptions
from bridge.scheduler import FairScheduler
from bridge.state import BridgeState
from bridge.vad import SpeechDetector, find_vad_model
from common.access import AccessMiddleware, serve_metrics
from common.errors import APIError, error_response, validation_error_response
from common.openapi import document_bridge
from common.serving import WatchedSend

log = logging.getLogger("bridge")

MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers around the file


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for bodies over the cap, before they are read into anything: by Content-Length when
    given, else by counting what arrives (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = error_response(
            413, f"request body larger than {self.max_bytes // (1024 * 1024)} MiB",
            code="file_too_large", param="file", should_retry=False)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await too_large(scope, receive, send)
                    return
        body, answer = CountedReceive(receive, self.max_bytes), WatchedSend(send)
        try:
            await self.app(scope, body.receive, answer.send)
        except BodyTooLarge:
            if not answer.started:  # once the answer has started, no 413 can be sent
                await too_large(scope, receive, send)


class CountedReceive:
    """An ASGI ``receive`` that counts one request's body as the app reads it: ``BodyTooLarge``
    past ``max_bytes``."""

    def __init__(self, receive: Receive, max_bytes: int) -> None:
        self._receive, self.max_bytes = receive, max_bytes
        self.received = 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                raise BodyTooLarge()
        return message


def create_app(settings: BridgeSettings, *, factory: EngineFactory = create_engine) -> FastAPI:
    """The bridge: its state opened at start (the model loaded before it is ready) and closed at
    stop, its routes (``bridge.routes``), error handlers, body limit and access log."""
    metrics = BridgeMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop_metrics = serve_metrics(metrics.registry, settings.bridge_metrics_host or settings.bridge_host,
                                     settings.bridge_metrics_port, "BRIDGE_METRICS_PORT")
        app.state.bridge = state = await open_state(settings, metrics, factory)
        try:
            await load_default_model(state)
            yield
        finally:
            await close_state(state)
            if stop_metrics is not None:
                stop_metrics()
            log.info("bridge stopped")

    app = FastAPI(title="mvp-bridge", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible speech-to-text over sherpa-onnx")
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(transcriptions.router)
    app.include_router(realtime.router)

    def openapi() -> dict[str, Any]:
        # The routes read their bodies by hand; the contract (common.openapi) documents them.
        if app.openapi_schema is None:
            app.openapi_schema = document_bridge(get_openapi(title=app.title, version=app.version,
                                                             description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.to_response()

    @app.exception_handler(EngineUnavailable)
    async def _engine_unavailable(request: Request, exc: EngineUnavailable) -> Response:
        return error_response(503, f"the engine is not available: {exc}", code="engine_unavailable",
                              type="server_error", retry_after=exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return validation_error_response(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                              headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; see the bridge log", code="internal_error")

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(AccessMiddleware, logger="bridge.access", routes=ROUTES, observe=metrics.observe_request)
    metrics.watch(lambda: getattr(app.state, "bridge", None))
    return app


async def open_state(settings: BridgeSettings, metrics: BridgeMetrics, factory: EngineFactory) -> BridgeState:
    """What the bridge holds while it runs: the catalog and model store, the engine manager, the
    fair scheduler, the speech detectors, the decoder workers and the piece guard."""
    catalog = Catalog.load(settings.catalog_file)
    if settings.default_model not in catalog:
        raise RuntimeError(f"invalid setting DEFAULT_MODEL={settings.default_model!r}: not in the catalog "
                           f"({', '.join(s.id for s in catalog.all())})")
    store = ModelStore(settings.models_dir)
    log.info("engine tuning: %d connections (pieces in flight), %d threads per model run, %d engine work "
             "threads, provider %s", settings.engine_connections, settings.sherpa_num_threads,
             settings.sherpa_num_work_threads, settings.sherpa_provider)
    detector, live_detector = speech_detectors(settings)
    guard = None
    if settings.guard_pieces:
        guard = PieceGuard(GuardLimits(settings.guard_max_words_per_second, settings.guard_max_compression_ratio,
                                       settings.guard_min_words_per_speech_second,
                                       settings.guard_min_piece_seconds), detector)
    return BridgeState(settings=settings, catalog=catalog, store=store,
                       engines=EngineManager(settings, catalog, store, factory, metrics),
                       scheduler=FairScheduler(settings.engine_connections), metrics=metrics, detector=detector,
                       live_detector=live_detector, decoders=await start_decoders(settings), guard=guard)


def speech_detectors(settings: BridgeSettings) -> tuple[SpeechDetector | None, SpeechDetector | None]:
    """Silero for uploads (at ``VAD_SAMPLE_RATE``) and for live turns (always 16 kHz: bridge.state);
    none without its model."""
    vad_model = find_vad_model(settings.vad_model)
    if vad_model is None:
        log.warning("no Silero VAD model (VAD_MODEL, or pip install --no-deps silero-vad): long audio is "
                    "cut by energy only")
        return None, None
    detector = SpeechDetector(vad_model, rate=settings.vad_sample_rate)
    live = detector if settings.vad_sample_rate == 16000 else SpeechDetector(vad_model, rate=16000)
    return detector, live


async def start_decoders(settings: BridgeSettings) -> DecoderPool | None:
    """The PyAV decoder workers (``AUDIO_DECODER=pyav``); None: one ffmpeg process per request."""
    if settings.audio_decoder != "pyav":
        log.info("audio decoder: one ffmpeg process per request")
        return None
    decoders = DecoderPool(settings.decoder_workers, settings.decoder_memory_mb)
    await decoders.start()
    log.info("audio decoder: %d PyAV worker processes (pids %s)", decoders.size, " ".join(map(str, decoders.pids)))
    return decoders


async def load_default_model(state: BridgeState) -> None:
    """Load ``DEFAULT_MODEL`` (the bridge is ready once it answered), and the answers' language
    detector (bridge.languages) when that model speaks several languages, rather than on a request."""
    settings = state.settings
    load_seconds = await state.engines.load_initial(settings.default_model)
    state.ready_after = time.monotonic() - state.started_at
    log.info("bridge ready: model %s loaded in %.2f s", settings.default_model, load_seconds)
    if len(state.catalog.get(settings.default_model).languages) > 1:
        await asyncio.to_thread(DETECTOR.load)


async def close_state(state: BridgeState) -> None:
    await state.scheduler.close()
    await state.engines.close()
    if state.decoders is not None:
        await state.decoders.close()
