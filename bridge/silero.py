"""Silero VAD (v5 and later) through onnxruntime, several streams in one model run.

sherpa-onnx's ``VoiceActivityDetector`` runs the model on one 32 ms window per call; the call's
own cost is most of a scan's CPU time. Here the windows of several streams (the regions of a long
file, ``bridge.vad``) go through the model together, one batch row each, and a round of up to 32
windows of each is one run of the graph rebuilt for it (``bridge.silero_graph``: the convolutions
over every window at once, then the LSTM over the round). Measured with ``bench/bench_vad.py`` on
597 s of speech, the bridge's 16 regions at 8 kHz scan 16x as much audio per CPU second as
sherpa-onnx's detector, and 4.3x as much as the same regions with the exported model run per
window, with the same segments.

``SegmentTracker`` turns one stream's probabilities into speech segments exactly as sherpa-onnx
1.13.3 does (``silero-vad-model.cc`` ``IsSpeech`` and ``voice-activity-detector.cc``
``AcceptWaveform``/``Flush``): the threshold with its 0.15 hysteresis, the minimum speech and
silence, the look-back before a start, and past ``max_speech`` a threshold of 0.9 and a minimum
silence of 0.1 s until the segment ends. A window is 576 samples (64 of context and 512 new), one
every 512 samples.

The model also runs at 8 kHz (its own 8 kHz branch: 256 new samples and 32 of context per 32 ms
window), for about half the CPU of a 16 kHz scan in a batch (``bench/bench_vad.py``). The windows
stay those of the 16 kHz scan, each one's samples halved by averaging pairs (``halve``), so
``SegmentTracker`` and every position stay in 16 kHz samples.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bridge.vad")

SAMPLE_RATE = 16000
SHIFT = 512  # new samples per window
WINDOW = 576  # what the model reads: 64 samples of context, then the 512 new ones
STATE = (2, 1, 128)  # one stream's LSTM state
RATES = (8000, 16000)  # what the model runs at


def f32(x: float) -> float:
    """``x`` as the C++ code holds it (a float), so that comparisons match sherpa-onnx's."""
    return float(np.float32(x))


