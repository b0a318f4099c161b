"""Voice activity detection (Silero VAD through onnxruntime, ``bridge.silero``) for cutting long audio.

The Silero ONNX file comes from ``VAD_MODEL`` or from the ``silero-vad`` package's data folder
(installed with ``--no-deps``: only the 2 MB model file is needed, not the package's torch).
Without either, the bridge logs it once and cuts by energy alone (``bridge.cutting``).

A long file is scanned in regions of 15 s laid out by the file alone, up to 16 side by side in one
model run (``iter_segments_parallel``), and a round of up to 32 windows of each is one run
(``bridge.silero``): the exported model's per-call cost, not its arithmetic, was most of a scan's
CPU time. Silero runs at 8 kHz by default (``VAD_SAMPLE_RATE``, ``bridge.silero``): half the CPU
of 16 kHz, and its cuts lose no words (bench/README.md).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bridge.decoding.stream import AudioStream, StreamWindow
from bridge.ports import SAMPLE_RATE
from bridge.silero import SHIFT, WINDOW, SegmentTracker, SileroModel, windows_of

log = logging.getLogger("bridge.vad")
REGION_SECONDS = 15.0  # a long file is scanned in regions this long, up to 16 side by side (10 min: 40 regions)
LEAD = 0.5  # seconds each region starts before its border
ALONE_SECONDS = 20.0  # the first region is scanned alone this far (the first pieces wait for it)
STEP_WINDOWS = 32  # windows of each region per round (~1 s of audio) before segments are handed on
VAD_RATE = 8000  # Silero's rate (VAD_SAMPLE_RATE): half the CPU of 16 kHz, cuts in the same pauses


def find_vad_model(configured: Path | None) -> Path | None:
    if configured is not None:
        return configured if configured.is_file() else None
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
    return path if path.is_file() else None


VAD_NICE = 10  # how much lower than the engine's the scans' CPU priority is


def lower_thread_priority() -> None:
    """Run the calling thread at a lower CPU priority (Linux: a thread is a task of its own).

    Scanning a long upload is work ahead of time: on a CPU engine it must not slow down the pieces
    being transcribed for everyone (a short request beside a long upload stays fast). Where the
    cores are idle (a GPU engine) it changes nothing. Never raised back: the thread is the scan's."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + VAD_NICE))
    except (AttributeError, OSError):
        pass


class SpeechDetector:
    """Finds speech in 16 kHz audio: sherpa-onnx 1.13.3's Silero detector, segment for segment
    (``bridge.silero``), with the windows of several regions of a file in one model run."""

    def __init__(self, model: Path, *, threshold: float = 0.5, min_silence: float = 0.25,
                 min_speech: float = 0.25, rate: int = VAD_RATE) -> None:
        self.model = model
        self.threshold = threshold
        self.min_silence = min_silence
        self.min_speech = min_speech
        self.silero = SileroModel(model, rate)

    def _tracker(self, max_speech: float, threshold: float | None, min_silence: float | None) -> SegmentTracker:
        return SegmentTracker(threshold=self.threshold if threshold is None else threshold,
                              min_silence=self.min_silence if min_silence is None else min_silence,
                              min_speech=self.min_speech, max_speech=max_speech)

    def speech_segments(self, samples: np.ndarray | AudioStream, max_speech: float = 3600.0, *,
                        threshold: float | None = None, min_silence: float | None = None) -> list[tuple[int, int]]:
        """(start, end) sample ranges of speech, in order."""
        return list(self.iter_segments(samples, max_speech=max_speech, threshold=threshold, min_silence=min_silence))

    def iter_segments(self, samples: np.ndarray | AudioStream | StreamWindow, *, max_speech: float = 3600.0,
                      stop: threading.Event | None = None, threshold: float | None = None,
                      min_silence: float | None = None) -> Iterator[tuple[int, int]]:
        """Speech segments as soon as the detector closes them, in order; stops early once ``stop``
        is set (the request went away). ``samples`` may still be growing (an ``AudioStream`` being
        decoded): the scan then follows the decoder. ``threshold`` and ``min_silence`` (seconds)
        replace the detector's own for this scan (a request's ``chunking_strategy``)."""
        stream = AudioStream.from_samples(samples) if isinstance(samples, np.ndarray) else samples
        region = _Region(stream, 0, self._tracker(max_speech, threshold, min_silence))
        yield from self._scan([region], lambda regions: False, stop)

    def iter_segments_parallel(self, stream: AudioStream, *, workers: int, stop: threading.Event,
                               region_seconds: float = REGION_SECONDS, threshold: float | None = None,
                               min_silence: float | None = None) -> Iterator[tuple[int, int]]:
        """Like ``iter_segments``, with up to ``workers`` regions of the file scanned side by side in
        one model run. Region k scans ``LEAD`` seconds before its start, so speech that crosses a
        border is found by both sides and comes out as overlapping segments, which ``PieceBuilder``
        merges. A region joins once the decoder has reached it and the first region has been
        scanned ``ALONE_SECONDS`` (the first pieces wait for that one). Segments come out in order
        of their regions. Where the regions lie depends on the file alone, never on how far the
        decoder is ahead of the scan, so a file is cut the same way on every request."""
        if workers <= 1:
            yield from self.iter_segments(stream, stop=stop, threshold=threshold, min_silence=min_silence)
            return
        layout = _Layout(stream, workers, int(region_seconds * SAMPLE_RATE),
                         lambda: self._tracker(3600.0, threshold, min_silence))
        yield from self._scan([], layout.more, stop, stream)

    def _scan(self, regions: list[_Region], more: Callable[[list[_Region]], bool], stop: threading.Event | None,
              stream: AudioStream | StreamWindow | None = None) -> Iterator[tuple[int, int]]:
        """Runs the model over every region that has audio for it, all in one batch, until each is
        at its end and ``more`` adds no region (``stream``: what to wait on while no region is
        open); hands on the segments in order of the regions, and lets go of each region once its
        segments are handed on (a file of hours has hundreds)."""
        coming = True
        while True:
            if coming:
                coming = more(regions)
            ready = []
            for region in regions:
                if region.finished:
                    continue
                done = region.source.done  # read before the count: once done, the count is final
                if region.step():
                    ready.append(region)
                elif done:
                    region.finish()
            if ready:
                self._run(ready)
            while regions:  # the first is the region whose segments go out now
                region = regions[0]
                while region.found:
                    yield region.found.popleft()
                if not region.finished:
                    break
                regions.pop(0)
            if (not regions and not coming) or (stop is not None and stop.is_set()):
                return
            if not ready:  # every open region is at the decoder's front, or none is open yet
                waiting = next((r for r in regions if not r.finished), None)
                if waiting is not None:
                    waiting.source.wait_samples(waiting.tracker.windows * SHIFT + WINDOW, stop)
                elif stream is not None:
                    stream.wait_samples(stream.available + 1, stop)

    def _run(self, ready: list[_Region]) -> None:
        """The next windows of each ready region (as many as all of them have, up to
        ``STEP_WINDOWS``): one model run per window, a batch row per region."""
        steps = min(r.step() for r in ready)
        windows = np.stack([r.windows(steps, self.silero.rate) for r in ready])
        probs, states = self.silero.run(windows, [r.tracker.state for r in ready])
        for r, region_probs, state in zip(ready, probs.tolist(), states, strict=True):
            r.tracker.state = state
            for p in region_probs:
                r.push(p)


