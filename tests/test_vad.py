"""The bridge's Silero scan (``bridge.vad`` over ``bridge.silero``): at 16 kHz, the segments
sherpa-onnx's own detector finds, on real speech, with every setting a request can change; at 8 kHz
(the default, half the CPU), the same speech; and regions of a file scanned in one model run find
what each region finds scanned alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bench.bench_noisy import mix, pink_noise, unit
from bridge.decoding.stream import AudioStream
from bridge.vad import SpeechDetector, find_vad_model
from tests.speech import librispeech_samples

# Eight speakers; pauses of 0.3-1.0 s between them, and pink noise at 20 dB under all of it, so
# that the speech probability often hovers near the thresholds.
UTTERANCES = ["1089-134686-0000", "1688-142285-0000", "367-130732-0001", "1998-15444-0001", "2033-164914-0002",
              "2414-128291-0003", "3080-5032-0001", "533-1066-0002", "1089-134691-0001", "1688-142285-0002"]
RATE = 16000


@pytest.fixture(scope="module")
def model():
    path = find_vad_model(None)
    if path is None:
        pytest.skip("no Silero VAD model")
    return path


@pytest.fixture(scope="module")
def talk() -> np.ndarray:
    rng = np.random.default_rng(7)
    parts = []
    for u in UTTERANCES:
        parts += [librispeech_samples(u), np.zeros(int(RATE * rng.uniform(0.3, 1.0)), np.float32)]
    speech = np.concatenate(parts)
    return mix(speech, unit(pink_noise(len(speech), rng)), 20)


def sherpa_segments(model, samples: np.ndarray, *, threshold: float = 0.5, min_silence: float = 0.25,
                    max_speech: float = 3600.0) -> list[tuple[int, int]]:
    """sherpa-onnx's VoiceActivityDetector, fed one 512-sample window per call as the bridge fed it."""
    import sherpa_onnx

    cfg = sherpa_onnx.VadModelConfig()
    cfg.silero_vad.model = str(model)
    cfg.silero_vad.threshold = threshold
    cfg.silero_vad.min_silence_duration = min_silence
    cfg.silero_vad.min_speech_duration = 0.25
    cfg.silero_vad.max_speech_duration = max_speech
    cfg.sample_rate = RATE
    cfg.num_threads = 1
    vad = sherpa_onnx.VoiceActivityDetector(cfg, buffer_size_in_seconds=60)
    found = []

    def drain() -> None:
        while not vad.empty():
            found.append((int(vad.front.start), int(vad.front.start) + len(vad.front.samples)))
            vad.pop()

    for offset in range(0, len(samples), 512):
        vad.accept_waveform(samples[offset:offset + 512])
        drain()
    vad.flush()
    drain()
    return found


@pytest.mark.parametrize("settings", [
    {},
    {"max_speech": 6.0},  # past it: threshold 0.9 and 0.1 s of silence until the segment ends
    {"threshold": 0.3, "min_silence": 0.6},  # a request's chunking_strategy
    {"threshold": 0.75, "min_silence": 0.1},
], ids=["defaults", "max-speech", "low-threshold", "high-threshold"])
def test_the_scan_finds_sherpa_onnx_segments_on_real_speech(model, talk, settings):
    ours = SpeechDetector(model, rate=16000).speech_segments(talk, **settings)
    theirs = sherpa_segments(model, talk, **settings)
    assert len(theirs) >= 8
    assert ours == theirs


def speech_mask(segments: list[tuple[int, int]], length: int) -> np.ndarray:
    mask = np.zeros(length, bool)
    for a, b in segments:
        mask[a:b] = True
    return mask


