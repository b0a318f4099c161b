"""Catching pieces the model fails on, and transcribing them again, smaller.

On noisy speech a model can answer a piece full of speech with nothing, or loop (the same words
over and over, several times what was said). After each piece comes back, ``judge`` checks it for
what a user would call broken:

- ``empty``: (near) no words for a piece the VAD says is mostly speech;
- ``too_long``: more words per second of audio than people speak;
- ``repetitive``: text that compresses too well (gzip ratio, as openai-whisper checks at 2.4).

A failed piece is transcribed again in two halves cut at its quietest point in the middle, each
half checked and retried the same way down to ``GUARD_MIN_PIECE_SECONDS``, and the better of the
piece and its halves joined (by the same checks; a tie keeps the piece, whose context is longer)
is kept. The retries go through the request's own queue in the fair scheduler. A piece that still
fails keeps its best text and carries its ``flags`` (``verbose_json`` segments show them), never
dropped. The counts go to ``/health`` and the metrics.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import numpy as np

from bridge.cutting import loud_seconds, quietest_point
from bridge.ports import SAMPLE_RATE, EngineResult
from bridge.transcript import compression_ratio
from bridge.vad import SpeechDetector

Submit = Callable[[np.ndarray], Awaitable[EngineResult]]
# Seconds of speech in [start, end) samples of the piece, as the cut's VAD found it; None: not known.
SpeechAt = Callable[[int, int], "float | None"]


@dataclass
class GuardLimits:
    max_words_per_second: float = 5.0  # fast speech is about 4
    max_compression_ratio: float = 2.4  # openai-whisper's threshold
    min_words_per_speech_second: float = 0.3  # below this, a piece of speech is "empty"
    min_piece_seconds: float = 3.0  # halves are never shorter than this


@dataclass
class Verdict:
    reasons: list[str]
    severity: float  # how far past the limits, to compare two failing answers

    def __lt__(self, other: Verdict) -> bool:
        return (len(self.reasons), self.severity) < (len(other.reasons), other.severity)


@dataclass
class PieceGuard:
    limits: GuardLimits
    detector: SpeechDetector | None
    failed: Counter[str] = field(default_factory=Counter)  # checks that fired, by reason
    retried: int = 0  # pieces transcribed again in halves
    improved: int = 0  # ... where the halves were kept
    unreliable: int = 0  # pieces that still fail, kept with their flags

    async def judge(self, result: EngineResult, samples: np.ndarray, speech_at: SpeechAt | None = None,
                    offset: int = 0) -> Verdict:
        limits = self.limits
        seconds = len(samples) / SAMPLE_RATE
        words = len(result.text.split())
        reasons: list[str] = []
        severity = 0.0
        if seconds >= 1 and words / seconds > limits.max_words_per_second:
            reasons.append("too_long")
            severity += words / seconds - limits.max_words_per_second
        ratio = compression_ratio(result.text)
        if len(result.text) >= 50 and ratio > limits.max_compression_ratio:
            reasons.append("repetitive")
            severity += ratio - limits.max_compression_ratio
        if seconds >= 2 and words < limits.min_words_per_speech_second * seconds:
            known = speech_at(offset, offset + len(samples)) if speech_at is not None else None
            speech = known if known is not None else await asyncio.to_thread(self.speech_seconds, samples)
            if speech >= seconds / 2 and words < limits.min_words_per_speech_second * speech:
                reasons.append("empty")
                severity += limits.min_words_per_speech_second - words / speech
        return Verdict(reasons, severity)

    def speech_seconds(self, samples: np.ndarray) -> float:
        if self.detector is None:  # no VAD: loud enough counts as speech
            return loud_seconds(samples, 0.01)
        return sum(b - a for a, b in self.detector.speech_segments(samples)) / SAMPLE_RATE

    async def run(self, submit: Submit, samples: np.ndarray, speech_at: SpeechAt | None = None) -> EngineResult:
        """``submit(samples)`` the piece, then check it and retry it in halves where it fails.
        ``speech_at`` reuses the speech the cut found (no second scan of the audio)."""
        result, _ = await self._guarded(submit, samples, speech_at, 0)
        if result.flags:
            self.unreliable += 1
        return result

    async def _guarded(self, submit: Submit, samples: np.ndarray, speech_at: SpeechAt | None,
                       offset: int) -> tuple[EngineResult, Verdict]:
        result = await submit(samples)
        verdict = await self.judge(result, samples, speech_at, offset)
        if not verdict.reasons:
            return result, verdict
        self.failed.update(verdict.reasons)
        result = replace(result, flags=sorted(set(verdict.reasons)))
        floor = int(self.limits.min_piece_seconds * SAMPLE_RATE)
        if len(samples) < 2 * floor:
            return result, verdict
        self.retried += 1
        cut = quietest_point(samples, floor)
        (left, _), (right, _) = await asyncio.gather(self._guarded(submit, samples[:cut], speech_at, offset),
                                                     self._guarded(submit, samples[cut:], speech_at, offset + cut))
        joined = join_results(left, right, cut / SAMPLE_RATE)  # flags: the halves' that still fail
        joined_verdict = await self.judge(joined, samples, speech_at, offset)
        if joined_verdict < verdict:
            self.improved += 1
            return replace(joined, flags=sorted(set(joined.flags) | set(joined_verdict.reasons))), joined_verdict
        return result, verdict

    def as_dict(self) -> dict[str, object]:
        return {"retried": self.retried, "improved": self.improved, "unreliable": self.unreliable,
                "failed_checks": dict(self.failed)}


def join_results(left: EngineResult, right: EngineResult, offset: float) -> EngineResult:
    """Two halves' results as one result of the whole piece (the right half's times moved)."""
    text = " ".join(t for t in (left.text.strip(), right.text.strip()) if t)
    return EngineResult(
        text=text,
        tokens=[*left.tokens, *right.tokens],
        timestamps=[*left.timestamps, *(t + offset for t in right.timestamps)],
        durations=[*left.durations, *right.durations]
        if len(left.durations) == len(left.tokens) and len(right.durations) == len(right.tokens) else [],
        logprobs=[*left.logprobs, *right.logprobs]
        if len(left.logprobs) == len(left.tokens) and len(right.logprobs) == len(right.tokens) else [],
        language=left.language or right.language,
        flags=sorted(set(left.flags) | set(right.flags)),
    )
