"""POST /v1/audio/transcriptions (and /v1/audio/translations): route -> decode -> cut -> engine ->
format -> respond."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import functools
import json
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from starlette.background import BackgroundTask
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from bridge.api_types import (
    MAX_KEYWORDS,
    MAX_LANGUAGES,
    TranscriptionParams,
    parse_transcription_form,
    parse_translation_form,
)
from bridge.audio import AudioDecodeError, AudioStorageFull, AudioStream, AudioTimeout, AudioTooLong, ffmpeg_decode
from bridge.diarization import MAX_KNOWN_SPEAKERS, REFERENCE_SECONDS, Diarizer, Turn, split_by_speaker, turn_pieces
from bridge.formats import diarized_segment, render, segment_id, usage
from bridge.languages import languages_heard
from bridge.ports import SAMPLE_RATE, EngineModel, EngineRejected, EngineUnavailable, ModelEngine
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
    settings = state.settings
    if not requested or requested == loaded.id or requested in (*settings.model_aliases, *settings.diarize_aliases):
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
    able = [m.id for m in state.catalog.transcription_models() if m.translates]
    raise APIError(400, f"model {model_id} cannot translate speech into English; "
                   + (f"models that can: {', '.join(able)}" if able else
                      "no model in this server's catalog translates. Transcribe in the spoken language "
                      "with POST /v1/audio/transcriptions instead"),
                   param="model", code="model_cannot_translate")


def check_logprobs(wanted: bool, spec: EngineModel, state: BridgeState) -> None:
    """``include[]=logprobs`` needs a model whose engine scores its tokens: never an empty list."""
    if wanted and not spec.token_logprobs:
        able = [m.id for m in state.catalog.transcription_models() if m.token_logprobs]
        raise APIError(400, f"model {spec.id} gives no token log-probabilities, so include[]=logprobs cannot be "
                       f"answered; models that give them: {', '.join(able) or 'none in this catalog'}",
                       param="include[]", code="unsupported_include")


def check_languages(languages: list[str], spec: EngineModel, state: BridgeState) -> None:
    """``languages[]`` are the languages the audio may be in: the loaded model must speak at least one
    of them, else the answer would be in a language nobody asked for."""
    if not languages or set(languages) & set(spec.languages):
        return
    able = [m.id for m in state.catalog.transcription_models() if set(languages) & set(m.languages)]
    raise APIError(400, f"model {spec.id} speaks none of languages[] ({', '.join(languages)}); it speaks: "
                   f"{', '.join(spec.languages)}. "
                   + (f"Models in this catalog that speak {', '.join(languages)}: {', '.join(able)} (load one with "
                      "POST /v1/models/switch)" if able else "No model in this catalog speaks them"),
                   param="languages[]", code="unsupported_language")


def keywords_for(keywords: list[str], spec: EngineModel, warnings: list[str]) -> tuple[str, ...]:
    """The keywords the engine will apply: all of them where the model can use keywords; none
    otherwise, with a warning (they are hints, as OpenAI calls them: never an error)."""
    if keywords and not spec.keywords:
        warnings.append(f"keywords were not applied: model {spec.id} cannot bias its decoding towards keywords "
                        "(transducer models such as parakeet can)")
        return ()
    return tuple(keywords)


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
    try:
        with path.open("wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, upload.file, out, 1 << 20)
    except OSError as exc:
        raise storage_error(exc) from None
    if path.stat().st_size == 0:
        raise APIError(400, "the uploaded file is empty", param="file", code="empty_file")
    stream = AudioStream(state.settings.sherpa_max_utterance)
    task = asyncio.create_task(decode_into(state, path, stream))
    stream.on_abort(functools.partial(_cancel, task))
    return stream, task


def decode_into(state: BridgeState, path: Path, stream: AudioStream) -> Coroutine[Any, Any, None]:
    """Decode the file at ``path`` into ``stream`` with the bridge's decoder (AUDIO_DECODER)."""
    settings = state.settings
    if state.decoders is not None:
        return state.decoders.decode(path, stream, timeout=settings.decode_timeout)
    return ffmpeg_decode(path, stream, timeout=settings.decode_timeout, binary=settings.ffmpeg_binary)


TIMED_FORMATS = ("srt", "vtt", "verbose_json")


