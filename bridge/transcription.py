"""The path of one transcription: decoded audio -> pieces -> engine (fairly scheduled) -> transcript.

``iter_pieces`` yields each piece's result in time order as soon as it and every piece before it
are done (what streaming sends); ``transcribe`` collects them into a ``Transcript``. Leaving
either early (error, client gone) cancels the pieces that have not run yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from bridge.cutting import is_silent, plan_pieces, plan_speech_pieces, split_long
from bridge.ports import SAMPLE_RATE, EngineResult, ModelEngine
from bridge.scheduler import FairScheduler
from bridge.transcript import Transcript, build_transcript
from bridge.vad import SpeechDetector

PieceResult = tuple[float, float, EngineResult | None]


async def plan_cuts(samples: np.ndarray, max_piece_seconds: float, detector: SpeechDetector | None,
                    target_seconds: float | None = None) -> list[tuple[int, int]]:
    """Audio that fits in one piece goes whole; longer audio is cut at pauses found by the VAD
    (by energy when no VAD model is available)."""
    if detector is None or len(samples) <= max_piece_seconds * SAMPLE_RATE:
        return plan_pieces(samples, max_piece_seconds)
    speech = await asyncio.to_thread(detector.speech_segments, samples)
    pieces = plan_speech_pieces(len(samples), speech, max_piece_seconds, target_seconds)
    return split_long(samples, pieces, max_piece_seconds)


async def iter_pieces(scheduler: FairScheduler, engine: ModelEngine, samples: np.ndarray,
                      plan: list[tuple[int, int]] | None = None) -> AsyncIterator[PieceResult]:
    if plan is None:
        plan = plan_pieces(samples, engine.spec.max_piece_seconds)
    key = scheduler.new_request()
    futures: list[asyncio.Future[EngineResult] | None] = [
        None if is_silent(samples[a:b]) else scheduler.submit(key, engine, samples[a:b]) for a, b in plan
    ]
    try:
        for (a, b), future in zip(plan, futures, strict=True):
            result = await future if future is not None else None
            yield a / SAMPLE_RATE, b / SAMPLE_RATE, result
    finally:
        scheduler.cancel(key)
        for future in futures:
            if future is not None and not future.done():
                future.cancel()
            elif future is not None and not future.cancelled():
                future.exception()  # mark retrieved: no "exception never retrieved" noise


async def transcribe(scheduler: FairScheduler, engine: ModelEngine, samples: np.ndarray,
                     plan: list[tuple[int, int]] | None = None) -> Transcript:
    pieces = [piece async for piece in iter_pieces(scheduler, engine, samples, plan)]
    return build_transcript(pieces, len(samples) / SAMPLE_RATE, engine.spec.token_timestamps)
