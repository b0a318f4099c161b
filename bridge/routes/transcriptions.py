"""POST /v1/audio/transcriptions: route -> decode -> cut -> engine -> format -> respond."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from bridge.api_types import parse_transcription_form
from bridge.audio import AudioDecodeError, AudioTooLong, DecodedAudio, decode_to_pcm16k
from bridge.catalog import ModelSpec
from bridge.errors import APIError
from bridge.formats import render, usage
from bridge.ports import EngineRejected, EngineUnavailable, ModelEngine
from bridge.state import BridgeState, get_state
from bridge.transcription import Plan, cut_pieces, iter_pieces, transcribe

router = APIRouter()
log = logging.getLogger("bridge.api")


def check_model(requested: str, loaded: ModelSpec, state: BridgeState) -> None:
    """The model a client names must be the loaded one (or an alias of it): never a silent answer
    from another model."""
    if not requested or requested == loaded.id or requested in state.settings.model_aliases:
        return
    switch_hint = f"load it first with POST /v1/models/switch {{\"model_id\": \"{requested}\"}}"
    if requested in state.catalog:
        raise APIError(400, f"model {requested!r} is not loaded; the loaded model is {loaded.id!r}. "
                       f"Use {loaded.id!r} (or one of its aliases), or {switch_hint}.",
                       param="model", code="model_not_loaded")
    raise APIError(404, f"model {requested!r} does not exist; the loaded model is {loaded.id!r} "
                   "(see GET /v1/models)", param="model", code="model_not_found")


def check_language(language: str | None, spec: ModelSpec) -> str:
    if language is None:
        return spec.languages[0] if len(spec.languages) == 1 else ""
    if language not in spec.languages:
        raise APIError(400, f"model {spec.id} does not support language {language!r}; "
                       f"it supports: {', '.join(spec.languages)}", param="language",
                       code="unsupported_language")
    return language


async def decode_upload(upload: UploadFile, state: BridgeState) -> DecodedAudio:
    with tempfile.TemporaryDirectory(prefix="bridge-upload-") as tmp:
        path = Path(tmp) / "upload"
        with path.open("wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, upload.file, out, 1 << 20)
        if path.stat().st_size == 0:
            raise APIError(400, "the uploaded file is empty", param="file", code="empty_file")
        try:
            return await decode_to_pcm16k(path, max_seconds=state.settings.sherpa_max_utterance,
                                          timeout=state.settings.ffmpeg_timeout,
                                          binary=state.settings.ffmpeg_binary)
        except AudioTooLong as exc:
            raise APIError(400, f"{exc}; cut it into shorter files (SHERPA_MAX_UTTERANCE)", param="file",
                           code="audio_too_long") from None
        except AudioDecodeError as exc:
            raise APIError(400, f"{exc}. Send audio or video with an audio track (wav, flac, mp3, "
                           "ogg/opus, webm, m4a, mp4, ...)", param="file", code="invalid_audio") from None
        except asyncio.TimeoutError:
            raise APIError(400, f"decoding took longer than {state.settings.ffmpeg_timeout:.0f} s",
                           param="file", code="decode_timeout") from None


def engine_error(exc: Exception) -> APIError:
    if isinstance(exc, EngineUnavailable):
        return APIError(503, f"the engine is not available: {exc}", code="engine_unavailable",
                        type="server_error", retry_after=exc.retry_after)
    if isinstance(exc, EngineRejected):
        return APIError(500, f"the engine could not transcribe this audio: {exc}", code="engine_error",
                        type="server_error", should_retry=False)
    raise exc


@router.post("/v1/audio/transcriptions")
async def create_transcription(request: Request, state: BridgeState = Depends(get_state)) -> Response:
    if state.in_flight >= state.settings.max_concurrent_requests:
        raise APIError(503, "the server is busy; retry shortly", code="overloaded", type="server_error",
                       retry_after=2)
    state.in_flight += 1
    started = time.monotonic()
    try:
        try:
            form = await request.form(max_files=1, max_fields=32, max_part_size=64 * 1024)
        except MultiPartException as exc:
            raise APIError(400, f"malformed multipart body: {exc.message}", code="invalid_multipart") from None
        stack = contextlib.AsyncExitStack()
        try:
            upload, params = parse_transcription_form(form)
            # The lease pins the engine this request is checked against and answered by, even if
            # the model is switched meanwhile (the old engine finishes its leases, then closes).
            engine = await stack.enter_async_context(state.engines.lease())
            check_model(params.model, engine.spec, state)
            language = check_language(params.language, engine.spec)
            audio = await decode_upload(upload, state)
        except BaseException:
            await stack.aclose()
            raise
        finally:
            await form.close()
        # Pieces are found while the engine already works on the first ones (``cut_pieces``).
        plan = cut_pieces(audio.samples, engine.spec.max_piece_seconds, state.detector,
                          state.settings.piece_target_seconds)
        if params.stream:
            return StreamingResponse(
                stream_events(state, engine, audio, plan, stack),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "x-model-id": engine.spec.id},
                background=BackgroundTask(stack.aclose),
            )
        async with stack:
            try:
                transcript = await transcribe(state.scheduler, engine, audio.samples, plan)
            except (EngineUnavailable, EngineRejected) as exc:
                raise engine_error(exc) from None
        model_id = engine.spec.id
        elapsed = time.monotonic() - started
        log.info("transcribed %.2f s of audio with %s in %.3f s (%s)", audio.seconds, model_id, elapsed,
                 params.response_format)
        headers = {
            "x-model-id": model_id,
            "x-audio-seconds": f"{audio.seconds:.3f}",
            "x-processing-ms": str(int(elapsed * 1000)),
        }
        want_words = "word" in params.timestamp_granularities
        if want_words and not engine.spec.token_timestamps:
            headers["x-warning"] = (f"model {model_id} gives no token times: word timestamps are not available "
                                    "(segments only)")
        return render(transcript, params.response_format, language=language or transcript.language,
                      want_words=want_words, headers=headers)
    finally:
        state.in_flight -= 1


def _sse(event: dict[str, object]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


async def stream_events(state: BridgeState, engine: ModelEngine, audio: DecodedAudio,
                        plan: Plan, lease: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
    """One ``transcript.text.delta`` per piece, in order, then ``transcript.text.done``.

    When the client goes away Starlette cancels this generator; leaving it cancels the pieces
    that have not run (``iter_pieces``)."""
    texts: list[str] = []
    async with lease:
        try:
            async for _start, _end, result in iter_pieces(state.scheduler, engine, audio.samples, plan):
                if result is None or not result.text:
                    continue
                delta = result.text if not texts else " " + result.text
                texts.append(result.text)
                yield _sse({"type": "transcript.text.delta", "delta": delta})
        except (EngineUnavailable, EngineRejected) as exc:
            err = engine_error(exc)
            yield _sse({"type": "error", "error": {"message": err.message, "type": err.type, "code": err.code}})
            return
    yield _sse({"type": "transcript.text.done", "text": " ".join(texts), "usage": usage(audio.seconds)})
