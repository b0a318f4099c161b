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
