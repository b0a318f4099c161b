"""Cutting long audio into engine-sized pieces.

A piece is never longer than the model's ``max_piece_seconds``. With voice activity (``bridge.vad``)
the pieces are the speech segments, padded a little, and neighbours merged while they fit; the
silence between them is not sent to the engine. A segment longer than a piece (speech that never
pauses) and audio cut without VAD are split in the quietest stretch (lowest RMS over 100 ms frames)
of the last part of each window, so that words are not split where the speech pauses; where it
never pauses the cut is still made (hard split). Pure digital silence is not sent to the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bridge.ports import SAMPLE_RATE

FRAME = SAMPLE_RATE // 10  # 100 ms
PAD = SAMPLE_RATE // 5  # 200 ms kept around each speech segment
SILENCE_RMS = 1e-4
RMS_BLOCK = 300 * FRAME  # 30 s: the most ``frame_rms`` reads and widens to float64 at once


Spans = list[tuple[float, float]]  # speech (start, end) in seconds


class SpeakerTurn(Protocol):
    """A stretch of one speaker's speech (``bridge.diarization.Turn``)."""

    @property
    def start(self) -> float: ...  # seconds

    @property
    def end(self) -> float: ...

    @property
    def speaker(self) -> str: ...


class Samples(Protocol):
    """Audio read by slice: an array, or a request's ``AudioStream`` (its samples live in a file)."""

    def __len__(self) -> int: ...

    def __getitem__(self, piece: slice, /) -> np.ndarray: ...


def plan_pieces(samples: Samples, max_piece_seconds: float, start: int = 0, end: int | None = None
                ) -> list[tuple[int, int]]:
    """Return (start, end) sample ranges covering ``samples[start:end]`` in order, without gaps
    (reading only the windows where a cut is looked for)."""
    total = len(samples) if end is None else end
    limit = int(max_piece_seconds * SAMPLE_RATE)
    if total - start <= limit:
        return [(start, total)]
    pieces: list[tuple[int, int]] = []
    while total - start > limit:
        # Look for the pause in the last 40 % of the window.
        lo = start + int(limit * 0.6)
        hi = start + limit
        rms = frame_rms(samples, lo, hi)
        if len(rms) == 0:
            cut = hi
        else:
            quietest = int(np.argmin(rms[::-1]))  # ties: the latest frame, the longest piece
            cut = lo + (len(rms) - 1 - quietest) * FRAME + FRAME // 2
        pieces.append((start, cut))
        start = cut
    pieces.append((start, total))
    return pieces