def check_diarize(params: TranscriptionParams, state: BridgeState) -> Diarizer | None:
    """The diarizer when the request asks for speakers (``model`` a diarize alias), after
    refusing what OpenAI refuses with that model; None otherwise."""
    diarize = params.model in state.settings.diarize_aliases
    if not diarize:
        if params.response_format == "diarized_json" or params.known_speaker_names or params.known_speaker_references:
            param = "response_format" if params.response_format == "diarized_json" else "known_speaker_names[]"
            raise APIError(400, f"speakers need model={state.settings.diarize_aliases[0]}", param=param,
                           code="invalid_value")
        return None
    for wrong, param in ((bool(params.prompt), "prompt"), (params.logprobs, "include[]"),
                         (bool(params.timestamp_granularities), "timestamp_granularities[]")):
        if wrong:
            raise APIError(400, f"{param} is not supported with {params.model}", param=param, code="invalid_value")
    names, refs = params.known_speaker_names, params.known_speaker_references
    if len(names) != len(refs):
        raise APIError(400, f"known_speaker_names[] ({len(names)}) and known_speaker_references[] ({len(refs)}) "
                       "must have as many entries", param="known_speaker_references[]", code="invalid_value")
    if len(names) > MAX_KNOWN_SPEAKERS or len(set(names)) != len(names) or any(not n.strip() for n in names):
        raise APIError(400, f"known_speaker_names[]: up to {MAX_KNOWN_SPEAKERS} different, non-empty names",
                       param="known_speaker_names[]", code="invalid_value")
    return diarizer_for(state)


def diarizer_for(state: BridgeState) -> Diarizer:
    """The bridge's diarizer, once its two models are in the store."""
    if state.diarizer is not None:
        return state.diarizer
    settings = state.settings
    ids = (settings.diarization_segmentation_model, settings.diarization_embedding_model)
    missing = [i for i in ids if i not in state.catalog or not state.store.is_ready(state.catalog.get(i))]
    if missing:
        commands = "; ".join(f"python -m bridge models download {i}" for i in missing)
        raise APIError(409, f"speaker diarization needs its models, which are not downloaded: {', '.join(missing)}. "
                       f"Download them ({commands}; in Docker: docker compose exec mvp-bridge ...)",
                       param="model", code="diarization_not_available", should_retry=False)
    segmentation, embedding = (state.catalog.get(i) for i in ids)
    state.diarizer = Diarizer(state.store.path_for(segmentation.id) / segmentation.files[0].name,
                              state.store.path_for(embedding.id) / embedding.files[0].name,
                              threshold=settings.diarization_threshold, num_threads=settings.sherpa_num_threads,
                              min_similarity=settings.known_speaker_min_similarity,
                              window_seconds=settings.diarization_window_seconds)
    return state.diarizer


async def decode_references(params: TranscriptionParams, state: BridgeState, folder: Path) -> dict[str, np.ndarray]:
    """Each known speaker's reference audio (a data URL) decoded to 16 kHz, 2 to 10 s long."""
    out: dict[str, np.ndarray] = {}
    for i, (name, url) in enumerate(zip(params.known_speaker_names, params.known_speaker_references, strict=True)):
        param = f"known_speaker_references[{i}]"
        header, comma, data = url.partition(",")
        if not (url.startswith("data:") and comma and header.endswith(";base64")):
            raise APIError(400, f"{param} must be a data URL (data:audio/wav;base64,...)", param=param,
                           code="invalid_value")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param} is not valid base64", param=param, code="invalid_value") from None
        path = folder / f"reference-{i}"
        path.write_bytes(raw)
        stream = AudioStream(REFERENCE_SECONDS[1] + 5)
        try:
            await decode_into(state, path, stream)
            await stream.wait_done()
            out[name] = stream[:]
        except AudioStorageFull as exc:
            raise storage_error(exc) from None
        except (AudioDecodeError, AudioTimeout, AudioTooLong) as exc:
            raise APIError(400, f"{param} cannot be decoded as audio: {exc}", param=param,
                           code="invalid_value") from None
        finally:
            stream.close()
        low, high = REFERENCE_SECONDS
        if not low <= len(out[name]) / SAMPLE_RATE <= high:
            raise APIError(400, f"{param} is {len(out[name]) / SAMPLE_RATE:.1f} s long; a reference must be {low:g} "
                           f"to {high:g} s of the speaker", param=param, code="invalid_value")
    return out


async def find_speakers(state: BridgeState, diarizer: Diarizer, audio: AudioStream,
                        references: dict[str, np.ndarray]) -> list[Turn]:
    """Who spoke when, once the audio is decoded: one job in the fair scheduler, run in a thread."""
    await audio.wait_done()

    def run() -> list[Turn]:
        turns = diarizer.turns(audio)
        named = {name: diarizer.embed(ref) for name, ref in references.items()}
        return diarizer.name_speakers(audio, turns, named)

    return await state.scheduler.submit_call(state.scheduler.new_request(), lambda: asyncio.to_thread(run))