def test_the_scan_at_8khz_finds_the_speech_of_the_16khz_scan(model, talk):
    """The default scan runs Silero at 8 kHz (each window's samples halved): it must call speech
    and pauses where the 16 kHz scan (sherpa-onnx's, above) does, on noisy real speech."""
    full = SpeechDetector(model, rate=16000).speech_segments(talk)
    half = SpeechDetector(model, rate=8000).speech_segments(talk)
    assert SpeechDetector(model).silero.rate == 8000
    agree = np.mean(speech_mask(full, len(talk)) == speech_mask(half, len(talk)))
    assert agree >= 0.96, f"8 and 16 kHz scans agree on {agree:.1%} of the audio"
    assert abs(len(half) - len(full)) <= max(2, len(full) // 8), (len(half), len(full))


@pytest.mark.parametrize("rate", [8000, 16000])
def test_regions_in_one_model_run_find_what_each_finds_alone(model, talk, rate):
    """Sixteen regions go through the model together (one batch row each): each must find exactly
    what it finds scanned on its own, so no region's state leaks into another's."""
    detector = SpeechDetector(model, rate=rate)
    region = len(talk) // 16 + 1
    stream = AudioStream.from_samples(talk)
    together = list(detector.iter_segments_parallel(stream, workers=16, stop=threading.Event(),
                                                     region_seconds=region / RATE))
    alone = []
    for k in range(16):
        start = max(0, k * region - RATE // 2) // 512 * 512  # LEAD (0.5 s) early, on the windows' grid
        window = stream.window(start, (k + 1) * region)
        alone += [(start + a, start + b) for a, b in detector.iter_segments(window)]
    assert len(together) >= 16
    assert together == alone


@pytest.mark.parametrize("chunk_seconds, pause", [(0.5, 0.002), (6.0, 0.03)], ids=["trickled", "in-bursts"])
def test_the_cuts_do_not_depend_on_how_fast_the_audio_is_decoded(model, talk, chunk_seconds, pause):
    """The same file gives the same pieces, however far the decoder is ahead of the scan: the
    regions of a long file lie on fixed borders, so a transcript does not change from one request
    to the next (regions split where the scan had got when decoding ended did)."""
    detector = SpeechDetector(model)
    region = 12.0  # the talk is 7 regions long: fewer than the 16 rows, as in a short file

    def scan(stream: AudioStream) -> list[tuple[int, int]]:
        return list(detector.iter_segments_parallel(stream, workers=16, stop=threading.Event(), region_seconds=region))

    decoded = scan(AudioStream.from_samples(talk))
    stream = AudioStream(len(talk) / RATE + 1)
    found: list[tuple[int, int]] = []
    scanner = threading.Thread(target=lambda: found.extend(scan(stream)))
    scanner.start()
    step = int(chunk_seconds * RATE)
    for offset in range(0, len(talk), step):
        stream.append(talk[offset:offset + step])
        time.sleep(pause)
    stream.finish()
    scanner.join(60)
    assert len(decoded) >= 8
    assert found == decoded


def test_a_long_scan_holds_no_more_than_a_short_one(model, talk):
    """Regions scanned side by side are let go once their segments are handed on, and keep no
    view of a batch's model state: the scan of 44 minutes holds what the scan of 4 minutes holds
    (hours of audio are hundreds of regions). Counted in bytes traced, not in time."""
    import tracemalloc

    detector = SpeechDetector(model)

    def peak(minutes: int) -> int:
        samples = np.tile(talk, int(minutes * 60 * 16000 / len(talk)) + 1)[: minutes * 60 * 16000]
        stream = AudioStream.from_samples(samples)
        tracemalloc.start()
        try:
            found = list(detector.iter_segments_parallel(stream, workers=16, stop=threading.Event()))
            held = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert found
        return held

    # Measured: 55-86 KB more (the segments found); with every region kept, 2 KB more a region
    # (160 regions: +340 KB), and with each holding a batch's state, 16 KB a region.
    short, long = peak(4), peak(44)
    assert long - short < 200 * 1024, f"the scan held {(long - short) / 1024:.0f} KB more for 44 minutes than for 4"


class CountedRuns:
    """An onnxruntime session that counts its runs."""

    def __init__(self, session) -> None:
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def test_a_round_of_windows_is_one_model_run(model, talk):
    """The scan's speed: each round (up to 32 windows of each of up to 16 regions) is one run of the
    rebuilt graph, where the exported model takes one run per window. Counted, not timed: the
    rounds a region needs, and not one run of the exported model."""
    detector = SpeechDetector(model)
    assert detector.silero.rounds is not None, "the rebuilt graph was not taken"
    rounds, exported = CountedRuns(detector.silero.rounds), CountedRuns(detector.silero.session)
    detector.silero.rounds, detector.silero.session = rounds, exported
    region = len(talk) // 16 + 1
    found = list(detector.iter_segments_parallel(AudioStream.from_samples(talk), workers=16, stop=threading.Event(),
                                                 region_seconds=region / RATE))
    windows = (region + RATE // 2) // 512  # a region's windows, its lead included
    assert found
    assert exported.runs == 0
    print(f"{rounds.runs} runs for 16 regions of {windows} windows")
    assert rounds.runs <= 3 * (windows // 32 + 1), f"{rounds.runs} runs for 16 regions of {windows} windows"


def test_a_rebuilt_graph_that_differs_from_the_model_is_not_used(model, talk, monkeypatch, caplog):
    """The rebuilt graph is checked against the exported model when it loads: one that gives other
    probabilities (here its output's bias moved) is refused, with a warning, and the scan runs the
    exported model window by window, finding what the rebuilt graph finds."""
    import onnx
    from onnx import numpy_helper

    from bridge import silero_graph

    good = SpeechDetector(model).speech_segments(talk)
    build = silero_graph.build

    def moved_bias(path, rate, window):
        graph = onnx.load_from_string(build(path, rate, window))
        bias = next(t for t in graph.graph.initializer if t.name == "head_b")
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.5), "head_b"))
        return graph.SerializeToString()

    monkeypatch.setattr(silero_graph, "build", moved_bias)
    with caplog.at_level("WARNING", logger="bridge.vad"):
        detector = SpeechDetector(model)
    assert detector.silero.rounds is None
    assert "does not match" in caplog.text
    assert detector.speech_segments(talk) == good
