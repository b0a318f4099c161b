"""Every upload format people send is decoded (PyAV workers and the ffmpeg command) and transcribed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import BECKETT_TEXT
from tests.helpers import transcribe, wer
from tests.speech import ffmpeg_convert

FORMATS = {
    "wav-8k.wav": ["-ar", "8000"],
    "wav-96k-stereo.wav": ["-ar", "96000", "-ac", "2"],
    "six-channels.wav": ["-af", "pan=5.1|FL=c0|FR=c0|FC=c0|LFE=c0|BL=c0|BR=c0"],
    "flac.flac": [],
    "mp3.mp3": ["-b:a", "64k"],
    "ogg-opus.ogg": ["-c:a", "libopus", "-b:a", "32k"],
    "webm-opus.webm": ["-c:a", "libopus", "-b:a", "32k"],
    "m4a-aac.m4a": ["-c:a", "aac", "-b:a", "64k"],
    "safari-mp4-aac.mp4": ["-c:a", "aac", "-b:a", "64k", "-movflags", "+frag_keyframe+empty_moov"],
}


@pytest.fixture(scope="module")
def format_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("formats")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_audio_format_is_transcribed(decoder_bridge, beckett, format_dir, name):
    path = ffmpeg_convert(beckett, format_dir / name, *FORMATS[name])
    r = transcribe(decoder_bridge.url, path)
    assert r.status_code == 200, r.text
    assert wer(BECKETT_TEXT, r.json()["text"]) <= 0.15
    assert abs(r.json()["usage"]["seconds"] - 9.96) < 0.1


def test_video_file_with_an_audio_track(decoder_bridge, beckett, format_dir):
    video = format_dir / "video.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10",
         "-i", str(beckett), "-shortest", "-c:v", "mpeg4", "-c:a", "aac", str(video)],
        check=True,
    )
    r = transcribe(decoder_bridge.url, video)
    assert r.status_code == 200, r.text
    assert wer(BECKETT_TEXT, r.json()["text"]) <= 0.15
    # The file name says nothing: the format comes from the content.
    renamed = format_dir / "recording.wav"
    renamed.write_bytes(video.read_bytes())
    assert wer(BECKETT_TEXT, transcribe(decoder_bridge.url, renamed).json()["text"]) <= 0.15


def test_mp3_whose_sample_rate_and_channels_change_midway(decoder_bridge, beckett, format_dir):
    """Two mp3 files joined end to end (a podcast's parts; the first mono at 22.05 kHz, the second
    stereo at 44.1 kHz): the decoder follows the new shape instead of failing the request (the
    PyAV workers once answered 400, "the decoder failed on this file")."""
    parts = []
    for k, (start, rate, channels) in enumerate(((0, "22050", "1"), (5, "44100", "2"))):
        part = format_dir / f"part{k}.mp3"
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-ss", str(start), "-i", str(beckett),
                        *(["-t", "5"] if k == 0 else []), "-ar", rate, "-ac", channels, "-c:a", "libmp3lame",
                        "-write_xing", "0", "-id3v2_version", "0", str(part)], check=True)
        parts.append(part.read_bytes())
    joined = format_dir / "joined.mp3"
    joined.write_bytes(b"".join(parts))
    r = transcribe(decoder_bridge.url, joined)
    assert r.status_code == 200, r.text
    assert wer(BECKETT_TEXT, r.json()["text"]) <= 0.15
    assert abs(r.json()["usage"]["seconds"] - 9.96) < 0.15
