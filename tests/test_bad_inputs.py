"""Hostile and broken uploads: each gets its defined answer, nothing is left behind, and the
bridge keeps serving."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import BECKETT_TEXT
from tests.helpers import Watcher, assert_openai_error, transcribe, wer
from tests.reliability import record


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad")


def lavfi(out: Path, source: str, seconds: float, *args: str) -> Path:
    if out.is_file():  # made once per module, sent to each decoder
        return out
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", source,
                    "-t", str(seconds), *args, str(out)], check=True)
    return out


def test_empty_file(decoder_bridge, work):
    (work / "empty.wav").write_bytes(b"")
    assert_openai_error(transcribe(decoder_bridge.url, work / "empty.wav"), 400, "empty_file")


def test_non_audio_file(decoder_bridge, work):
    (work / "notes.wav").write_text("this is a text file, not audio\n" * 100)
    r = transcribe(decoder_bridge.url, work / "notes.wav")
    assert_openai_error(r, 400, "invalid_audio")
    assert r.headers["x-should-retry"] == "false"


def test_truncated_files(decoder_bridge, beckett, work):
    data = beckett.read_bytes()
    (work / "header-only.wav").write_bytes(data[:30])
    assert_openai_error(transcribe(decoder_bridge.url, work / "header-only.wav"), 400, "invalid_audio")
    mp3 = work / "full.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(beckett), str(mp3)], check=True)
    (work / "cut.mp3").write_bytes(mp3.read_bytes()[:200])
    assert_openai_error(transcribe(decoder_bridge.url, work / "cut.mp3"), 400, "invalid_audio")
    # Cut in the middle: a corrupt last packet is an error (-xerror), not a silently partial answer.
    (work / "half.wav").write_bytes(data[: len(data) // 2 + 1])
    assert_openai_error(transcribe(decoder_bridge.url, work / "half.wav"), 400, "invalid_audio")


def test_video_without_audio(decoder_bridge, work):
    video = lavfi(work / "silent-film.mp4", "testsrc=size=64x48:rate=5", 2, "-c:v", "mpeg4")
    err = assert_openai_error(transcribe(decoder_bridge.url, video), 400, "invalid_audio")
    assert "no audio track" in err["message"]


def test_hls_playlist_cannot_read_local_files(decoder_bridge, beckett, work):
    playlist = work / "x.wav"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{beckett}\n"
                        f"#EXTINF:10,\n{beckett}\n#EXT-X-ENDLIST\n")
    assert_openai_error(transcribe(decoder_bridge.url, playlist), 400, "invalid_audio")
    concat = work / "y.wav"
    concat.write_text(f"ffconcat version 1.0\nfile '{beckett}'\n")
    assert_openai_error(transcribe(decoder_bridge.url, concat), 400, "invalid_audio")


def test_a_valid_recording_in_a_container_off_the_whitelist_is_refused(decoder_bridge, beckett, work):
    """What only the demuxer whitelist stops (FFmpeg's own defaults open it): a real recording in
    NUT, FFmpeg's own container, which no client sends. The same audio in WAV is answered."""
    nut = work / "beckett.nut"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(beckett), "-c:a", "pcm_s16le",
                    str(nut)], check=True)
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=format_name", "-of", "csv=p=0",
                            str(nut)], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "nut"  # FFmpeg itself reads it
    assert_openai_error(transcribe(decoder_bridge.url, nut), 400, "invalid_audio")
    assert transcribe(decoder_bridge.url, beckett).status_code == 200


def test_silence_only_gives_empty_text(decoder_bridge, work):
    silence = lavfi(work / "silence.wav", "anullsrc=r=16000:cl=mono", 5)
    r = transcribe(decoder_bridge.url, silence)
    assert r.status_code == 200
    assert r.json()["text"] == "" and abs(r.json()["usage"]["seconds"] - 5) < 0.05


def test_audio_longer_than_the_limit_is_refused_without_decoding_it_all(decoder_bridge, work):
    long = lavfi(work / "601s.ogg", "anullsrc=r=16000:cl=mono", 601, "-c:a", "libopus", "-b:a", "8k")
    err = assert_openai_error(transcribe(decoder_bridge.url, long), 400, "audio_too_long")
    assert "600" in err["message"]
    # A decompression bomb: an hour of silent Opus is small but would decode to ~230 MB.
    bomb = lavfi(work / "hour.ogg", "anullsrc=r=16000:cl=mono", 3600, "-c:a", "libopus", "-b:a", "6k")
    assert bomb.stat().st_size < 3_000_000
    engine = decoder_bridge.health()["engine_pid"]
    started = time.monotonic()
    with Watcher({"bridge": (decoder_bridge.proc.pid, {engine})}, {"bridge": decoder_bridge.tmpdir}) as w:
        assert_openai_error(transcribe(decoder_bridge.url, bomb), 400, "audio_too_long")
    assert time.monotonic() - started < 30
    # What the cap protects: the request's decoded audio (16-bit samples in an unnamed file in TMPDIR)
    # stops at the 600 s (19 MB), where the hour would be 115 MB; the upload is on disk twice besides
    # (the form's spool and the decoder's copy). The bound is a fifth of the hour: the test fails
    # when the cap is gone. Memory stays that of a short request.
    disk = w.peak_bytes["bridge"] / 2**20
    bound = (601 * 32000 + 2 * bomb.stat().st_size) / 2**20 + 1
    assert disk < bound, f"the bridge wrote {disk:.0f} MiB decoding a bomb (bound {bound:.0f})"
    growth = w.growth("bridge")
    assert growth < 60, f"the bridge grew by {growth:.0f} MB decoding a bomb"
    record(f"Decompression bomb ({decoder_bridge.health()['decoder']} decoder)", "bounds",
           "400 audio_too_long; decoding stops at the cap", upload_mb=round(bomb.stat().st_size / 1e6, 1),
           bridge_rss_growth_mb=round(growth, 1), temp_disk_mib=round(disk, 1),
           seconds=round(time.monotonic() - started, 1))


def test_oversized_bodies_get_413_before_forwarding(bridge):
    big = b"\0" * (26 * 1024 * 1024)
    r = httpx.post(bridge.url + "/v1/audio/transcriptions", files={"file": ("big.wav", big)}, timeout=60)
    assert_openai_error(r, 413, "file_too_large")

    def chunks():  # no Content-Length: chunked transfer encoding
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(27):
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--xyz--\r\n"

    r = httpx.post(bridge.url + "/v1/audio/transcriptions", content=chunks(),
                   headers={"content-type": "multipart/form-data; boundary=xyz"}, timeout=60)
    assert_openai_error(r, 413, "file_too_large")


def test_malformed_requests(bridge):
    r = httpx.post(bridge.url + "/v1/audio/transcriptions", data={"model": "whisper-1"})
    assert_openai_error(r, 400)
    r = httpx.post(bridge.url + "/v1/audio/transcriptions", content=b"garbage",
                   headers={"content-type": "multipart/form-data; boundary=zz"})
    assert_openai_error(r, 400)
    r = httpx.post(bridge.url + "/v1/audio/transcriptions", json={"file": "x"})
    assert_openai_error(r, 400)


def test_service_still_answers_and_left_no_temp_files(decoder_bridge, beckett):
    r = transcribe(decoder_bridge.url, beckett)
    assert r.status_code == 200 and wer(BECKETT_TEXT, r.json()["text"]) <= 0.1
    assert decoder_bridge.health()["status"] == "ready"
    assert decoder_bridge.tmpdir is not None
    assert list(decoder_bridge.tmpdir.iterdir()) == []
