"""Voice activity detection (Silero VAD through sherpa-onnx's Python package) for cutting long audio.

The Silero ONNX file comes from ``VAD_MODEL`` or from the ``silero-vad`` package's data folder
(installed with ``--no-deps``: only the 2 MB model file is needed, not the package's torch).
Without either, the bridge logs it once and cuts by energy alone (``bridge.cutting``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bridge.audio import AudioStream, StreamWindow
from bridge.ports import SAMPLE_RATE

log = logging.getLogger("bridge.vad")
BUFFER_SECONDS = 60.0
REGION_SECONDS = 60.0  # a long file is scanned in regions this long, side by side
LEAD = 0.5  # seconds each region starts before its border
MAX_IDLE = 8  # detectors kept for reuse


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
    """Finds speech in 16 kHz audio. The sherpa-onnx VAD is stateful: each scan takes a detector of
    its own from a small pool (``_acquire``), reset before reuse."""

    def __init__(self, model: Path, *, threshold: float = 0.5, min_silence: float = 0.25,
                 min_speech: float = 0.25) -> None:
        import sherpa_onnx

        self._sherpa = sherpa_onnx
        self.model = model
        self.threshold = threshold
        self.min_silence = min_silence
        self.min_speech = min_speech
        # The detector must be fed exactly one window at a time (longer chunks are not split into
        # windows: checked, they give one segment for the whole file).
        self.window = int(sherpa_onnx.VadModelConfig().silero_vad.window_size)
        # Loading the ONNX model costs ~40 ms: detectors are kept and reset between scans, by
        # their settings (max speech, threshold, min silence).
        self._idle: dict[tuple[float, float, float], list[Any]] = {}
        self._lock = threading.Lock()

    def _settings(self, max_speech: float, threshold: float | None, min_silence: float | None
                  ) -> tuple[float, float, float]:
        return (max_speech, self.threshold if threshold is None else threshold,
                self.min_silence if min_silence is None else min_silence)

    def _acquire(self, key: tuple[float, float, float]) -> Any:
        max_speech, threshold, min_silence = key
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                vad = idle.pop()
                vad.reset()
                return vad
        cfg = self._sherpa.VadModelConfig()
        cfg.silero_vad.model = str(self.model)
        cfg.silero_vad.threshold = threshold
        cfg.silero_vad.min_silence_duration = min_silence
        cfg.silero_vad.min_speech_duration = self.min_speech
        cfg.silero_vad.max_speech_duration = max_speech
        cfg.sample_rate = SAMPLE_RATE
        cfg.num_threads = 1
        cfg.provider = "cpu"
        # The buffer holds the speech segment being built; it grows when needed (with a log line).
        return self._sherpa.VoiceActivityDetector(cfg, buffer_size_in_seconds=BUFFER_SECONDS)

    def _release(self, key: tuple[float, float, float], vad: Any) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < MAX_IDLE:
                idle.append(vad)

    def speech_segments(self, samples: np.ndarray, max_speech: float = 3600.0, *, threshold: float | None = None,
                        min_silence: float | None = None) -> list[tuple[int, int]]:
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
        key = self._settings(max_speech, threshold, min_silence)
        vad = self._acquire(key)
        try:
            yield from self._scan(vad, stream, stop)
        finally:
            self._release(key, vad)

    def iter_segments_parallel(self, stream: AudioStream, *, workers: int, stop: threading.Event,
                               region_seconds: float = REGION_SECONDS, threshold: float | None = None,
                               min_silence: float | None = None) -> Iterator[tuple[int, int]]:
        """Like ``iter_segments``, with up to ``workers`` regions of the file scanned side by side
        (one Silero pass scans a few hundred seconds of audio per second of one core, which bounds
        long files once the engine is fast). Region k scans ``LEAD`` seconds before its start, so
        speech that crosses a border is found by both sides and comes out as overlapping segments,
        which ``PieceBuilder`` merges. Segments come out in order of their regions."""
        if workers <= 1:
            yield from self.iter_segments(stream, stop=stop, threshold=threshold, min_silence=min_silence)
            return
        region, lead = int(region_seconds * SAMPLE_RATE), int(LEAD * SAMPLE_RATE)
        queues: list[queue.Queue[tuple[int, int] | BaseException | None]] = []

        def scan(k: int) -> None:
            lower_thread_priority()
            start = max(0, k * region - lead)
            out = queues[k]
            try:
                for a, b in self.iter_segments(stream.window(start, (k + 1) * region), stop=stop,
                                               threshold=threshold, min_silence=min_silence):
                    out.put((start + a, start + b))
                out.put(None)
            except BaseException as exc:  # noqa: BLE001 - raised in order by the reader
                out.put(exc)

        def launch() -> None:
            queues.append(queue.Queue())
            threading.Thread(target=scan, args=(len(queues) - 1,), daemon=True,
                             name=f"vad-region-{len(queues) - 1}").start()

        def reaches(k: int) -> bool:  # the file may have audio in region k
            return not stream.done or stream.available > k * region

        current = 0
        launch()
        while current < len(queues):
            # More regions while fewer than ``workers`` run and the file may reach them.
            while len(queues) - current < workers and reaches(len(queues)):
                launch()
            try:
                item = queues[current].get(timeout=0.25)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is None:
                current += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def _scan(self, vad: Any, stream: AudioStream | StreamWindow, stop: threading.Event | None
              ) -> Iterator[tuple[int, int]]:
        window = self.window
        step = window * 32  # ~1 s of audio between hand-overs

        def drain() -> Iterator[tuple[int, int]]:
            while not vad.empty():
                seg = vad.front
                yield int(seg.start), int(seg.start) + len(seg.samples)
                vad.pop()

        pos = 0
        while True:
            stream.wait_samples(pos + step, stop)
            if stop is not None and stop.is_set():
                return
            done = stream.done  # read before the count: once done, the count is final
            available = stream.available
            end = min(pos + step, available)  # a step at a time, so closed segments go out at once
            if not done:
                end -= (end - pos) % window
            data = stream.view(pos, end)
            for offset in range(0, len(data), window):
                vad.accept_waveform(data[offset:offset + window])
            pos = end
            yield from drain()
            if done and pos >= available:
                break
        vad.flush()
        yield from drain()
