"""Long audio: cut at pauses, transcribed in order with true times, fair to short requests, and
streamed piece by piece (issue: long audio, fair concurrency, streaming and timestamps)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bridge.cutting import plan_pieces, plan_speech_pieces, split_long
from bridge.silero import SHIFT
from bridge.transcription import cut_pieces
from bridge.vad import SpeechDetector, find_vad_model
from tests.conftest import BECKETT_TEXT, BridgeProcess, bridge_env
from tests.helpers import normalize, transcribe, wer
from tests.speech import HARVARD, festival_wav, have_festival, read_wav16, write_wav16

pytestmark = pytest.mark.skipif(not have_festival(), reason="festival/sox not installed")

PAUSES = [0.3, 0.6, 1.0, 1.5, 2.5, 0.4, 0.8]


def trim(a: np.ndarray, level: float = 2e-3) -> np.ndarray:
    loud = np.flatnonzero(np.abs(a) > level)
    return a[loud[0]:loud[-1] + 1] if len(loud) else a


def build(seconds: float, pause_of, out: Path) -> tuple[Path, list[tuple[str, float, float]]]:
    """Sentences (cycled) separated by pauses until ``seconds``; returns the file and the truth."""
    clips = {s: trim(read_wav16(festival_wav(s))) for s in HARVARD}
    parts, truth, pos, i = [], [], 0, 0
    while True:
        sentence = HARVARD[i % len(HARVARD)]
        clip = clips[sentence]
        gap = np.zeros(int(pause_of(i) * 16000), dtype=np.float32)
        if (pos + len(clip) + len(gap)) / 16000 > seconds:
            break
        truth.append((sentence, pos / 16000, (pos + len(clip)) / 16000))
        parts += [clip, gap]
        pos += len(clip) + len(gap)
        i += 1
    audio = np.concatenate(parts + [np.zeros(int(seconds * 16000) - pos, dtype=np.float32)])
    return write_wav16(out, audio), truth


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("long")


def test_five_minutes_cut_at_pauses(bridge, five_minutes, five_minutes_answer):
    path, truth = five_minutes
    one_by_one = {}
    for sentence in HARVARD:
        r = transcribe(bridge.url, festival_wav(sentence))
        one_by_one[sentence] = r.json()["text"]
    reference = " ".join(s for s, _, _ in truth)
    baseline = wer(reference, " ".join(one_by_one[s] for s, _, _ in truth))

    body = five_minutes_answer["body"]
    cut = wer(reference, body["text"])
    print(f"5 min: WER cut {cut:.3f}, one by one {baseline:.3f}, {len(body['segments'])} segments")
    assert cut <= baseline + 0.01
    # Clean speech: no check fires, nothing is transcribed twice (bridge.guard).
    guard_before, guard_after = five_minutes_answer["guard_before"], five_minutes_answer["guard_after"]
    assert guard_after["failed_checks"] == guard_before["failed_checks"], guard_after
    assert guard_after["retried"] == guard_before["retried"]
    assert body["duration"] == pytest.approx(300, abs=0.1)
    segments = body["segments"]
    assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(segments, segments[1:], strict=False))
    for sentence, start, end in truth:
        assert any(seg["start"] - 0.5 <= start and end <= seg["end"] + 0.5 for seg in segments), \
            (sentence, start, end)


def test_ten_minutes_transcribe(bridge, work):
    path, truth = build(599, lambda i: 16.0, work / "ten-minutes.wav")
    r = transcribe(bridge.url, path, timeout=600, response_format="verbose_json")
    assert r.status_code == 200, r.text
    assert r.json()["duration"] == pytest.approx(599, abs=0.1)
    assert wer(" ".join(s for s, _, _ in truth), r.json()["text"]) <= 0.15
    assert r.json()["segments"][-1]["end"] > 560


def test_speech_without_pauses_is_hard_split(bridge, work):
    sentences = HARVARD + HARVARD
    clips = [trim(read_wav16(festival_wav(s))) for s in sentences]
    audio = np.concatenate(clips)
    assert len(audio) / 16000 > 40  # longer than Moonshine's 30 s pieces, with no pause to cut at
    path = write_wav16(work / "no-pause.wav", audio)
    r = transcribe(bridge.url, path, timeout=300, response_format="verbose_json")
    assert r.status_code == 200
    body = r.json()
    assert len(body["segments"]) >= 2
    assert all(seg["end"] - seg["start"] <= 30.01 for seg in body["segments"])
    assert wer(" ".join(sentences), body["text"]) <= 0.2


class HeldDetector(SpeechDetector):
    """The real Silero detector, whose model waits (up to 30 s) once the scan has run it over
    ``hold_at`` samples, until the test lets it go on; it notes how far the scan got and when it
    ended."""

    def __init__(self, model, hold_at: int):
        super().__init__(model)
        self.hold_at = hold_at
        self.go = threading.Event()
        self.let_go: bool | None = None  # True: the test let it go; False: the wait timed out
        self.scanned = 0  # samples the model has been run over
        self.finished = threading.Event()
        self.run_model = self.silero.run
        self.silero.run = self.held_run

    def held_run(self, windows, states):
        if self.let_go is None and self.scanned > self.hold_at:
            self.let_go = self.go.wait(30)
        self.scanned += windows.shape[1] * SHIFT
        return self.run_model(windows, states)

    def iter_segments(self, samples, **kw):
        try:
            yield from super().iter_segments(samples, **kw)
        finally:
            self.finished.set()


def test_pieces_go_out_while_the_vad_is_still_scanning(five_minutes):
    """The engine gets the first piece while the VAD is still scanning, the pieces are those the
    whole-file plan gives, and a request that goes away stops the scan. Made certain rather than
    timed: the scan waits a minute into the file until the first piece has come."""
    model = find_vad_model(None)
    if model is None:
        pytest.skip("no Silero VAD model")
    samples = read_wav16(five_minutes[0])
    whole = split_long(samples, plan_speech_pieces(len(samples), SpeechDetector(model).speech_segments(samples),
                                                   30), 30)
    minute = 60 * 16000
    detector = HeldDetector(model, hold_at=minute)

    async def run() -> list:
        got = []
        async for piece in cut_pieces(samples, 30, detector):
            detector.go.set()  # the first piece came: the scan may go on
            got.append(piece)
        return got

    got = asyncio.run(run())
    assert got == whole
    assert detector.let_go is True, "the first piece came only once the scan had ended"
    assert got[0][1] <= minute

    detector = HeldDetector(model, hold_at=minute)

    async def leave_after_the_first_piece() -> None:
        pieces = cut_pieces(samples, 30, detector)
        await anext(pieces)
        await pieces.aclose()
        detector.go.set()

    asyncio.run(leave_after_the_first_piece())
    assert detector.finished.wait(5)
    assert detector.scanned < len(samples) / 2  # the scan stopped early


def test_piece_planning_rules():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.1, 16000 * 95).astype(np.float32)  # never pauses
    pieces = plan_pieces(noise, 30)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(noise)
    assert all(b - a <= 30 * 16000 for a, b in pieces)
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:], strict=False))
    # Speech segments: padded, merged while they fit, long ones split.
    speech = [(16000 * 1, 16000 * 3), (16000 * 4, 16000 * 6), (16000 * 40, 16000 * 80)]
    planned = split_long(noise, plan_speech_pieces(len(noise), speech, 30, 10), 30)
    assert planned[0] == (16000 * 1 - 3200, 16000 * 6 + 3200)
    assert all(b - a <= 30 * 16000 for a, b in planned)
    assert planned[-1][1] == 16000 * 80 + 3200
    assert sum(b - a for a, b in planned) < len(noise) * 0.6  # silence is not sent


class GeneratedAudio:
    """Noise read by slice like a request's ``AudioStream`` (its samples live in a file): nothing held
    but what a reader asks for, so a reader's own memory shows alone."""

    def __init__(self, seconds: float) -> None:
        self.n = int(seconds * 16000)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, piece: slice) -> np.ndarray:
        start, end, _ = piece.indices(self.n)
        return np.random.default_rng(start).normal(0, 0.1, max(0, end - start)).astype(np.float32)


