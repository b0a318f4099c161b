"""The ffmpeg command line (``AUDIO_DECODER=ffmpeg``: one ffmpeg process per request, its output
read as it comes), and the demuxer whitelist both decoders share (``pyav``, the default, runs
FFmpeg's libraries in decoder worker processes started once: ``bridge.decoding.pyav_decoder``).

The protections against hostile uploads (see the shared HARDENING notes): only the ``file``
protocol and a whitelist of plain container demuxers (no playlists such as HLS or concat, which
would open other files), the first audio stream only, the decoded duration capped while decoding
(a small file that decodes to hours stops at the limit), a wall-clock timeout after which the
decoder is killed and reaped, a bounded output buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import numpy as np

from bridge.decoding.stream import (
    OVERSHOOT_SECONDS,
    AudioDecodeError,
    AudioStream,
    AudioTimeout,
)
from bridge.ports import SAMPLE_RATE

# Demuxers of real audio/video containers. Deliberately absent: hls, concat, playlist-like and
# image/subtitle demuxers, anything that can reference another file or URL.
DEMUXER_WHITELIST = (
    "wav,w64,flac,mp3,ogg,matroska,webm,mov,mp4,m4a,aac,avi,aiff,caf,amr,asf,flv,mpegts,wv,"
    "au,voc,ac3,eac3,dts,truehd,mp2,loas,latm,3gp"
)


def ffmpeg_binary(configured: str = "") -> str:
    """``FFMPEG_BINARY`` when set, else ffmpeg from PATH, else the static binary shipped by the
    imageio-ffmpeg wheel. (That static build starts faster, ~15 ms against ~70 ms for Debian's, but
    its Opus decoding made Moonshine return empty text on a test clip, so it is not preferred.)"""
    if configured:
        if not shutil.which(configured):
            raise RuntimeError(f"FFMPEG_BINARY={configured} is not an executable")
        return configured
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError) as exc:
        raise RuntimeError(
            "ffmpeg not found: install it (apt-get install ffmpeg) or pip install imageio-ffmpeg"
        ) from exc


def ffmpeg_command(path: Path, max_seconds: float, binary: str = "") -> list[str]:
    return [
        ffmpeg_binary(binary),
        "-nostdin",
        "-hide_banner",
        "-loglevel", "error",
        "-xerror",
        "-protocol_whitelist", "file",
        "-format_whitelist", DEMUXER_WHITELIST,
        "-i", f"file:{path}",
        "-map", "0:a:0",
        "-vn", "-sn", "-dn",
        "-t", f"{max_seconds + OVERSHOOT_SECONDS:.3f}",
        "-ac", "1",
        "-ar", str(SAMPLE_RATE),
        "-f", "f32le",
        "-acodec", "pcm_f32le",
        "pipe:1",
    ]


READ_BYTES = SAMPLE_RATE * 4  # hand over about a second of audio at a time


async def ffmpeg_decode(path: Path, stream: AudioStream, *, timeout: float, binary: str = "") -> None:
    """Run ffmpeg on ``path`` and append its output to ``stream`` as it comes; finishes the stream
    with the result. Kills and reaps ffmpeg on timeout, error or cancellation."""
    proc = await asyncio.create_subprocess_exec(
        *ffmpeg_command(path, stream.max_seconds, binary),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr_task = asyncio.ensure_future(proc.stderr.read(64 * 1024))

    async def pump() -> None:
        assert proc.stdout is not None
        rest = b""
        while True:
            data = await proc.stdout.read(READ_BYTES)
            if not data:
                break
            data = rest + data
            usable = len(data) - len(data) % 4
            rest = data[usable:]
            if usable and not stream.append(np.frombuffer(data[:usable], dtype="<f4")):
                return  # too long or aborted: stop reading, ffmpeg is killed below
        await proc.wait()

    try:
        await asyncio.wait_for(pump(), timeout)
    except asyncio.TimeoutError:
        stream.finish(AudioTimeout(timeout))
    except BaseException as exc:
        stream.finish(exc if isinstance(exc, Exception) else asyncio.CancelledError())
        raise
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        err = b""
        with contextlib.suppress(BaseException):
            err = await asyncio.wait_for(stderr_task, 5)
    if stream.done:
        return
    if proc.returncode != 0:
        reason = err.decode("utf-8", errors="replace").strip().splitlines()
        detail = reason[-1] if reason else f"ffmpeg exited with {proc.returncode}"
        if "matches no streams" in " ".join(reason):
            detail = "the file has no audio track"
        stream.finish(AudioDecodeError(f"could not decode the audio: {detail}"))
        return
    stream.finish()


async def decode_file(path: Path, *, max_seconds: float, timeout: float, binary: str = "") -> AudioStream:
    """Decode a whole file with the ffmpeg command (adapter tests, tools): the finished stream."""
    stream = AudioStream(max_seconds)
    await ffmpeg_decode(path, stream, timeout=timeout, binary=binary)
    await stream.wait_done()
    return stream