async def speaker_plan(turns: asyncio.Task[list[Turn]], audio: AudioStream,
                       max_piece_seconds: float) -> AsyncGenerator[tuple[int, int], None]:
    """The pieces of a model without token times: cut at the speaker changes."""
    found = await turns
    for a, b, _speaker in turn_pieces(found, audio.available, max_piece_seconds, audio):
        yield a, b


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def storage_error(exc: OSError) -> APIError:
    """A full disk (TMPDIR, where uploads and their decoded audio wait) fails the request, never
    the bridge: 507 in OpenAI's shape, worth retrying later."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise exc
    return APIError(507, "the server has no disk space left for this upload and its decoded audio; retry later "
                    "or send a shorter recording", code="insufficient_storage", type="server_error",
                    retry_after=30)


def decode_error(exc: Exception) -> APIError:
    if isinstance(exc, AudioStorageFull):
        return storage_error(exc)
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
    """The route: read the form, start the job (checks, then decode, cut and engine overlapped), and
    answer it whole or as a stream. The job's ``aclose`` releases what it holds, on every path."""
    if state.in_flight >= state.settings.max_concurrent_requests:
        raise APIError(503, "the server is busy; retry shortly", code="overloaded", type="server_error",
                       retry_after=2)
    state.in_flight += 1
    try:
        job = Job(state, task, access_record(request))
        form = await read_form(request)
        try:
            await job.start(form)
        except BaseException:
            await job.aclose()
            raise
        finally:
            await form.close()
        if job.params.stream:
            return StreamingResponse(job.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "x-model-id": job.engine.spec.id, **job.warning_header()},
                                     background=BackgroundTask(job.aclose))
        async with job:
            return await job.whole_answer()
    finally:
        state.in_flight -= 1


async def read_form(request: Request) -> FormData:
    try:
        # Fields are small, except known speakers' references: data URLs of up to 10 s of audio each. The
        # body as a whole stays under MAX_UPLOAD_BYTES.
        return await request.form(max_files=1, max_fields=32 + MAX_KEYWORDS + MAX_LANGUAGES,
                                  max_part_size=4 * 1024 * 1024)
    except OSError as exc:  # the upload is spooled to TMPDIR as it arrives
        raise storage_error(exc) from None
    except MultiPartException as exc:
        raise APIError(400, f"malformed multipart body: {exc.message}", code="invalid_multipart") from None


