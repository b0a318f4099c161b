"""One VAD pass per request: the speech the cut finds is kept (``bridge.transcription.SpeechMap``)
and reused for the cue times of a model without token times, each segment's ``no_speech``, and the
piece guard's "mostly speech" check. Counted on the real Silero detector, in process, with a
stand-in engine."""

from __future__ import annotations

import asyncio

import numpy as np

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
