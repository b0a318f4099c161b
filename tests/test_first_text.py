"""Time to first text: decoder workers instead of a process per request, decoding that feeds the
cutter as it goes, short first pieces when streaming, and a decoder that fails alone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from bridge.cutting import plan_speech_pieces, split_long
from bridge.decoding.pyav_decoder import DecoderPool
from bridge.decoding.stream import AudioStream
from bridge.silero import SHIFT
from bridge.transcription import cut_pieces
from bridge.vad import SpeechDetector, find_vad_model
from tests.conftest import BECKETT_TEXT, BridgeProcess, bridge_env
from tests.helpers import assert_openai_error, transcribe, wer
from tests.speech import HARVARD, festival_wav, have_festival, read_wav16, write_wav16

needs_speech = pytest.mark.skipif(not have_festival(), reason="festival/sox not installed")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("first-text")


def speech_file(out: Path, seconds: float, pause: float = 0.6) -> tuple[Path, str]:
    """Festival sentences with pauses between them, ``seconds`` long (16 kHz WAV), and its text."""
    parts, said, total, i = [], [], 0, 0
    while True:
        sentence = HARVARD[i % len(HARVARD)]
        clip = read_wav16(festival_wav(sentence))
        gap = np.zeros(int(pause * 16000), dtype=np.float32)
        if total + len(clip) + len(gap) > seconds * 16000:
            break
        parts += [clip, gap]
        said.append(sentence)
        total += len(clip) + len(gap)
        i += 1
    parts.append(np.zeros(int(seconds * 16000) - total, dtype=np.float32))
    return write_wav16(out, np.concatenate(parts)), " ".join(said)


def as_mp3_48k(src: Path, dst: Path) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(src), "-ar", "48000", "-ac", "2",
                    "-b:a", "128k", str(dst)], check=True)
    return dst


def stream_deltas(url: str, path: Path, on_first_delta=None) -> tuple[list[str], str]:
    deltas: list[str] = []
    done = ""
    with path.open("rb") as fh, httpx.stream("POST", url + "/v1/audio/transcriptions", files={"file": fh},
                                             data={"stream": "true"}, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "transcript.text.delta":
                if not deltas and on_first_delta is not None:
                    on_first_delta()
                deltas.append(event["delta"])
            elif event["type"] == "transcript.text.done":
                done = event["text"]
            else:
                raise AssertionError(event)
    return deltas, done


@pytest.fixture(scope="module")
def forty_five(bridge, work) -> dict:
    """A 45 s recording (mp3, 48 kHz stereo) streamed once: its text, the deltas, the times, and the
    bridge's health when the first delta arrived."""
    if not have_festival():
        pytest.skip("festival/sox not installed")
    wav, said = speech_file(work / "forty-five.wav", 45)
    path = as_mp3_48k(wav, work / "forty-five.mp3")
    seen: list[dict] = []
    started = time.monotonic()
    first_at: list[float] = []

    def at_first_delta() -> None:
        first_at.append(time.monotonic() - started)
        seen.append(bridge.health())

    deltas, done = stream_deltas(bridge.url, path, at_first_delta)
    total = time.monotonic() - started
    print(f"45 s streamed: first delta after {first_at[0]:.2f} s of {total:.2f} s; {len(deltas)} deltas")
    return {"path": path, "said": said, "deltas": deltas, "done": done, "health_at_first": seen[0]}


def test_first_delta_arrives_while_the_request_still_has_pieces_to_run(forty_five):
    """A 45 s recording streamed: its first, short piece is answered while its later pieces are still
    waiting or running, and the deltas add up to the final text."""
    deltas, done, seen = forty_five["deltas"], forty_five["done"], forty_five["health_at_first"]
    assert len(deltas) >= 3
    assert seen["pieces_waiting"] + seen["pieces_running"] >= 1, seen
    assert "".join(deltas) == done
    assert wer(forty_five["said"], done) <= 0.1


