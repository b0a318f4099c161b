"""One upload's life (``Job``), from its checks to its answer: the engine leased, the audio decoded,
cut and transcribed overlapped, the answer whole or as a stream of events; everything it holds is
released on one path (``aclose``) whatever happens.
"""

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

from starlette.datastructures import FormData
from starlette.responses import Response

from bridge.api_types import (
    TranscriptionParams,
    parse_transcription_form,
    parse_translation_form,
)
from bridge.decoding.stream import AudioStream
from bridge.diarization import Turn, split_by_speaker
from bridge.formats import diarized_segment, render, segment_id, usage
from bridge.languages import languages_heard
from bridge.ports import EngineRejected, EngineUnavailable, ModelEngine
from bridge.request_checks import (
    check_language,
    check_languages,
    check_logprobs,
    check_model,
    check_translates,
    keywords_for,
)
from bridge.speakers import check_diarize, decode_references, find_speakers, speaker_plan
from bridge.state import BridgeState
from bridge.tokens import logprob_entries, token_ids
from bridge.transcript import build_transcript
from bridge.transcription import DeltaText, Prefetch, SpeechMap, cut_pieces, iter_pieces, piece_deltas
from bridge.upload import decode_error, start_decode
from common.access import AccessRecord
from common.errors import APIError
from common.response_formats import TIMED_FORMATS


def engine_error(exc: Exception) -> APIError:
    if isinstance(exc, EngineUnavailable):
        return APIError(503, f"the engine is not available: {exc}", code="engine_unavailable",
                        type="server_error", retry_after=exc.retry_after)
    if isinstance(exc, EngineRejected):
        return APIError(500, f"the engine could not transcribe this audio: {exc}", code="engine_error",
                        type="server_error", should_retry=False)
    raise exc


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
        spec, audio, sent = self.engine.spec, self.audio, DeltaText()
        async with self:
            try:
                async for event in self._speaker_events(sent) if self.turns is not None else self._piece_events(sent):
                    yield _sse(event)
            except (EngineUnavailable, EngineRejected) as exc:
                err = engine_error(exc)
                self.record.status = err.status  # the stream's 200 was sent already; the log says what happened
                yield _sse({"type": "error", "error": {"message": err.message, "type": err.type, "code": err.code}})
                return
        self.record.audio_seconds = audio.seconds
        self.state.metrics.observe_transcription(spec.id, audio.seconds, time.monotonic() - self.started)
        done: dict[str, object] = {"type": "transcript.text.done", "text": sent.text,
                                   "languages": await languages_heard(sent.text, spec.languages)}
        if self.params.logprobs:
            done["logprobs"] = logprob_entries(sent.scored)
        yield _sse({**done, "usage": usage(audio.seconds)})

    async def _piece_events(self, sent: DeltaText) -> AsyncIterator[dict[str, object]]:
        """A ``delta`` for each piece with text (with its tokens' log-probabilities when asked)."""
        async for delta, scored in piece_deltas(self.pieces, sent, self.params.logprobs):
            event: dict[str, object] = {"type": "transcript.text.delta", "delta": delta}
            if self.params.logprobs:
                event["logprobs"] = logprob_entries(scored)
            yield event

    async def _speaker_events(self, sent: DeltaText) -> AsyncIterator[dict[str, object]]:
        """For each piece, each of its speakers' segments: a ``segment`` event, then the ``delta``
        that names it."""
        spec, audio = self.engine.spec, self.audio
        async for start, end, result in self.pieces:
            if result is None or not result.text:
                continue
            piece = build_transcript([(start, end, result)], audio.seconds, spec.token_timestamps)
            for seg in split_by_speaker(piece.segments, await self.turns) if self.turns is not None else []:
                if seg.text:
                    index = len(sent.texts)
                    yield diarized_segment(index, seg)
                    yield {"type": "transcript.text.delta", "delta": sent.add(seg.text),
                           "segment_id": segment_id(index)}