class _Layout:
    """Where the regions of one file lie: region k covers k * ``size`` .. (k + 1) * ``size`` of the
    file and is scanned from ``LEAD`` before its start; ``placed`` of them are placed so far."""

    def __init__(self, stream: AudioStream, workers: int, size: int, tracker: Callable[[], SegmentTracker]) -> None:
        self.stream, self.workers, self.size, self.tracker = stream, workers, size, tracker
        self.placed = 0

    def more(self, regions: list[_Region]) -> bool:
        """Adds the regions the scan may start now; False once no region will come any more."""
        stream, size, lead = self.stream, self.size, int(LEAD * SAMPLE_RATE)
        while True:
            if stream.done and stream.available <= self.placed * size:
                return any(not r.finished for r in regions)  # every region is placed
            # On the windows' grid of a scan from the file's start, so that a region's segment
            # bounds fall on one pass's grid, in the pauses where it cuts (off the grid, every
            # bound past the first region moves by up to 32 ms).
            start = max(0, self.placed * size - lead) // SHIFT * SHIFT
            first = regions[0] if regions else None  # the file's first region has offset 0
            if first is not None and first.offset == 0 and not first.finished \
                    and first.tracker.windows * SHIFT < ALONE_SECONDS * SAMPLE_RATE:
                return True
            if sum(not r.finished for r in regions) >= self.workers or stream.available <= start:
                return True
            self.placed += 1
            regions.append(_Region(stream.window(start, self.placed * size), start, self.tracker()))


@dataclass(eq=False)
class _Region:
    """One stretch of the audio being scanned: its reader, where it starts in the file, its tracker,
    and the segments it found that are not handed on yet (in file positions)."""

    source: AudioStream | StreamWindow
    offset: int
    tracker: SegmentTracker
    found: deque[tuple[int, int]] = field(default_factory=deque)
    finished: bool = False

    def step(self) -> int:
        """How many of its next windows the audio holds now (at most ``STEP_WINDOWS``)."""
        have = (self.source.available - self.tracker.windows * SHIFT - WINDOW) // SHIFT + 1
        return max(0, min(STEP_WINDOWS, have))

    def windows(self, count: int, rate: int) -> np.ndarray:
        """Its next ``count`` windows, as the model reads them at ``rate``."""
        at = self.tracker.windows * SHIFT
        return windows_of(self.source.view(at, at + (count - 1) * SHIFT + WINDOW), count, rate)

    def push(self, prob: float) -> None:
        segment = self.tracker.push(prob)
        if segment is not None:
            self.found.append((self.offset + segment[0], self.offset + segment[1]))

    def finish(self) -> None:
        """The audio ended: close the open segment."""
        segment = self.tracker.flush()
        if segment is not None:
            self.found.append((self.offset + segment[0], self.offset + segment[1]))
        self.finished = True