class SileroModel:
    """The ONNX model, shared by every scan (onnxruntime runs may be concurrent). A round of
    windows is one run of the graph rebuilt for it (``bridge.silero_graph``), checked against the
    exported model when loaded; where that check fails, one run per window of the exported model."""

    def __init__(self, path: Path, rate: int = SAMPLE_RATE) -> None:
        import onnxruntime as ort

        if rate not in RATES:
            raise ValueError(f"Silero VAD runs at 8000 or 16000 Hz, not {rate}")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # scans run side by side instead
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = sorted(i.name for i in self.session.get_inputs())
        if names != ["input", "sr", "state"]:
            raise ValueError(f"{path} is not a Silero VAD v5 model (inputs {names}; want input, state, sr)")
        self.rate = rate
        self._rate = np.array(rate, np.int64)
        self.rounds = self._rounds_session(path, opts)

    def run(self, windows: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Speech probabilities of ``windows`` (streams x windows x ``WINDOW`` samples at 16 kHz, or
        ``WINDOW // 2`` at 8 kHz: each stream's next windows in order), and each stream's state
        after its last window."""
        state = states[0] if len(states) == 1 else np.concatenate(states, axis=1)
        if self.rounds is not None:
            by_window = np.ascontiguousarray(windows.transpose(1, 0, 2), np.float32)
            probs, state = self.rounds.run(None, {"windows": by_window, "state": state})
            probs = probs.T
        else:
            probs, state = self._run_exported(windows, state)
        # Each stream's own copy: a view would keep the whole batch's state alive with every region
        # that ever ran in it (16 KB each; 11 MB over the 720 regions of three hours).
        return probs, [state[:, i:i + 1].copy() for i in range(len(states))]

    def _run_exported(self, windows: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exported model, one run per window position with a batch row per stream."""
        probs = np.empty(windows.shape[:2], np.float32)
        for j in range(windows.shape[1]):
            out, state = self.session.run(None, {"input": windows[:, j], "state": state, "sr": self._rate})
            probs[:, j] = out[:, 0]
        return probs, state

    def _rounds_session(self, path: Path, opts: Any) -> Any:
        """The rebuilt graph's session, if it gives the exported model's probabilities (to 1e-4)
        and states on noise; otherwise None, logged once."""
        import onnxruntime as ort

        from bridge import silero_graph

        window = WINDOW * self.rate // SAMPLE_RATE  # the model's input at its rate (8 kHz: halved)
        try:
            session = ort.InferenceSession(silero_graph.build(path, self.rate, window), opts,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any model the rebuild cannot read runs as exported
            log.warning("Silero VAD runs window by window (%s: %s)", type(exc).__name__, exc)
            return None
        noise = np.random.default_rng(0).standard_normal((3, 12, window))
        windows = (noise * 0.1).astype(np.float32)
        state = np.zeros((2, 3, STATE[2]), np.float32)
        want, want_state = self._run_exported(windows, state)
        got, got_state = session.run(None, {"windows": np.ascontiguousarray(windows.transpose(1, 0, 2)),
                                            "state": state})
        if np.abs(got.T - want).max() > 1e-4 or np.abs(got_state - want_state).max() > 1e-3:
            log.warning("Silero VAD runs window by window: the rebuilt graph does not match %s", path)
            return None
        return session


def windows_of(samples: np.ndarray, count: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The first ``count`` windows of ``samples`` (16 kHz: one every ``SHIFT``, as a view), as the
    model reads them at ``rate`` (8 kHz: the same windows, halved)."""
    if rate != SAMPLE_RATE:
        samples, shift, window = halve(samples[:(count - 1) * SHIFT + WINDOW]), SHIFT // 2, WINDOW // 2
    else:
        shift, window = SHIFT, WINDOW
    return np.lib.stride_tricks.as_strided(samples, (count, window), (shift * samples.strides[0], samples.strides[0]),
                                           writeable=False)


def halve(samples: np.ndarray) -> np.ndarray:
    """16 kHz audio at 8 kHz: the mean of each pair of samples (a gentle low-pass; what folds down
    from above 4 kHz is faint in speech). The calls differ from 16 kHz on about 1.4 % of windows,
    with no word lost through the bridge (``tests/test_vad.py``, bench/README.md)."""
    even = samples[:len(samples) // 2 * 2]
    return (even[0::2] + even[1::2]) * np.float32(0.5)


class SegmentTracker:
    """One stream's speech segments from its windows' probabilities (sherpa-onnx's logic, above).
    Positions are samples from the stream's start."""

    def __init__(self, *, threshold: float, min_silence: float, min_speech: float, max_speech: float) -> None:
        self.threshold = f32(threshold)
        self.min_silence = int(SAMPLE_RATE * f32(min_silence))
        self.min_speech = int(SAMPLE_RATE * f32(min_speech))
        self.max_length = int(SAMPLE_RATE * f32(max_speech))
        self.state = np.zeros(STATE, np.float32)
        self.windows = 0  # windows seen; the next one starts at windows * SHIFT
        self.head = 0  # the oldest sample sherpa-onnx's buffer still holds
        self.start = -1  # where the open segment starts, -1: none
        self.triggered = False
        self.temp_start = 0
        self.temp_end = 0

    def push(self, prob: float) -> tuple[int, int] | None:
        """The next window's probability; a segment when this window closes one."""
        long = self.windows * SHIFT - self.head > self.max_length  # what is buffered before this window
        threshold = f32(0.9) if long else self.threshold
        min_silence = int(SAMPLE_RATE * f32(0.1)) if long else self.min_silence
        self.windows += 1
        tail = self.windows * SHIFT
        if self._is_speech(prob, tail, threshold, min_silence):
            if self.start == -1:
                self.start = max(tail - 2 * WINDOW - self.min_speech, self.head)
            return None
        segment = None
        if self.start != -1 and tail > self.head:
            end = tail - min_silence
            if end > self.start:
                segment = (self.start, end)
            self.head = max(self.head, end)
        elif self.start == -1:
            self.head = max(self.head, tail - 2 * WINDOW - self.min_speech)
        self.start = -1
        return segment

    def flush(self) -> tuple[int, int] | None:
        """The open segment, at the end of the stream."""
        tail = self.windows * SHIFT
        if self.start == -1 or tail <= self.start:
            self.start = -1
            return None
        segment = (self.start, tail)
        self.head, self.start = tail, -1
        return segment

    def _is_speech(self, prob: float, current: int, threshold: float, min_silence: int) -> bool:
        if prob > threshold and self.temp_end != 0:
            self.temp_end = 0
        if prob > threshold and self.temp_start == 0:
            self.temp_start = current  # speech may start: it must last min_speech
            return False
        if prob > threshold and self.temp_start != 0 and not self.triggered:
            if current - self.temp_start < self.min_speech:
                return False
            self.triggered = True
            return True
        if prob < threshold and not self.triggered:
            self.temp_start = self.temp_end = 0
            return False
        if prob > max(f32(threshold - f32(0.15)), f32(0.01)) and self.triggered:
            return True
        if prob > threshold and not self.triggered:
            self.triggered = True
            return True
        if prob < threshold and self.triggered:
            if self.temp_end == 0:
                self.temp_end = current
            if current - self.temp_end < min_silence:
                return True
            self.temp_start = self.temp_end = 0
            self.triggered = False
            return False
        return False
