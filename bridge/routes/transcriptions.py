"""POST /v1/audio/transcriptions (and /v1/audio/translations): route -> decode -> cut -> engine ->
format -> respond."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
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

from bridge.api_types import parse_transcription_form, parse_translation_form
from bridge.audio import AudioDecodeError, AudioStream, AudioTimeout, AudioTooLong, ffmpeg_decode
from bridge.formats import render, usage
from bridge.ports import EngineModel, EngineRejected, EngineUnavailable, ModelEngine
from bridge.state import BridgeState, get_state
from bridge.tokens import logprob_entries, token_ids
from bridge.transcript import build_transcript, scored_tokens
from bridge.transcription import Prefetch, SpeechMap, cut_pieces, iter_pieces
from common.access import AccessRecord, access_record
from common.errors import APIError

router = APIRouter()


def check_model(requested: str, loaded: EngineModel, state: BridgeState) -> None:
    """The model a client names must be the loaded one (or an alias of it): never a silent answer
    from another model."""
    if not requested or requested == loaded.id or requested in state.settings.model_aliases:
        return
    switch_hint = f"load it first with POST /v1/models/switch {{\"model_id\": \"{requested}\"}}"
    if requested in state.catalog and not state.store.is_ready(state.catalog.get(requested)):
        # Switching to it would answer 409 (not downloaded): say the step that comes first.
        switch_hint = (f"download it first (python -m bridge models download {requested}; in Docker: docker compose "
                       f"exec mvp-bridge python -m bridge models download {requested}), then {switch_hint}")
    if requested in state.catalog:
        raise APIError(400, f"model {requested!r} is not loaded; the loaded model is {loaded.id!r}. "
                       f"Use {loaded.id!r} (or one of its aliases), or {switch_hint}.",
                       param="model", code="model_not_loaded")
    raise APIError(404, f"model {requested!r} does not exist; the loaded model is {loaded.id!r} "
                   "(see GET /v1/models)", param="model", code="model_not_found")


def check_translates(requested: str, loaded: EngineModel, state: BridgeState) -> None:
    """A translation needs a model that translates (the catalog says which): never a transcription
    in the source language returned as if it were English."""
    model_id = requested if requested in state.catalog else loaded.id
    if model_id in state.catalog and state.catalog.get(model_id).translates:
        return
    able = [m.id for m in state.catalog.all() if m.translates]
    raise APIError(400, f"model {model_id} cannot translate speech into English; "
                   + (f"models that can: {', '.join(able)}" if able else
                      "no model in this server's catalog translates. Transcribe in the spoken language "
                      "with POST /v1/audio/transcriptions instead"),
                   param="model", code="model_cannot_translate")


def check_logprobs(wanted: bool, spec: EngineModel, state: BridgeState) -> None:
    """``include[]=logprobs`` needs a model whose engine scores its tokens: never an empty list."""
    if wanted and not spec.token_logprobs:
        able = [m.id for m in state.catalog.all() if m.token_logprobs]
        raise APIError(400, f"model {spec.id} gives no token log-probabilities, so include[]=logprobs cannot be "
                       f"answered; models that give them: {', '.join(able) or 'none in this catalog'}",
                       param="include[]", code="unsupported_include")


def check_language(language: str | None, spec: EngineModel) -> str:
    if language is None:
        return spec.languages[0] if len(spec.languages) == 1 else ""
    if language not in spec.languages:
        raise APIError(400, f"model {spec.id} does not support language {language!r}; "
                       f"it supports: {', '.join(spec.languages)}", param="language",
                       code="unsupported_language")
    return language


async def start_decode(upload: UploadFile, state: BridgeState, folder: Path) -> tuple[AudioStream, asyncio.Task[None]]:
    """Save the upload and start decoding it: the stream fills while the caller goes on."""
    path = folder / "upload"
    with path.open("wb") as out:
        await asyncio.to_thread(shutil.copyfileobj, upload.file, out, 1 << 20)
    if path.stat().st_size == 0:
        raise APIError(400, "the uploaded file is empty", param="file", code="empty_file")
    settings = state.settings
    stream = AudioStream(settings.sherpa_max_utterance)
    if state.decoders is not None:
        decoding = state.decoders.decode(path, stream, timeout=settings.decode_timeout)
    else:
        decoding = ffmpeg_decode(path, stream, timeout=settings.decode_timeout, binary=settings.ffmpeg_binary)
    task = asyncio.create_task(decoding)
    stream.on_abort(functools.partial(_cancel, task))
    return stream, task


TIMED_FORMATS = ("srt", "vtt", "verbose_json")


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def decode_error(exc: Exception) -> APIError:
    if isinstance(exc, AudioTooLong):
        return APIError(400, f"{exc}; cut it into shorter files (SHERPA_MAX_UTTERANCE)", param="file",
                        code="audio_too_long")
    if isinstance(exc, AudioDecodeError):
        return APIError(400, f"{exc}. Send audio or video with an audio track (wav, flac, mp3, ogg/opus, webm, "
                        "m4a, mp4, ...)", param="file", code="invalid_audio")
    if isinstance(exc, AudioTimeout):
        return APIError(400, f"{exc}", param="file", code="decode_timeout")
    raise exc


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
    return await answer(request, state, "transcribe")


@router.post("/v1/audio/translations")
async def create_translation(request: Request, state: BridgeState = Depends(get_state)) -> Response:
    return await answer(request, state, "translate")


async def answer(request: Request, state: BridgeState, task: str) -> Response:
    if state.in_flight >= state.settings.max_concurrent_requests:
        raise APIError(503, "the server is busy; retry shortly", code="overloaded", type="server_error",
                       retry_after=2)
    state.in_flight += 1
    started = time.monotonic()
    record = access_record(request)
    try:
        try:
            form = await request.form(max_files=1, max_fields=32, max_part_size=64 * 1024)
        except MultiPartException as exc:
            raise APIError(400, f"malformed multipart body: {exc.message}", code="invalid_multipart") from None
        stack = contextlib.AsyncExitStack()
        try:
            parse = parse_translation_form if task == "translate" else parse_transcription_form
            upload, params = parse(form)
            # The lease pins the engine this request is checked against and answered by, even if
            # the model is switched meanwhile (the old engine finishes its leases, then closes).
            engine = await stack.enter_async_context(state.engines.lease())
            record.model = engine.spec.id
            if task == "translate":
                check_translates(params.model, engine.spec, state)
            check_model(params.model, engine.spec, state)
            language = check_language(params.language, engine.spec)
            check_logprobs(params.logprobs, engine.spec, state)
            folder = Path(tempfile.mkdtemp(prefix="bridge-upload-"))
            try:
                decode_started = time.monotonic()
                audio, decoding = await start_decode(upload, state, folder)
                # Decoding, cutting and the engine overlap: the first pieces are transcribed while the
                # rest of the file is still decoded and scanned. The answer's status waits for the
                # decode (a file that turns out too long or corrupt is a 400, its pieces cancelled).
                first = state.settings.stream_first_piece_seconds if params.stream else None
                # What the VAD finds while cutting is kept for cue times and segment scores.
                speech = SpeechMap(state.detector, audio, params.chunking) if state.detector is not None else None
                plan = cut_pieces(audio, engine.spec.max_piece_seconds, state.detector,
                                  state.settings.piece_target_seconds, first or None,
                                  vad_threads=state.settings.vad_threads, chunking=params.chunking, speech=speech)
                pieces = Prefetch(iter_pieces(state.scheduler, engine, audio, plan, state.guard))
                try:
                    await audio.wait_done()
                    state.metrics.decode_seconds.observe(time.monotonic() - decode_started)
                except BaseException as exc:
                    audio.abort()
                    await pieces.aclose()
                    if isinstance(exc, Exception):
                        raise decode_error(exc) from None
                    raise
                finally:
                    with contextlib.suppress(BaseException):
                        await decoding
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            stack.push_async_callback(pieces.aclose)
        except BaseException:
            await stack.aclose()
            raise
        finally:
            await form.close()
        if params.stream:
            return StreamingResponse(
                stream_events(state, engine, audio, pieces, stack, record, started, params.logprobs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "x-model-id": engine.spec.id},
                background=BackgroundTask(stack.aclose),
            )
        async with stack:
            try:
                results = [piece async for piece in pieces]
            except (EngineUnavailable, EngineRejected) as exc:
                raise engine_error(exc) from None
            # The speech spans cut pieces without token times into cues (srt, vtt, verbose_json) and
            # score verbose_json's segments (no_speech_prob); a file that went whole is scanned
            # then, once: off the loop.
            timed = params.response_format == "verbose_json" or (
                params.response_format in TIMED_FORMATS and not engine.spec.token_timestamps)
            transcript = await asyncio.to_thread(build_transcript, results, audio.seconds,
                                                 engine.spec.token_timestamps,
                                                 speech.spans if timed and speech is not None else None)
        model_id = engine.spec.id
        elapsed = time.monotonic() - started
        record.audio_seconds = audio.seconds
        state.metrics.observe_transcription(model_id, audio.seconds, elapsed)
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
                      want_words=want_words, headers=headers, logprobs=params.logprobs,
                      token_ids=functools.partial(token_ids, engine.spec), task=task)
    finally:
        state.in_flight -= 1


def _sse(event: dict[str, object]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


async def stream_events(state: BridgeState, engine: ModelEngine, audio: AudioStream, pieces: Prefetch,
                        lease: contextlib.AsyncExitStack, record: AccessRecord,
                        started: float, logprobs: bool = False) -> AsyncIterator[bytes]:
    """One ``transcript.text.delta`` per piece, in order, then ``transcript.text.done``; with
    ``logprobs`` each carries its tokens' log-probabilities (the done event all of them).

    When the client goes away Starlette cancels this generator; leaving it cancels the pieces
    that have not run (``Prefetch.aclose``)."""
    texts: list[str] = []
    scored: list[tuple[str, float]] = []
    async with lease:
        try:
            async for _start, _end, result in pieces:
                if result is None or not result.text:
                    continue
                delta = result.text if not texts else " " + result.text
                texts.append(result.text)
                event: dict[str, object] = {"type": "transcript.text.delta", "delta": delta}
                if logprobs:
                    pairs = scored_tokens(result)
                    scored += pairs
                    event["logprobs"] = logprob_entries(pairs)
                yield _sse(event)
        except (EngineUnavailable, EngineRejected) as exc:
            err = engine_error(exc)
            record.status = err.status  # the stream's 200 was sent already; the log says what happened
            yield _sse({"type": "error", "error": {"message": err.message, "type": err.type, "code": err.code}})
            return
    record.audio_seconds = audio.seconds
    state.metrics.observe_transcription(engine.spec.id, audio.seconds, time.monotonic() - started)
    done: dict[str, object] = {"type": "transcript.text.done", "text": " ".join(texts)}
    if logprobs:
        done["logprobs"] = logprob_entries(scored)
    yield _sse({**done, "usage": usage(audio.seconds)})