def test_streamed_text_is_as_good_as_the_whole_answer(bridge, forty_five):
    """Short first pieces cost no accuracy: the 45 s recording streamed (short first pieces, then
    pieces growing to the safe length: of any file, the largest share of it in short pieces) has at
    most one word more wrong than the same file answered at once."""
    said, done = forty_five["said"], forty_five["done"]
    whole = transcribe(bridge.url, forty_five["path"], timeout=600).json()["text"]
    whole_wer, streamed_wer = wer(said, whole), wer(said, done)
    print(f"45 s WER: whole {whole_wer:.4f}, streamed {streamed_wer:.4f}")
    assert streamed_wer <= whole_wer + 1.01 / len(said.split())


@needs_speech
def test_decoding_feeds_the_cutter_as_it_goes(work):
    """On a 5-minute file the VAD starts on the first seconds while the decoder still runs: the first
    piece is handed over before decoding has finished, and the pieces are those the whole decoded
    file gives. Made certain rather than timed: the decoder worker is paused (SIGSTOP) once a minute
    of audio is out, so the decode cannot finish until the first piece has come."""
    model = find_vad_model(None)
    if model is None:
        pytest.skip("no Silero VAD model")
    wav, _ = speech_file(work / "five-minutes-dense.wav", 300)
    path = as_mp3_48k(wav, work / "five-minutes-dense.mp3")

    async def run() -> tuple[int, list[tuple[int, int]], np.ndarray]:
        pool = DecoderPool(1, 1024)
        await pool.start()
        [pid] = pool.pids
        try:
            stream = AudioStream(600)
            decoding = asyncio.create_task(pool.decode(path, stream, timeout=60))
            await stream.wait_available(60 * 16000)
            os.kill(pid, signal.SIGSTOP)
            pieces = cut_pieces(stream, 30, SpeechDetector(model))
            try:
                first = await asyncio.wait_for(anext(pieces), 30)
                decoded_at_first = stream.available
                assert not stream.done, "the decode finished before it was paused"
            finally:
                os.kill(pid, signal.SIGCONT)
            rest = [piece async for piece in pieces]
            await decoding
            assert await stream.wait_done() > 299 * 16000
            return decoded_at_first, [first, *rest], stream[:]
        finally:
            await pool.close()

    decoded_at_first, pieces, samples = asyncio.run(run())
    assert decoded_at_first < len(samples) / 2
    whole = split_long(samples, plan_speech_pieces(len(samples), SpeechDetector(model).speech_segments(samples),
                                                   30), 30)
    assert pieces == whole


def test_early_pieces_grow_to_the_safe_length():
    second = 16000
    speech = [(i * 3 * second, i * 3 * second + int(2.5 * second)) for i in range(40)]  # 2.5 s, 0.5 s pause
    early = plan_speech_pieces(120 * second, speech, 30, None, first_seconds=4)
    lengths = [(b - a) / second for a, b in early]
    assert 4 <= lengths[0] < 7  # closed at the first pause after 4 s
    assert lengths[1] >= 8 and lengths[2] >= 16
    assert all(x <= 30 for x in lengths)
    assert all(p[1] <= q[0] for p, q in zip(early, early[1:], strict=False))
    plain = plan_speech_pieces(120 * second, speech, 30)
    assert (plain[0][1] - plain[0][0]) / second > 25  # without streaming: pieces as long as fit
    # Pauses shorter than the padding (0.3 s) would merge the speech around them: an early piece
    # that is long enough is cut in the middle of such a pause instead.
    tight = [(int(i * 2.8 * second), int(i * 2.8 * second + 2.5 * second)) for i in range(40)]
    first = plan_speech_pieces(120 * second, tight, 30, None, first_seconds=2)[0]
    assert first == (0, int(2.65 * second))
    assert (plan_speech_pieces(120 * second, tight, 30)[0][1]) / second > 25


# -- a decoder that crashes or hangs takes down only its own request ---------------------------

