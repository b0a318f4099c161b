"""A request's audio: the upload saved to its folder in ``TMPDIR`` and decoded by the bridge's
decoder (``AUDIO_DECODER``: the PyAV workers, or ffmpeg) into an ``AudioStream`` while the
request goes on; what a failed decode or a full disk answers (400, 507).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from starlette.datastructures import UploadFile

from bridge.decoding.ffmpeg import ffmpeg_decode
from bridge.decoding.stream import AudioDecodeError, AudioStorageFull, AudioStream, AudioTimeout, AudioTooLong
from bridge.state import BridgeState
from common.errors import APIError


async def start_decode(upload: UploadFile, state: BridgeState, folder: Path) -> tuple[AudioStream, asyncio.Task[None]]:
    """Save the upload and start decoding it: the stream fills while the caller goes on."""
    path = folder / "upload"
    try:
        with path.open("wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, upload.file, out, 1 << 20)
    except OSError as exc:
        raise storage_error(exc) from None
    if path.stat().st_size == 0:
        raise APIError(400, "the uploaded file is empty", param="file", code="empty_file")
    stream = AudioStream(state.settings.sherpa_max_utterance)
    task = asyncio.create_task(decode_into(state, path, stream))
    stream.on_abort(functools.partial(_cancel, task))
    return stream, task


def decode_into(state: BridgeState, path: Path, stream: AudioStream) -> Coroutine[Any, Any, None]:
    """Decode the file at ``path`` into ``stream`` with the bridge's decoder (AUDIO_DECODER)."""
    settings = state.settings
    if state.decoders is not None:
        return state.decoders.decode(path, stream, timeout=settings.decode_timeout)
    return ffmpeg_decode(path, stream, timeout=settings.decode_timeout, binary=settings.ffmpeg_binary)


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def storage_error(exc: OSError) -> APIError:
    """A full disk (TMPDIR, where uploads and their decoded audio wait) fails the request, never
    the bridge: 507 in OpenAI's shape, worth retrying later."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise exc
    return APIError(507, "the server has no disk space left for this upload and its decoded audio; retry later "
                    "or send a shorter recording", code="insufficient_storage", type="server_error",
                    retry_after=30)


def decode_error(exc: Exception) -> APIError:
    if isinstance(exc, AudioStorageFull):
        return storage_error(exc)
    if isinstance(exc, AudioTooLong):
        return APIError(400, f"{exc}; cut it into shorter files (SHERPA_MAX_UTTERANCE)", param="file",
                        code="audio_too_long")
    if isinstance(exc, AudioDecodeError):
        return APIError(400, f"{exc}. Send audio or video with an audio track (wav, flac, mp3, ogg/opus, webm, "
                        "m4a, mp4, ...)", param="file", code="invalid_audio")
    if isinstance(exc, AudioTimeout):
        return APIError(400, f"{exc}", param="file", code="decode_timeout")
    raise exc