def _sse(event: dict[str, object]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


class Job:
    """One upload, from its checks to its answer. It holds what must be released once whatever
    happens (the engine lease, the queued pieces, the speaker search), and ``aclose`` (also
    ``async with``) releases them: the whole answer and the stream both end with it."""

    def __init__(self, state: BridgeState, task: str, record: AccessRecord) -> None:
        self.state, self.task, self.record = state, task, record
        self.started = time.monotonic()
        self._held = contextlib.AsyncExitStack()
        self.params: TranscriptionParams
        self.engine: ModelEngine
        self.audio: AudioStream
        self.pieces: Prefetch
        self.language = ""
        self.keywords: tuple[str, ...] = ()
        self.warnings: list[str] = []  # said in the answer's x-warning header
        self.speech: SpeechMap | None = None
        self.turns: asyncio.Task[list[Turn]] | None = None

    async def __aenter__(self) -> Job:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._held.aclose()

    async def start(self, form: FormData) -> None:
        """Check the request, then decode, cut and transcribe, overlapped: the first pieces go to the
        engine while the rest of the file is still decoded and scanned. Returns once the file is
        decoded, so that the answer's status can say whether it was (a file that turns out too long
        or corrupt is a 400, its pieces cancelled)."""
        state = self.state
        upload, self.params = (parse_translation_form if self.task == "translate" else parse_transcription_form)(form)
        params = self.params
        # The lease pins the engine this request is checked against and answered by, even if the
        # model is switched meanwhile (the old engine finishes its leases, then closes).
        self.engine = await self._held.enter_async_context(state.engines.lease())
        spec = self.engine.spec
        self.record.model = spec.id
        if self.task == "translate":
            check_translates(params.model, spec, state)
        check_model(params.model, spec, state)
        self.language = check_language(params.language, spec)
        check_languages(params.languages, spec, state)
        self.keywords = keywords_for(params.keywords, spec, self.warnings)
        check_logprobs(params.logprobs, spec, state)
        diarizer = check_diarize(params, state)
        folder = Path(tempfile.mkdtemp(prefix="bridge-upload-"))
        try:
            references = await decode_references(params, state, folder) if diarizer is not None else {}
            decode_started = time.monotonic()
            self.audio, decoding = await start_decode(upload, state, folder)
            self._held.callback(self.audio.close)
            first = state.settings.stream_first_piece_seconds if params.stream else None
            # What the VAD finds while cutting is kept for cue times and segment scores.
            self.speech = SpeechMap(state.detector, self.audio, params.chunking) if state.detector is not None else None
            plan = cut_pieces(self.audio, spec.max_piece_seconds, state.detector, state.settings.piece_target_seconds,
                              first or None, vad_threads=state.settings.vad_threads, chunking=params.chunking,
                              speech=self.speech)
            if diarizer is not None:
                # Speakers are found once the whole file is decoded, beside the engine; a model
                # without token times waits for them: its pieces are cut at speaker changes.
                self.turns = asyncio.create_task(find_speakers(state, diarizer, self.audio, references))
                self._held.callback(self.turns.cancel)
                if not spec.token_timestamps:
                    await plan.aclose()
                    plan = speaker_plan(self.turns, self.audio, spec.max_piece_seconds)
            self.pieces = Prefetch(iter_pieces(state.scheduler, self.engine, self.audio, plan, state.guard,
                                               self.speech, self.keywords))
            self._held.push_async_callback(self.pieces.aclose)
            try:
                await self.audio.wait_done()
                state.metrics.decode_seconds.observe(time.monotonic() - decode_started)
            except BaseException as exc:
                self.audio.abort()
                await self.pieces.aclose()
                if isinstance(exc, Exception):
                    raise decode_error(exc) from None
                raise
            finally:
                with contextlib.suppress(BaseException):
                    await decoding
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def whole_answer(self) -> Response:
        params, spec, audio = self.params, self.engine.spec, self.audio
        try:
            results = [piece async for piece in self.pieces]
        except (EngineUnavailable, EngineRejected) as exc:
            raise engine_error(exc) from None
        # The speech spans cut pieces without token times into cues (srt, vtt, verbose_json) and
        # score verbose_json's segments (no_speech_prob); a file that went whole is scanned then,
        # once: off the loop.
        timed = params.response_format == "verbose_json" or (
            params.response_format in TIMED_FORMATS and not spec.token_timestamps)
        transcript = await asyncio.to_thread(build_transcript, results, audio.seconds, spec.token_timestamps,
                                             self.speech.spans if timed and self.speech is not None else None)
        if self.turns is not None:
            transcript.segments = split_by_speaker(transcript.segments, await self.turns)
        elapsed = time.monotonic() - self.started
        self.record.audio_seconds = audio.seconds
        self.state.metrics.observe_transcription(spec.id, audio.seconds, elapsed)
        headers = {"x-model-id": spec.id, "x-audio-seconds": f"{audio.seconds:.3f}",
                   "x-processing-ms": str(int(elapsed * 1000))}
        want_words = "word" in params.timestamp_granularities
        if want_words and not spec.token_timestamps:
            self.warnings.append(f"model {spec.id} gives no token times: word timestamps are not available "
                                 "(segments only)")
        headers.update(self.warning_header())
        return render(transcript, params.response_format, language=self.language or transcript.language,
                      languages=await languages_heard(transcript.text, spec.languages), want_words=want_words,
                      headers=headers, logprobs=params.logprobs, token_ids=functools.partial(token_ids, spec),
                      task=self.task)

    def warning_header(self) -> dict[str, str]:
        return {"x-warning": "; ".join(self.warnings)} if self.warnings else {}

    async def events(self) -> AsyncIterator[bytes]:
        """One ``transcript.text.delta`` per piece, in order, then ``transcript.text.done``; with
        ``logprobs`` each carries its tokens' log-probabilities (the done event all of them). With
        speakers, each segment of a piece comes as a ``transcript.text.segment`` event and a
        ``delta`` that names it (``segment_id``).

        When the client goes away Starlette cancels this generator; leaving it releases the job
        (the pieces that have not run are cancelled)."""
        spec, audio, logprobs = self.engine.spec, self.audio, self.params.logprobs
        texts: list[str] = []
        scored: list[tuple[str, float]] = []
        async with self:
            try:
                async for start, end, result in self.pieces:
                    if result is None or not result.text:
                        continue
                    if self.turns is not None:
                        piece = build_transcript([(start, end, result)], audio.seconds, spec.token_timestamps)
                        for seg in split_by_speaker(piece.segments, await self.turns):
                            if not seg.text:
                                continue
                            index = len(texts)
                            yield _sse(diarized_segment(index, seg))
                            yield _sse({"type": "transcript.text.delta",
                                        "delta": seg.text if not texts else " " + seg.text,
                                        "segment_id": segment_id(index)})
                            texts.append(seg.text)
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
                self.record.status = err.status  # the stream's 200 was sent already; the log says what happened
                yield _sse({"type": "error", "error": {"message": err.message, "type": err.type, "code": err.code}})
                return
        self.record.audio_seconds = audio.seconds
        self.state.metrics.observe_transcription(spec.id, audio.seconds, time.monotonic() - self.started)
        text = " ".join(texts)
        done: dict[str, object] = {"type": "transcript.text.done", "text": text,
                                   "languages": await languages_heard(text, spec.languages)}
        if logprobs:
            done["logprobs"] = logprob_entries(scored)
        yield _sse({**done, "usage": usage(audio.seconds)})