def frame_rms(samples: Samples, start: int = 0, end: int | None = None) -> np.ndarray:
    """The RMS of each whole 100 ms frame of ``samples[start:end]``, read and squared 30 s at a
    time: a cut sought in a speaker window of 600 s looks at 240 s, 61 MB of float64 at once."""
    end = len(samples) if end is None else min(end, len(samples))
    n = max(0, end - start) // FRAME
    rms = np.empty(n)
    for at in range(0, n * FRAME, RMS_BLOCK):
        size = min(RMS_BLOCK, n * FRAME - at)
        frames = np.asarray(samples[start + at:start + at + size], dtype=np.float64).reshape(-1, FRAME)
        rms[at // FRAME:(at + size) // FRAME] = np.sqrt(np.mean(frames ** 2, axis=1))
    return rms


def loud_seconds(samples: np.ndarray, rms_floor: float) -> float:
    """Seconds of the 100 ms frames of ``samples`` louder than ``rms_floor``."""
    return float(np.sum(frame_rms(samples) > rms_floor)) * FRAME / SAMPLE_RATE


def quietest_point(samples: np.ndarray, floor: int) -> int:
    """The middle of a quietest 100 ms frame at least ``floor`` from either end: of the frames
    about as quiet as the quietest, the one nearest the middle (halves of similar length)."""
    lo, hi = floor, len(samples) - floor
    rms = frame_rms(samples, lo, hi)
    n = len(rms)
    if n == 0:
        return len(samples) // 2
    lowest = float(rms.min())
    quiet = np.flatnonzero(rms <= lowest + 0.1 * (float(np.median(rms)) - lowest))
    best = int(quiet[np.argmin(np.abs(quiet - (n - 1) / 2))])
    return lo + best * FRAME + FRAME // 2


def speech_share(spans: Spans, start: float, end: float, pad: float = PAD / SAMPLE_RATE) -> float:
    """How much of [start, end] the (ordered, possibly overlapping) spans cover, each widened by
    ``pad`` on both sides, 0..1."""
    if end <= start:
        return 1.0
    covered, reach = 0.0, start
    for a, b in spans:
        a, b = max(a - pad, reach), min(b + pad, end)
        if b > a:
            covered += b - a
            reach = b
    return min(1.0, covered / (end - start))


def is_silent(piece: np.ndarray) -> bool:
    return len(piece) == 0 or float(np.sqrt(np.mean(piece.astype(np.float64) ** 2))) < SILENCE_RMS



@dataclass(frozen=True)
class Chunking:
    """How one request's audio is cut (OpenAI's ``chunking_strategy`` of type ``server_vad``):
    the VAD's speech threshold, the pause that ends a stretch of speech, and the audio kept before
    (and after) each stretch. ``None`` keeps the server's own setting."""

    threshold: float | None = None
    min_silence_seconds: float | None = None
    padding_seconds: float | None = None


class PieceBuilder:
    """Builds pieces from speech segments as the VAD finds them, so that the first pieces go to the
    engine while the rest of the file is still being scanned (or decoded).

    Segments are padded by ``PAD`` (pauses shorter than the padding join two segments) and merged
    while the piece stays within the target length (default: the model's safe length); the silence
    between merged segments rides along. With ``first_seconds`` (streaming) the first pieces are
    short: a piece closes at the first pause after ``first_seconds``, and that length doubles with
    each piece until it reaches the target, so the first text comes early and later pieces keep the
    context a model needs. ``add`` returns the pieces it closed, ``finish`` the rest. Ranges are in
    order and never overlap. ``total`` may be unknown (``None``) while the audio is still decoded:
    the caller then clamps the last end."""

    def __init__(self, total: int | None, max_piece_seconds: float, target_seconds: float | None = None,
                 first_seconds: float | None = None, pad: int = PAD) -> None:
        self.total = total
        self.pad = pad
        limit = int(max_piece_seconds * SAMPLE_RATE)
        self.target = min(limit, int((target_seconds or max_piece_seconds) * SAMPLE_RATE))
        self._early = int(first_seconds * SAMPLE_RATE) if first_seconds else None
        if self._early is not None and self._early >= self.target:
            self._early = None
        self._segment: tuple[int, int] | None = None  # padded, may still grow into the next one
        self._piece: tuple[int, int] | None = None  # may still take the next segment in

    def add(self, start: int, end: int) -> list[tuple[int, int]]:
        speech_start = start
        start, end = max(0, start - self.pad), end + self.pad
        if self.total is not None:
            end = min(self.total, end)
        if end <= start:
            return []
        if self._segment is not None and start <= self._segment[1]:
            if not self._early_due():
                self._segment = (self._segment[0], max(end, self._segment[1]))
                return []
            # An early piece is long enough and the pause is shorter than the padding: cut in the
            # middle of the pause rather than let the first piece run on.
            cut = (self._segment[1] - self.pad + speech_start) // 2
            if speech_start <= self._segment[1] - self.pad or not self._segment[0] < cut < end:  # no real pause
                self._segment = (self._segment[0], max(end, self._segment[1]))
                return []
            self._segment = (self._segment[0], cut)
            start = cut
        closed = self._take(self._segment)
        self._segment = (start, end)
        return closed

    def finish(self) -> list[tuple[int, int]]:
        closed = self._take(self._segment)
        self._segment = None
        if self._piece is not None:
            closed.append(self._piece)
            self._piece = None
        return closed

    def _take(self, segment: tuple[int, int] | None) -> list[tuple[int, int]]:
        if segment is None:
            return []
        closed: list[tuple[int, int]] = []
        if self._piece is not None and segment[1] - self._piece[0] <= self.target:
            self._piece = (self._piece[0], segment[1])
        else:
            if self._piece is not None:
                closed.append(self._piece)
                self._grow()
            self._piece = segment
        if self._early is not None and self._piece[1] - self._piece[0] >= self._early:
            closed.append(self._piece)  # early piece: close at this pause, do not wait for the next one
            self._piece = None
            self._grow()
        return closed

    def _early_due(self) -> bool:
        """An early piece would be long enough if it ended with the pending segment."""
        if self._early is None or self._segment is None:
            return False
        begin = self._piece[0] if self._piece is not None else self._segment[0]
        return self._segment[1] - begin >= self._early

    def _grow(self) -> None:
        if self._early is not None:
            self._early *= 2
            if self._early >= self.target:
                self._early = None


def plan_speech_pieces(total: int, speech: list[tuple[int, int]], max_piece_seconds: float,
                       target_seconds: float | None = None, first_seconds: float | None = None
                       ) -> list[tuple[int, int]]:
    """All pieces for a list of speech segments (``PieceBuilder`` at once)."""
    builder = PieceBuilder(total, max_piece_seconds, target_seconds, first_seconds)
    pieces = [piece for start, end in speech for piece in builder.add(start, end)]
    return pieces + builder.finish()


def split_long(samples: Samples, pieces: list[tuple[int, int]], max_piece_seconds: float) -> list[tuple[int, int]]:
    """Hard-split any piece longer than the model's safe length (speech that never pauses)."""
    return [cut for start, end in pieces for cut in plan_pieces(samples, max_piece_seconds, start, end)]


@dataclass(frozen=True)
class Run:
    """One speaker's turns in a row, as one stretch."""

    start: float
    end: float
    speaker: str


def turn_pieces(turns: Sequence[SpeakerTurn], total: int, max_piece_seconds: float, samples: Samples
                ) -> list[tuple[int, int, str]]:
    """Pieces (start, end sample, speaker) for a model without token times: one speaker's run of
    turns each, padded into the pauses around it (never into the next speaker's), split where a
    run is longer than the model takes. Overlapping turns are cut in the middle of the overlap."""
    runs: list[Run] = []
    for t in turns:
        if runs and runs[-1].speaker == t.speaker:
            runs[-1] = Run(runs[-1].start, max(runs[-1].end, t.end), t.speaker)
        else:
            runs.append(Run(t.start, t.end, t.speaker))
    pad = PAD / SAMPLE_RATE
    bounds: list[tuple[float, float]] = []
    for i, run in enumerate(runs):
        start = run.start - pad if i == 0 else None
        end = run.end + pad if i == len(runs) - 1 else None
        if i > 0:
            prev = runs[i - 1]
            start = (prev.end + run.start) / 2 if run.start <= prev.end else max(run.start - pad,
                                                                                (prev.end + run.start) / 2)
        if i + 1 < len(runs):
            nxt = runs[i + 1]
            end = (run.end + nxt.start) / 2 if nxt.start <= run.end else min(run.end + pad, (run.end + nxt.start) / 2)
        assert start is not None and end is not None
        bounds.append((start, end))
    pieces: list[tuple[int, int, str]] = []
    for run, (start, end) in zip(runs, bounds, strict=True):
        a = max(0, int(start * SAMPLE_RATE))
        b = min(total, int(end * SAMPLE_RATE))
        if pieces:
            a = max(a, pieces[-1][1])
        if b <= a:
            continue
        pieces += [(x, y, run.speaker) for x, y in plan_pieces(samples, max_piece_seconds, a, b)]
    return pieces