def decoder_workers(bridge: BridgeProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(bridge.proc.pid).children()
            if "bridge.decoding.pyav_worker" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def one_worker_bridge(models_dir, catalog_file, tmp_path_factory):
    proc = BridgeProcess(bridge_env(models_dir, catalog_file, DECODER_WORKERS="1", DECODE_TIMEOUT="3",
                                    ENGINE_CONNECTIONS="2", SHERPA_NUM_THREADS="1"),
                         tmp_path_factory.mktemp("one-worker") / "bridge.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_hung_decoder_is_killed_and_replaced(one_worker_bridge, beckett):
    bridge = one_worker_bridge
    [worker] = decoder_workers(bridge)
    worker.send_signal(signal.SIGSTOP)  # as a decoder stuck in a loop on a crafted file
    started = time.monotonic()
    r = transcribe(bridge.url, beckett)
    assert_openai_error(r, 400, "decode_timeout")
    assert time.monotonic() - started < 10
    wait_for(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE)
    [fresh] = decoder_workers(bridge)
    assert fresh.pid != worker.pid
    r = transcribe(bridge.url, beckett)
    assert r.status_code == 200 and wer(BECKETT_TEXT, r.json()["text"]) <= 0.1
    assert bridge.health()["decoder_workers_replaced"] >= 1


def test_a_crashed_decoder_fails_its_request_alone(one_worker_bridge, beckett):
    bridge = one_worker_bridge
    [worker] = decoder_workers(bridge)
    worker.send_signal(signal.SIGSTOP)  # holds the file mid-decode...
    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(transcribe(bridge.url, beckett)))
    thread.start()
    wait_for(lambda: bridge.health()["requests_in_flight"] == 1)
    time.sleep(0.3)
    worker.send_signal(signal.SIGKILL)  # ...then dies, as a decoder crashing on a crafted file
    thread.join(30)
    err = assert_openai_error(result[0], 400, "invalid_audio")
    assert "decoder failed" in err["message"]
    r = transcribe(bridge.url, beckett)  # the next request gets a fresh worker
    assert r.status_code == 200 and wer(BECKETT_TEXT, r.json()["text"]) <= 0.1
    # A worker killed while idle is replaced without failing the request that finds it.
    [idle] = decoder_workers(bridge)
    idle.kill()
    wait_for(lambda: not idle.is_running())
    time.sleep(0.2)
    r = transcribe(bridge.url, beckett)
    assert r.status_code == 200, r.text
    assert bridge.health()["status"] == "ready"


@needs_speech
def test_regions_scanned_side_by_side_cut_like_one_scan(work):
    """A long file's regions scanned side by side (2, and 16 in one model run) give the pieces one
    scan gives, in order and without overlap."""
    model = find_vad_model(None)
    if model is None:
        pytest.skip("no Silero VAD model")
    wav, _ = speech_file(work / "five-minutes-dense.wav", 300)
    samples = read_wav16(wav)
    detector = SpeechDetector(model)

    async def plan(threads: int) -> list[tuple[int, int]]:
        return [p async for p in cut_pieces(samples, 30, detector, vad_threads=threads)]

    one, two, many = asyncio.run(plan(1)), asyncio.run(plan(2)), asyncio.run(plan(16))
    assert len(one) >= 10
    # The regions scan on the one pass's window grid, so each bound is one pass's or whole windows
    # away from it (a region's fresh model state may call a pause's edge a little differently), and
    # each cut between two pieces falls in the pause where one pass cuts.
    for side_by_side in (two, many):
        assert len(side_by_side) == len(one)
        for bound, alone in zip(np.ravel(side_by_side), np.ravel(one), strict=True):
            assert (bound - alone) % SHIFT == 0, (side_by_side, one)
        cuts = zip(side_by_side, side_by_side[1:], one, one[1:], strict=False)
        for (_, end), (start, _), (_, end1), (start1, _) in cuts:
            assert max(end, end1) < min(start, start1), (side_by_side, one)
    assert all(p[1] <= q[0] for p, q in zip(many, many[1:], strict=False))
