"""The path of one transcription: decoded audio -> pieces -> engine (fairly scheduled) -> transcript.

``cut_pieces`` finds the pieces (VAD in a thread, beside the engine); ``iter_pieces`` submits each
as soon as it is found and yields each piece's result in time order as soon as it and every piece
before it are done (what streaming sends; ``bridge.transcript`` builds the ``Transcript`` from them).
Leaving early (error, client gone) cancels the pieces that have not run yet.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np

from bridge.cutting import PAD, Chunking, PieceBuilder, Spans, is_silent, plan_pieces, speech_share, split_long
from bridge.decoding.stream import AudioStream
from bridge.guard import PieceGuard
from bridge.ports import SAMPLE_RATE, EngineResult, ModelEngine
from bridge.scheduler import FairScheduler
from bridge.transcript import scored_tokens
from bridge.vad import SpeechDetector, lower_thread_priority

PieceResult = tuple[float, float, EngineResult | None]
Audio = np.ndarray | AudioStream


def as_stream(audio: Audio) -> AudioStream:
    return audio if isinstance(audio, AudioStream) else AudioStream.from_samples(audio)


class SpeechMap:
    """The speech the VAD found in one request's audio while cutting it, kept with the request:
    cue times and segment scores read it instead of scanning the audio again. Where the cut did not
    scan (audio short enough to go whole), the whole file is scanned once, when first asked."""

    def __init__(self, detector: SpeechDetector, audio: AudioStream, chunking: Chunking | None = None) -> None:
        self.detector = detector
        self.audio = audio
        self.chunking = chunking or Chunking()
        self.found: list[tuple[int, int]] = []  # sample ranges, filled by the cut's scan thread
        self.scanning = False  # the cut runs the VAD (the audio did not go whole)
        self.complete = False  # the cut scanned the whole file
        self.rescans = 0  # scans made after the cut (none when the cut scanned)
        self._lock = threading.Lock()  # the scan thread records while the request reads
        self._ordered: list[tuple[int, int]] = []  # what is found, in order of start, read by bisection
        self._taken = 0  # how many of ``found`` are in ``_ordered``
        self._longest = 0  # the longest range: a search for ranges that end past a point starts that far back

    def record(self, start: int, end: int) -> None:
        with self._lock:
            self.found.append((start, end))

    def finish(self) -> None:
        """The cut's scan reached the end: merge what regions scanned side by side found twice."""
        merged: list[tuple[int, int]] = []
        with self._lock:
            for a, b in sorted(self.found):
                if merged and a <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
                else:
                    merged.append((a, b))
            self.found, self._ordered, self._taken = merged, list(merged), len(merged)
            self._longest = max((b - a for a, b in merged), default=0)
            self.complete = True

    def speech_seconds(self, start: int, end: int) -> float | None:
        """Seconds of speech in [start, end) samples as the cut found it (the piece guard's check);
        None where the cut did not scan. A piece is handed over only once the scan has passed its
        end, so what it found there is all there is."""
        if not (self.scanning or self.complete):
            return None
        found: Spans = [(float(a), float(b)) for a, b in self._near(start, end)]  # sample counts
        return speech_share(found, start, end, pad=0) * max(0, end - start) / SAMPLE_RATE

    def spans(self, start: float, end: float) -> Spans:
        """Speech within [start, end] s, as (start, end) seconds on the file's time line."""
        if not self.complete:
            self.rescans += 1
            self.found = self.detector.speech_segments(self.audio, threshold=self.chunking.threshold,
                                                       min_silence=self.chunking.min_silence_seconds)
            self.finish()
        a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        return [(x / SAMPLE_RATE, y / SAMPLE_RATE) for x, y in self._near(a, b)]

    def _near(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges found that overlap (start, end), in order of start: found by bisection, so a
        piece of an hours-long file reads the ranges near it, not every range found."""
        with self._lock:
            if self._taken < len(self.found):
                fresh = self.found[self._taken:]
                self._taken = len(self.found)
                self._longest = max(self._longest, *(b - a for a, b in fresh))
                self._ordered += fresh
                self._ordered.sort()
            lo = bisect.bisect_left(self._ordered, (start - self._longest,))
            hi = bisect.bisect_left(self._ordered, (end,))
            return [(a, b) for a, b in self._ordered[lo:hi] if b > start]


async def cut_pieces(audio: Audio, max_piece_seconds: float, detector: SpeechDetector | None,
                     target_seconds: float | None = None, first_seconds: float | None = None,
                     *, vad_threads: int = 1, chunking: Chunking | None = None,
                     speech: SpeechMap | None = None) -> AsyncGenerator[tuple[int, int], None]:
    """The pieces to send to the engine, in order, as soon as each is known.

    ``audio`` may still be being decoded (an ``AudioStream``): cutting follows the decoder. Audio
    that fits in one piece goes whole (with ``first_seconds``, when streaming: only audio shorter
    than the first piece). Longer audio is cut at pauses found by the VAD, which runs in a thread
    beside the decoder and the engine: a piece is handed over as soon as the VAD has passed its end,
    so the engine starts on the first pieces while the rest is still being decoded and scanned.
    With ``vad_threads`` > 1 regions of a long file are scanned side by side. Without a VAD model the
    audio is cut by energy once it is all decoded. A decoding error is raised here too.
    ``chunking`` sets the VAD and the padding for this request; ``speech`` keeps what the VAD found."""
    chunking = chunking or Chunking()
    pad = PAD if chunking.padding_seconds is None else int(chunking.padding_seconds * SAMPLE_RATE)
    stream = as_stream(audio)
    whole = int(min(max_piece_seconds, first_seconds or max_piece_seconds) * SAMPLE_RATE)
    await stream.wait_available(whole + 1)
    if stream.error is not None:
        raise stream.error
    if stream.done and stream.available <= whole:
        if stream.available:
            yield 0, stream.available
        return
    if detector is None:
        await stream.wait_done()
        for piece in plan_pieces(stream, max_piece_seconds):
            yield piece
        return
    scan = VadScan(stream, detector, PieceBuilder(None, max_piece_seconds, target_seconds, first_seconds, pad),
                   max_piece_seconds, vad_threads=vad_threads, chunking=chunking, speech=speech)
    async for piece in scan.pieces():
        yield piece


class VadScan:
    """The VAD's scan of one request's audio, in a thread of its own (its priority lowered for
    good, so not the shared pool) beside the decoder and the engine: each piece is handed over as
    soon as the scan has passed its end and its audio is decoded."""

    def __init__(self, stream: AudioStream, detector: SpeechDetector, builder: PieceBuilder, max_piece_seconds: float,
                 *, vad_threads: int, chunking: Chunking, speech: SpeechMap | None) -> None:
        self.stream, self.detector, self.builder = stream, detector, builder
        self.max_piece_seconds, self.vad_threads, self.chunking, self.speech = (max_piece_seconds, vad_threads,
                                                                                chunking, speech)
        self.loop = asyncio.get_running_loop()
        self.found: asyncio.Queue[list[tuple[int, int]] | BaseException | None] = asyncio.Queue()
        self.stop = threading.Event()

    async def pieces(self) -> AsyncIterator[tuple[int, int]]:
        """The pieces in order, as the scan finds them; leaving early stops the scan."""
        if self.speech is not None:
            self.speech.scanning = True
        threading.Thread(target=self._run, name="vad-scan", daemon=True).start()
        try:
            while (item := await self.found.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                for piece in item:
                    yield piece
        finally:
            self.stop.set()

    def _run(self) -> None:
        lower_thread_priority()
        try:
            for start, end in self.detector.iter_segments_parallel(
                    self.stream, workers=self.vad_threads, stop=self.stop, threshold=self.chunking.threshold,
                    min_silence=self.chunking.min_silence_seconds):
                if self.speech is not None:
                    self.speech.record(start, end)
                closed = self.builder.add(start, end)
                if closed:
                    self._post(self._settle(closed))
            if not self.stop.is_set():
                if self.speech is not None:
                    self.speech.finish()
                self._post(self._settle(self.builder.finish()))
            self._post(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the request (cancelled: an aborted decode)
            self._post(exc)

    def _post(self, item: list[tuple[int, int]] | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody waits
            self.loop.call_soon_threadsafe(self.found.put_nowait, item)

    def _settle(self, pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Wait until each piece's audio is decoded (its padding may reach past what the VAD has
        seen), clamp the last one to the end, and hard-split any that is too long."""
        settled = []
        for a, b in pieces:
            b = min(b, self.stream.wait_samples(b, self.stop))
            if b > a:
                settled.append((a, b))
        return split_long(self.stream, settled, self.max_piece_seconds)


async def plan_cuts(audio: Audio, max_piece_seconds: float, detector: SpeechDetector | None,
                    target_seconds: float | None = None, first_seconds: float | None = None,
                    ) -> list[tuple[int, int]]:
    """All pieces at once (benchmarks and tests)."""
    return [piece async for piece in cut_pieces(audio, max_piece_seconds, detector, target_seconds, first_seconds)]


Plan = list[tuple[int, int]] | AsyncGenerator[tuple[int, int], None]


async def iter_pieces(scheduler: FairScheduler, engine: ModelEngine, audio: Audio,
                      plan: Plan | None = None, guard: PieceGuard | None = None,
                      speech: SpeechMap | None = None, keywords: tuple[str, ...] = ()) -> AsyncIterator[PieceResult]:
    """Each piece's result in time order, decoded with ``keywords`` where given. Pieces go to the
    scheduler as soon as the plan yields them, so the engine works on the first ones while later
    ones are still being found; a piece's samples are read from the stream when it is submitted,
    and at most the engine's connections and one more pieces are submitted ahead of the one
    handed on, so a slow engine never has hours of audio waiting in memory. With a
    ``guard`` each result is checked, and a failed piece is transcribed again in halves through the
    same request's queue (``bridge.guard``), its "mostly speech" check read from ``speech``."""
    stream = as_stream(audio)
    if plan is None:
        plan = cut_pieces(stream, engine.spec.max_piece_seconds, None)
    key = scheduler.new_request()
    queued: asyncio.Queue[tuple[int, int, asyncio.Future[EngineResult] | None] | None] = asyncio.Queue()
    futures: list[asyncio.Future[EngineResult]] = []
    ahead = asyncio.Semaphore(scheduler.connections + 1)  # pieces read, not yet handed on

    def run(samples: np.ndarray) -> asyncio.Future[EngineResult]:
        return scheduler.submit(key, engine, samples, keywords)

    def submit(a: int, b: int) -> None:
        piece = stream.view(a, b)
        future: asyncio.Future[EngineResult] | None = None
        if not is_silent(piece):
            speech_at = None if speech is None else (lambda x, y: speech.speech_seconds(a + x, a + y))
            future = run(piece) if guard is None else asyncio.ensure_future(guard.run(run, piece, speech_at))
        if future is not None:
            futures.append(future)
        queued.put_nowait((a, b, future))

    async def submit_all() -> None:
        try:
            if isinstance(plan, list):
                for a, b in plan:
                    await ahead.acquire()
                    submit(a, b)
            else:
                async with contextlib.aclosing(plan):  # stops the VAD thread when the request goes
                    async for a, b in plan:
                        await ahead.acquire()
                        submit(a, b)
        finally:
            queued.put_nowait(None)

    submitter = asyncio.create_task(submit_all())
    try:
        while (item := await queued.get()) is not None:
            a, b, future = item
            result = await future if future is not None else None
            ahead.release()
            yield a / SAMPLE_RATE, b / SAMPLE_RATE, result
        await submitter  # a failure while cutting surfaces here
    finally:
        submitter.cancel()
        with contextlib.suppress(BaseException):
            await submitter
        scheduler.cancel(key)
        for future in futures:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # mark retrieved: no "exception never retrieved" noise


class DeltaText:
    """The text a transcription has sent in ``delta`` events so far (and its tokens' scores)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.scored: list[tuple[str, float]] = []

    def add(self, text: str, scored: list[tuple[str, float]] | None = None) -> str:
        """``text`` as the next delta carries it: after a space, unless it is the first."""
        delta = text if not self.texts else " " + text
        self.texts.append(text)
        self.scored += scored or []
        return delta

    @property
    def text(self) -> str:
        return " ".join(self.texts)


async def piece_deltas(pieces: AsyncIterator[PieceResult], sent: DeltaText, logprobs: bool
                       ) -> AsyncIterator[tuple[str, list[tuple[str, float]]]]:
    """Each piece that holds text as its delta: (the delta's text, with ``logprobs`` its tokens'
    log-probabilities); ``sent`` keeps what went out. Uploads' streams and live turns both send
    their pieces this way."""
    async for _start, _end, result in pieces:
        if result is None or not result.text:
            continue
        scored = scored_tokens(result) if logprobs else []
        yield sent.add(result.text, scored), scored


class Prefetch:
    """Runs an async iterator in a task of its own, keeping what it yields until it is read: a
    request's pieces start on the engine while the request still waits for its decode to finish
    (which decides its status), and streamed text is ready the moment the response starts."""

    def __init__(self, source: AsyncIterator[PieceResult]) -> None:
        self._items: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(source))

    async def _run(self, source: AsyncIterator[PieceResult]) -> None:
        try:
            async for item in source:
                self._items.put_nowait(("item", item))
            self._items.put_nowait(("end", None))
        except Exception as exc:  # noqa: BLE001 - raised to the reader
            self._items.put_nowait(("error", exc))
        except BaseException:  # cancelled: a reader still waiting must not wait for ever
            self._items.put_nowait(("error", RuntimeError("the transcription was cancelled")))
            raise
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()

    def __aiter__(self) -> Prefetch:
        return self

    async def __anext__(self) -> PieceResult:
        kind, value = await self._items.get()
        if kind == "item":
            return value  # type: ignore[return-value]
        self._items.put_nowait((kind, value))  # stays at the end for any later read
        if kind == "error":
            raise value  # type: ignore[misc]
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop the pieces that have not run yet."""
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
