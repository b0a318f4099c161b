"""Hours of audio in one request: the decoded audio lives on disk (16-bit samples in an unnamed
temporary file, ``bridge.decoding.stream.SampleFile``), so the bridge's memory does not grow with the
recording; that file is gone however the request ends (answered, refused, client gone, decoder
killed); a full disk is a 507 in OpenAI's shape, never the bridge's end. Behind the proxy, with the
stand-in engine (``bench.instant_engine``, made slower than the bridge's decoding and cutting, as a
real engine on a CPU is)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import BridgeProcess, bridge_behind_proxy, bridge_env, start_instant_engine
from tests.helpers import Watcher, open_unnamed_files
from tests.reliability import record
from tests.speech import librispeech_loop

HOUR = 3600
PCM_BYTES_PER_SECOND = 32000  # 16 kHz, 16-bit
# Peak RSS of the bridge and its decoder workers over idle while it answers one hour of audio. The
# decoded audio alone would be 115 MB as the 16-bit samples the decoder sends (230 MB as float32);
# what the request holds besides (the pieces in flight, the transcript, the answer) was 10-16 MB.
MEMORY_BOUND_MB = 60


def mp3(source: Path, out: Path, seconds: float) -> Path:
    """``seconds`` of ``source`` looped, as 16 kHz mono mp3 at 32 kbit/s (14 MB an hour)."""
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-stream_loop", "-1", "-i", str(source),
                    "-t", str(seconds), "-ac", "1", "-ar", "16000", "-c:a", "libmp3lame", "-b:a", "32k", str(out)],
                   check=True)
    return out


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("hours-audio")
    loop = librispeech_loop(work / "loop.wav", 60)
    hour = mp3(loop, work / "hour.mp3", HOUR)
    longer = work / "longer.mp3"  # past the bridge's limit (3700 s): 4000 s, stream-copied
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-stream_loop", "1", "-i", str(hour), "-t", "4000",
                    "-c", "copy", str(longer)], check=True)
    return {"hour": hour, "longer": longer, "minute": mp3(loop, work / "minute.mp3", 60),
            "ten": mp3(loop, work / "ten.mp3", 600)}


# A file that only the garbage collector closes says so in the bridge's log.
CLOSED_BY_HAND = "always::ResourceWarning"


@pytest.fixture(scope="module")
def hours(models_dir, catalog_file, tmp_path_factory):
    """The proxy and a bridge that takes 3700 s, both in front of the stand-in engine; one decoder
    worker (the test that kills it knows which)."""
    work = tmp_path_factory.mktemp("hours")
    tmp = work / "tmp"
    tmp.mkdir()
    # An engine slower than decoding and cutting (150 audio s/s over the request's three connections,
    # the VAD runs at about 500): pieces found ahead must wait without their audio in memory.
    engine, url = start_instant_engine("--words-per-second", "2.5", "--delay", "0.02")
    env = bridge_env(models_dir, catalog_file, ENGINE_ADAPTER="websocket", ENGINE_URL=url, SPEED_CHECK="false",
                     SHERPA_MAX_UTTERANCE="3700", DECODER_WORKERS="1", TMPDIR=str(tmp),
                     PYTHONWARNINGS=CLOSED_BY_HAND)
    try:
        for proxy in bridge_behind_proxy(env, work, "hours"):
            proxy.bridge.tmpdir, proxy.engine = tmp, engine
            yield proxy
    finally:
        engine.kill()
        engine.wait()


def post(proxy, path: Path, **data: str) -> httpx.Response:
    with path.open("rb") as fh:
        return httpx.post(proxy.url + "/v1/audio/transcriptions", files={"file": (path.name, fh, "audio/mpeg")},
                          data={"model": "whisper-1", **data}, timeout=600,
                          headers={"Authorization": f"Bearer {proxy.key}"})


def nothing_left(bridge: BridgeProcess) -> None:
    """No request in flight, no file in its TMPDIR, no unnamed file there still open, and none of
    them closed by the garbage collector instead of by the request's end (which could be minutes
    later, or never, for a request caught in a reference cycle)."""
    deadline = time.monotonic() + 30
    while bridge.health()["requests_in_flight"] or open_unnamed_files(bridge.proc.pid, bridge.tmpdir):
        assert time.monotonic() < deadline, open_unnamed_files(bridge.proc.pid, bridge.tmpdir)
        time.sleep(0.1)
    assert list(bridge.tmpdir.iterdir()) == []
    assert "ResourceWarning: unclosed file" not in bridge.log(), bridge.log()[-2000:]


def test_an_hour_through_the_stack_holds_the_memory_of_minutes(hours, recordings):
    """The hour goes to the bridge while the engine is held still (SIGSTOP) until the whole file is
    decoded and the VAD has had time to find its pieces, as with an engine far slower than the VAD:
    the pieces found wait without their audio (at most the engine's connections and one more are
    read ahead), then the engine goes on and the hour is answered to its end."""
    bridge = hours.bridge
    trees = {"bridge": (bridge.proc.pid, set()), "proxy": (hours.proc.pid, set())}
    answers: list[httpx.Response] = []
    assert post(hours, recordings["ten"]).status_code == 200  # the engine's connections opened
    hours.engine.send_signal(signal.SIGSTOP)
    try:
        with Watcher(trees, {"bridge": bridge.tmpdir}) as w:
            sender = threading.Thread(target=lambda: answers.append(post(hours, recordings["hour"],
                                                                          response_format="verbose_json")))
            sender.start()
            deadline = time.monotonic() + 120
            while max((size for _, size in open_unnamed_files(bridge.proc.pid, bridge.tmpdir)), default=0) \
                    < 0.999 * HOUR * PCM_BYTES_PER_SECOND:  # the hour decoded
                assert time.monotonic() < deadline and sender.is_alive(), "the hour was never decoded"
                time.sleep(0.05)
            submitted = 0
            for _ in range(50):  # 10 s: the VAD finds dozens of pieces meanwhile
                health = bridge.health()
                submitted = max(submitted, health["pieces_waiting"] + health["pieces_running"])
                time.sleep(0.2)
            hours.engine.send_signal(signal.SIGCONT)
            sender.join()
    finally:
        hours.engine.send_signal(signal.SIGCONT)
    r = answers[0]
    assert submitted <= bridge.health()["engine_connections"] + 1, f"{submitted} pieces read ahead of the engine"
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert body["duration"] == pytest.approx(HOUR, abs=0.5)
    assert 0 < body["segments"][-1]["start"] < body["segments"][-1]["end"] <= body["duration"] + 0.01
    assert body["segments"][-1]["end"] > HOUR - 120  # transcribed to the end
    print(f"\none hour: bridge +{w.growth('bridge'):.0f} MB, proxy +{w.growth('proxy'):.0f} MB, "
          f"temporary disk {w.peak_bytes['bridge'] / 2**20:.0f} MiB")
    # The hour's samples went to disk (115 MB), not to memory.
    assert w.peak_bytes["bridge"] > 0.8 * HOUR * PCM_BYTES_PER_SECOND
    assert w.growth("bridge") < MEMORY_BOUND_MB, f"the bridge grew by {w.growth('bridge'):.0f} MB for an hour"
    assert w.growth("proxy") < 8, f"the proxy grew by {w.growth('proxy'):.0f} MB forwarding a 14 MB upload"
    nothing_left(bridge)
    record("one hour of audio", "bounds", "answered to the end; memory of a short request; decoded audio on disk, "
           "freed at the end", bridge_rss_growth_mb=round(w.growth("bridge")),
           proxy_rss_growth_mb=round(w.growth("proxy")), temp_disk_mib=round(w.peak_bytes["bridge"] / 2**20))


def test_the_decoded_audio_is_freed_however_the_request_ends(hours, recordings):
    bridge = hours.bridge
    # Refused part-way: the decoder passes the limit after 3700 s.
    r = post(hours, recordings["longer"])
    assert r.status_code == 400 and r.json()["error"]["code"] == "audio_too_long", r.text[:300]
    nothing_left(bridge)

    # The client goes away after the first streamed text.
    with recordings["hour"].open("rb") as fh, httpx.stream(
            "POST", hours.url + "/v1/audio/transcriptions", files={"file": ("hour.mp3", fh, "audio/mpeg")},
            data={"model": "whisper-1", "stream": "true"}, headers={"Authorization": f"Bearer {hours.key}"},
            timeout=600) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data:"))
        assert "transcript.text.delta" in first
    nothing_left(bridge)

    # The decoder is killed while it decodes (stopped first: an hour of mp3 decodes in about a second),
    # once the request holds its file: that request fails, the next one is answered.
    [worker] = [p for p in psutil.Process(bridge.proc.pid).children()
                if "bridge.decoding.pyav_worker" in " ".join(p.cmdline())]
    worker.send_signal(signal.SIGSTOP)
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(post(hours, recordings["hour"])))
    sender.start()
    deadline = time.monotonic() + 60
    while len(open_unnamed_files(bridge.proc.pid, bridge.tmpdir)) < 2:  # the upload's spool, then its samples
        assert time.monotonic() < deadline, "the request never started decoding"
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    sender.join()
    assert answers[0].status_code == 400, answers[0].text[:300]
    assert answers[0].json()["error"]["code"] == "invalid_audio", answers[0].text
    nothing_left(bridge)
    assert post(hours, recordings["minute"]).status_code == 200
    nothing_left(bridge)


@pytest.fixture
def small_disk(models_dir, catalog_file, tmp_path):
    """A bridge whose TMPDIR is a 16 MiB tmpfs: room for a minute's upload and audio, not ten."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    bridge = None
    try:
        env = bridge_env(models_dir, catalog_file, TMPDIR=str(disk), SPEED_CHECK="false", ENGINE_CONNECTIONS="2",
                         PYTHONWARNINGS=CLOSED_BY_HAND)
        bridge = BridgeProcess(env, tmp_path / "bridge.log")
        bridge.tmpdir = disk
        bridge.wait_ready()
        yield bridge
    finally:
        if bridge is not None:
            bridge.stop()
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_fails_the_request_with_507_not_the_bridge(small_disk, recordings):
    bridge = small_disk
    for name, where in (("ten", "the decoded audio (19 MB)"), ("hour", "the upload itself (14 MB, twice)")):
        with recordings[name].open("rb") as fh:
            r = httpx.post(bridge.url + "/v1/audio/transcriptions", files={"file": (f"{name}.mp3", fh)},
                           data={"model": "whisper-1"}, timeout=120)
        assert r.status_code == 507, f"{where}: {r.status_code} {r.text[:300]}"
        error = r.json()["error"]
        assert error["code"] == "insufficient_storage" and error["type"] == "server_error", error
        assert float(r.headers["retry-after"]) > 0
        nothing_left(bridge)
    with recordings["minute"].open("rb") as fh:
        r = httpx.post(bridge.url + "/v1/audio/transcriptions", files={"file": ("minute.mp3", fh)},
                       data={"model": "whisper-1"}, timeout=300)
    assert r.status_code == 200 and r.json()["text"], r.text[:300]
    nothing_left(bridge)