def test_cutting_a_long_window_reads_it_a_little_at_a_time():
    """The speakers of a long recording are found in windows of 600 s, cut at the quietest point of
    each window's last 240 s: that search reads and squares 30 s at a time. (It read the 240 s at
    once and widened them to float64: 73 MB at its peak, every window of every hour.)"""
    import tracemalloc

    audio = GeneratedAudio(1500)
    tracemalloc.start()
    try:
        windows = plan_pieces(audio, 600)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert windows[-1][1] == len(audio) and all(b - a <= 600 * 16000 for a, b in windows)
    assert peak < 12 * 2**20, f"cutting held {peak / 2**20:.0f} MB at once"


@pytest.fixture
def default_tuning_bridge(models_dir, catalog_file, tmp_path):
    """The engine tuning a CPU user gets by default: one thread per model run, a connection per
    core plus one that a long request leaves for newcomers."""
    proc = BridgeProcess(bridge_env(models_dir, catalog_file, ENGINE_CONNECTIONS="0", SHERPA_NUM_THREADS="0"),
                         tmp_path / "b.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_stream_delivers_early_and_a_disconnect_cancels_the_rest(default_tuning_bridge, work, beckett):
    bridge = default_tuning_bridge
    connections = bridge.health()["engine_connections"]
    assert bridge.health()["engine_threads"] == 1 and connections >= 2
    path, truth = build(590, lambda i: 0.5, work / "long-speech.wav")  # continuous speech, ~20 pieces
    idle = []
    for _ in range(3):
        t = time.monotonic()
        assert transcribe(bridge.url, beckett).status_code == 200
        idle.append(time.monotonic() - t)
    idle_latency = sorted(idle)[1]  # median of three

    deltas: list[str] = []
    first_delta = threading.Event()
    stop = threading.Event()

    def stream_long() -> None:
        with path.open("rb") as fh, httpx.stream("POST", bridge.url + "/v1/audio/transcriptions",
                                                 files={"file": fh}, data={"stream": "true"}, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event["type"] == "transcript.text.delta":
                        deltas.append(event["delta"])
                        first_delta.set()
                if stop.is_set():
                    return  # closes the connection mid-stream

    thread = threading.Thread(target=stream_long)
    started = time.monotonic()
    thread.start()
    assert first_delta.wait(120), "no delta before the whole file was done"
    assert time.monotonic() - started < 120
    # Deltas arrive while pieces are still queued (the first, short piece may be answered before the
    # VAD, which runs at a lower priority, has found the next ones: give it a moment). One request
    # runs its pieces side by side on all connections but the one kept for newcomers.
    deadline = time.monotonic() + 30
    while not ((h := bridge.health())["pieces_waiting"] > 0 and h["pieces_running"] == connections - 1):
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    assert not stop.is_set() and thread.is_alive()  # the stream is still going

    # Fairness: a short request sent while the long one runs is not queued behind its pieces. Counted,
    # not timed (a busy machine slows both alike): while it is in flight, the connection the long
    # request leaves free runs it, so the engine runs a piece on every connection; queued behind the
    # long request's pieces it would wait with one connection idle. Three short requests, once the
    # long one is under way (its decode and VAD scan are over).
    time.sleep(2)
    busy, running = [], []
    for _ in range(3):
        seen: list[int] = []
        done = threading.Event()

        def sample(seen: list[int], done: threading.Event) -> None:
            while not done.is_set():
                seen.append(bridge.health()["pieces_running"])
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, args=(seen, done))
        sampler.start()
        t = time.monotonic()
        r = transcribe(bridge.url, beckett)
        busy.append(time.monotonic() - t)
        done.set()
        sampler.join()
        running.append(max(seen))
        assert r.status_code == 200 and wer(BECKETT_TEXT, r.json()["text"]) <= 0.1
    assert thread.is_alive()  # the long request was running all along
    print(f"short request: idle {idle_latency:.2f} s, beside a 590 s request {sorted(busy)[1]:.2f} s ({busy}); "
          f"most pieces running meanwhile {running} of {connections} connections")
    assert running == [connections] * 3, running

    stop.set()
    thread.join(60)
    deadline = time.monotonic() + 30
    while True:
        h = bridge.health()
        if h["pieces_waiting"] == 0 and h["pieces_running"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.2)
    # What arrived before the disconnect is the start of the file, in order.
    heard = " ".join(deltas).split()
    reference = " ".join(s for s, _, _ in truth).split()[: len(heard)]
    assert heard and wer(" ".join(reference), " ".join(heard)) <= 0.2


def test_subtitles_without_token_times_are_cut_at_pauses(bridge, work):
    """Moonshine gives no token times: a 17 s two-speaker recording (one piece for the engine)
    still becomes several cues, each starting and ending in speech, none longer than 10 s, with the
    same words as the plain transcript."""
    import subprocess

    import srt

    voices = []
    for i, sentence in enumerate(HARVARD[:6]):
        path = festival_wav(sentence)
        if i % 2:  # the second speaker: the same voice, lower
            low = work / f"low-{i}.wav"
            subprocess.run(["sox", str(path), str(low), "pitch", "-600"], check=True)
            path = low
        voices.append(trim(read_wav16(path)))
    parts, speech, pos = [], [], 0
    for i, clip in enumerate(voices):
        gap = np.zeros(int([0.7, 1.0, 0.6][i % 3] * 16000), dtype=np.float32)
        speech.append((pos / 16000, (pos + len(clip)) / 16000))
        parts += [clip, gap]
        pos += len(clip) + len(gap)
    path = write_wav16(work / "two-speakers.wav", np.concatenate(parts))
    assert 15 < pos / 16000 < 20

    plain = transcribe(bridge.url, path).json()["text"]
    cues = list(srt.parse(transcribe(bridge.url, path, response_format="srt").text))
    assert len(cues) >= 3, cues
    for cue in cues:
        start, end = cue.start.total_seconds(), cue.end.total_seconds()
        assert end - start <= 10, cue
        # Starts and ends inside the speech (the VAD's padding aside), not in a pause.
        assert any(a - 0.35 <= start <= b for a, b in speech), (cue, speech)
        assert any(a <= end <= b + 0.35 for a, b in speech), (cue, speech)
    assert all(a.end <= b.start for a, b in zip(cues, cues[1:], strict=False))
    assert normalize(" ".join(c.content for c in cues)) == normalize(plain)  # the same words
    reference = " ".join(HARVARD[:6])
    assert wer(reference, plain) <= 0.15
