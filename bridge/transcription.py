"""The path of one transcription: decoded audio -> pieces -> engine (fairly scheduled) -> transcript.

``cut_pieces`` finds the pieces (VAD in a thread, beside the engine); ``iter_pieces`` submits each
as soon as it is found and yields each piece's result in time order as soon as it and every piece
before it are done (what streaming sends); ``transcribe`` collects them into a ``Transcript``. Leaving
either early (error, client gone) cancels the pieces that have not run yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np

from bridge.cutting import PieceBuilder, is_silent, plan_pieces, split_long
from bridge.ports import SAMPLE_RATE, EngineResult, ModelEngine
from bridge.scheduler import FairScheduler
from bridge.transcript import Transcript, build_transcript
from bridge.vad import SpeechDetector

PieceResult = tuple[float, float, EngineResult | None]


async def cut_pieces(samples: np.ndarray, max_piece_seconds: float, detector: SpeechDetector | None,
                     target_seconds: float | None = None) -> AsyncGenerator[tuple[int, int], None]:
    """The pieces to send to the engine, in order, as soon as each is known.

    Audio that fits in one piece goes whole. Longer audio is cut at pauses found by the VAD, which
    runs in a thread beside the engine: a piece is handed over as soon as the VAD has passed its
    end, so the engine starts on the first pieces while the rest is still being scanned. Without a
    VAD model the audio is cut by energy."""
    if detector is None or len(samples) <= max_piece_seconds * SAMPLE_RATE:
        for piece in plan_pieces(samples, max_piece_seconds):
            yield piece
        return
    loop = asyncio.get_running_loop()
    found: asyncio.Queue[list[tuple[int, int]] | BaseException | None] = asyncio.Queue()
    stop = threading.Event()

    def post(item: list[tuple[int, int]] | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody waits
            loop.call_soon_threadsafe(found.put_nowait, item)

    def scan() -> None:
        builder = PieceBuilder(len(samples), max_piece_seconds, target_seconds)
        try:
            for start, end in detector.iter_segments(samples, stop=stop):
                closed = builder.add(start, end)
                if closed:
                    post(split_long(samples, closed, max_piece_seconds))
            if not stop.is_set():
                post(split_long(samples, builder.finish(), max_piece_seconds))
            post(None)
        except Exception as exc:  # noqa: BLE001 - handed to the request
            post(exc)

    scanner = loop.run_in_executor(None, scan)
    try:
        while (item := await found.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            for piece in item:
                yield piece
        await scanner
    finally:
        stop.set()


async def plan_cuts(samples: np.ndarray, max_piece_seconds: float, detector: SpeechDetector | None,
                    target_seconds: float | None = None) -> list[tuple[int, int]]:
    """All pieces at once (benchmarks and tests)."""
    return [piece async for piece in cut_pieces(samples, max_piece_seconds, detector, target_seconds)]


Plan = list[tuple[int, int]] | AsyncGenerator[tuple[int, int], None]


async def iter_pieces(scheduler: FairScheduler, engine: ModelEngine, samples: np.ndarray,
                      plan: Plan | None = None) -> AsyncIterator[PieceResult]:
    """Each piece's result in time order. Pieces go to the scheduler as soon as the plan yields
    them, so the engine works on the first ones while later ones are still being found."""
    if plan is None:
        plan = plan_pieces(samples, engine.spec.max_piece_seconds)
    key = scheduler.new_request()
    queued: asyncio.Queue[tuple[int, int, asyncio.Future[EngineResult] | None] | None] = asyncio.Queue()
    futures: list[asyncio.Future[EngineResult]] = []

    def submit(a: int, b: int) -> None:
        future = None if is_silent(samples[a:b]) else scheduler.submit(key, engine, samples[a:b])
        if future is not None:
            futures.append(future)
        queued.put_nowait((a, b, future))

    async def submit_all() -> None:
        try:
            if isinstance(plan, list):
                for a, b in plan:
                    submit(a, b)
            else:
                async with contextlib.aclosing(plan):  # stops the VAD thread when the request goes
                    async for a, b in plan:
                        submit(a, b)
        finally:
            queued.put_nowait(None)

    submitter = asyncio.create_task(submit_all())
    try:
        while (item := await queued.get()) is not None:
            a, b, future = item
            result = await future if future is not None else None
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


async def transcribe(scheduler: FairScheduler, engine: ModelEngine, samples: np.ndarray,
                     plan: Plan | None = None) -> Transcript:
    pieces = [piece async for piece in iter_pieces(scheduler, engine, samples, plan)]
    return build_transcript(pieces, len(samples) / SAMPLE_RATE, engine.spec.token_timestamps)
