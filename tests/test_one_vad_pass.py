"""One VAD pass per request: the speech the cut finds is kept (``bridge.transcription.SpeechMap``)
and reused for the cue times of a model without token times, each segment's ``no_speech``, and the
piece guard's "mostly speech" check. Counted on the real Silero detector, in process, with a
stand-in engine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bridge.cutting import speech_share
from bridge.guard import GuardLimits, PieceGuard
from bridge.ports import EngineHealth, EngineModel, EngineResult, ModelEngine
from bridge.scheduler import FairScheduler
from bridge.transcript import build_transcript
from bridge.transcription import SpeechMap, as_stream, cut_pieces, iter_pieces
from bridge.vad import SpeechDetector, find_vad_model
from tests.speech import librispeech_samples

UTTERANCES = ["1089-134686-0000", "1688-142285-0000", "367-130732-0001", "1998-15444-0001", "2033-164914-0002",
              "2414-128291-0003", "3080-5032-0001", "533-1066-0002"]


class CountingDetector(SpeechDetector):
    scans = 0

    def iter_segments(self, *args, **kwargs):
        type(self).scans += 1
        return super().iter_segments(*args, **kwargs)


class Engine(ModelEngine):
    """Answers each piece at once: words as many as its seconds, or nothing (``empty``)."""

    def __init__(self, empty: bool) -> None:
        super().__init__(EngineModel("stand-in", (), max_piece_seconds=30.0, token_timestamps=False, batches=False))
        self.empty = empty

    async def start(self) -> None: ...

    async def transcribe(self, samples: np.ndarray, keywords: tuple[str, ...] = ()) -> EngineResult:
        return EngineResult("" if self.empty else " ".join(["word."] * max(1, len(samples) // 16000)))

    def health(self) -> EngineHealth:
        return EngineHealth(ready=True, provider="cpu")

    async def close(self) -> None: ...


def talk() -> np.ndarray:
    gap = np.zeros(int(16000 * 0.8), dtype=np.float32)
    return np.concatenate([x for u in UTTERANCES for x in (librispeech_samples(u), gap)])


def run(empty: bool) -> tuple[int, SpeechMap, list]:
    detector = CountingDetector(find_vad_model(None))
    CountingDetector.scans = 0
    audio = as_stream(talk())

    async def go():
        scheduler = FairScheduler(2)
        speech = SpeechMap(detector, audio)
        plan = cut_pieces(audio, 30.0, detector, 20.0, speech=speech)
        guard = PieceGuard(GuardLimits(), detector)
        pieces = [p async for p in iter_pieces(scheduler, Engine(empty), audio, plan, guard, speech)]
        transcript = build_transcript(pieces, audio.seconds, False, speech.spans)
        await scheduler.close()
        return speech, transcript, guard

    speech, transcript, guard = asyncio.run(go())
    return CountingDetector.scans, speech, [transcript, guard]


def test_cues_and_scores_reuse_the_cuts_scan():
    scans, speech, (transcript, _) = run(empty=False)
    assert len(transcript.segments) > len(UTTERANCES) // 2  # long pieces were split into cues
    assert all(0 <= seg.no_speech < 0.5 for seg in transcript.segments)
    assert scans == 1 and speech.complete and speech.rescans == 0


def test_the_guard_reuses_the_cuts_scan():
    scans, _, (transcript, guard) = run(empty=True)
    assert guard.failed["empty"] >= 2 and guard.retried >= 1  # the check ran, on pieces and halves
    assert scans == 1


def test_each_piece_reads_the_speech_near_it_as_the_whole_list_gives_it():
    """The speech kept for an hours-long file is read near each piece (by bisection): each piece's
    seconds of speech and cue spans are what the whole list gives, while the scan still records
    ranges out of order (regions side by side find the speech at their borders twice) and after
    it has merged them."""
    rng = np.random.default_rng(3)
    speech = SpeechMap(None, None)  # no rescan: the cut scans
    speech.scanning = True
    ranges = []
    for region in rng.permutation(40):  # regions of 15 s, their segments recorded region by region
        at = int(region * 15 * 16000) - 8000
        while at < (region + 1) * 15 * 16000:
            length = int(rng.integers(1600, 16000 * (20 if rng.random() < 0.05 else 3)))
            ranges.append((max(0, at), at + length))
            at += length + int(rng.integers(800, 16000))
    for i, (a, b) in enumerate(ranges):
        speech.record(a, b)
        if i % 25 == 0:
            start = int(rng.integers(0, 600 * 16000))
            whole = [(float(x), float(y)) for x, y in sorted(ranges[:i + 1])]
            want = speech_share(whole, start, start + 30 * 16000, pad=0) * 30
            assert speech.speech_seconds(start, start + 30 * 16000) == pytest.approx(want, abs=1e-9)
    speech.finish()
    merged = list(speech.found)
    for start in rng.uniform(0, 600, 50):
        a, b = int(start * 16000), int((start + 20) * 16000)
        assert speech.spans(start, start + 20) == [(x / 16000, y / 16000) for x, y in merged if y > a and x < b]
        want = speech_share([(float(x), float(y)) for x, y in merged], a, b, pad=0) * (b - a) / 16000
        assert speech.speech_seconds(a, b) == pytest.approx(want, abs=1e-9)
