"""Audio decoding: every upload goes through ffmpeg to 16 kHz mono float32.

The ffmpeg command line lives here and only here. It is hardened against hostile uploads
(see the shared HARDENING notes): only the ``file`` protocol and a whitelist of plain container
demuxers (no playlists such as HLS or concat, which would open other files), the first audio
stream only, decoded duration capped with ``-t``, a wall-clock timeout after which the child is
killed and reaped, stdin closed, both pipes drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bridge.ports import SAMPLE_RATE

# Demuxers of real audio/video containers. Deliberately absent: hls, concat, playlist-like and
# image/subtitle demuxers, anything that can reference another file or URL.
DEMUXER_WHITELIST = (
    "wav,w64,flac,mp3,ogg,matroska,webm,mov,mp4,m4a,aac,avi,aiff,caf,amr,asf,flv,mpegts,wv,"
    "au,voc,ac3,eac3,dts,truehd,mp2,loas,latm,3gp"
)


class AudioDecodeError(ValueError):
    """The upload is not decodable audio (or has no audio track)."""


class AudioTooLong(ValueError):
    def __init__(self, limit_seconds: float) -> None:
        super().__init__(f"audio is longer than the limit of {limit_seconds:.0f} s")
        self.limit_seconds = limit_seconds


class AudioTimeout(RuntimeError):
    pass


@dataclass
class DecodedAudio:
    samples: np.ndarray  # float32 mono, 16 kHz

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@functools.cache
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
        # Decode a little past the limit so that "longer than the limit" can be told apart.
        "-t", f"{max_seconds + 0.5:.3f}",
        "-ac", "1",
        "-ar", str(SAMPLE_RATE),
        "-f", "f32le",
        "-acodec", "pcm_f32le",
        "pipe:1",
    ]


async def decode_to_pcm16k(path: Path, *, max_seconds: float, timeout: float, binary: str = "") -> DecodedAudio:
    proc = await asyncio.create_subprocess_exec(
        *ffmpeg_command(path, max_seconds, binary),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        reason = err.decode("utf-8", errors="replace").strip().splitlines()
        detail = reason[-1] if reason else f"ffmpeg exited with {proc.returncode}"
        if "matches no streams" in " ".join(reason):
            detail = "the file has no audio track"
        raise AudioDecodeError(f"could not decode the audio: {detail}")
    usable = len(out) - len(out) % 4
    samples = np.frombuffer(out[:usable], dtype="<f4").astype(np.float32, copy=False)
    if len(samples) == 0:
        raise AudioDecodeError("could not decode the audio: the file contains no audio samples")
    if len(samples) > (max_seconds + 0.05) * SAMPLE_RATE:
        raise AudioTooLong(max_seconds)
    if not np.isfinite(samples).all():
        samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
    return DecodedAudio(samples=samples)
