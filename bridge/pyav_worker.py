"""A decoder worker: FFmpeg's libraries through PyAV, in a process of its own.

``bridge.pyav_decoder`` starts a few of these once and sends each one file at a time, so a request
costs no process start, while a decoder that crashes or hangs on a crafted file takes down only its
worker (the bridge kills and replaces it). Each worker caps its own address space
(``DECODER_MEMORY_MB``), so a file that makes the decoder allocate without end fails alone.

Protocol, over the worker's stdin and stdout:
- request: one JSON line ``{"path": ..., "max_samples": ...}``;
- replies: frames of a 1-byte kind and a 4-byte little-endian length, then the payload:
  ``r`` ready (once, at start), ``a`` audio (16 kHz mono float32 little-endian), then exactly one of
  ``d`` done (JSON ``{"samples": n}``) or ``e`` error (JSON ``{"kind": ..., "message": ...}``, kind
  ``invalid``, ``no_audio`` or ``too_long``).

The protections are those of the ffmpeg command line in ``bridge.audio``: the ``file`` protocol
only, the demuxer whitelist, the first audio stream only, and decoding stops once the output passes
``max_samples`` (the duration cap, enforced while decoding).

Run as ``python -m bridge.pyav_worker MEMORY_MB``.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Any, BinaryIO

from bridge.audio import DEMUXER_WHITELIST  # the same whitelist as the ffmpeg command line
from bridge.ports import SAMPLE_RATE

HEADER = struct.Struct("<cI")
CHUNK_SAMPLES = 2 * SAMPLE_RATE  # hand over two seconds of audio at a time (128 KB: few wake-ups of the bridge)


class Refused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def send(out: BinaryIO, kind: bytes, payload: bytes = b"") -> None:
    out.write(HEADER.pack(kind, len(payload)))
    out.write(payload)


def decode(av: Any, path: str, max_samples: int, out: BinaryIO) -> int:
    """Decode the first audio stream of ``path`` to 16 kHz mono float32, sending it in chunks."""
    try:
        container = av.open(f"file:{path}", mode="r", metadata_errors="ignore",
                            options={"protocol_whitelist": "file", "format_whitelist": DEMUXER_WHITELIST})
    except av.FFmpegError as exc:
        raise Refused("invalid", _reason(exc)) from None
    with container:
        if not container.streams.audio:
            raise Refused("no_audio", "the file has no audio track")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        pending: list[bytes] = []
        pending_samples = 0
        total = 0
        # Samples before the stream's start time are encoder priming (Opus pre-skip, AAC priming):
        # the ffmpeg command line starts its output there, so the same audio comes out of both.
        to_drop: int | None = None

        def emit(frames: list[Any]) -> None:
            nonlocal pending_samples, total, to_drop
            for frame in frames:
                n = frame.samples
                skip = 0
                if to_drop:
                    skip = min(n, to_drop)
                    to_drop -= skip
                    n -= skip
                if not n:
                    continue
                pending.append(memoryview(frame.planes[0])[skip * 4:(skip + n) * 4].tobytes())
                pending_samples += n
                total += n
            if total > max_samples:
                raise Refused("too_long", "longer than the limit")
            if pending_samples >= CHUNK_SAMPLES:
                flush()

        def flush() -> None:
            nonlocal pending_samples
            if pending:
                send(out, b"a", b"".join(pending))
                out.flush()
                pending.clear()
                pending_samples = 0

        # Decoded frames are gathered into blocks of about half a second before the resampler: a
        # call per decoded frame (1152 samples of mp3) cost as much as the decoding itself. The
        # resampler sees the same samples in the same order, so its output is the same to the bit.
        fifo: Any = None
        shape: tuple[str, str, int] | None = None

        def resample_gathered() -> None:
            if fifo is not None and fifo.samples:
                emit(resampler.resample(fifo.read()))

        try:
            for packet in container.demux(stream):
                if packet.is_corrupt:  # as ffmpeg -xerror: "corrupt input packet" ends the decode
                    raise Refused("invalid", "corrupt input packet (the file is truncated or damaged)")
                for frame in packet.decode():
                    if to_drop is None:
                        to_drop = _priming(stream, frame)
                    if (frame.format.name, frame.layout.name, frame.sample_rate) != shape:
                        # A new shape mid-stream (or the first frame): what was gathered goes first.
                        resample_gathered()
                        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
                        fifo = av.AudioFifo()
                    frame.pts = None  # the FIFO checks pts against its count; positions are not used
                    fifo.write(frame)
                    if fifo.samples >= frame.sample_rate // 2:
                        resample_gathered()
            resample_gathered()
            emit(resampler.resample(None))
        except av.FFmpegError as exc:
            # As ffmpeg's -xerror: a corrupt packet is an error, not a silently partial answer.
            raise Refused("invalid", _reason(exc)) from None
        flush()
        return total


def _priming(stream: Any, first: Any) -> int:
    """Output samples (16 kHz) between the first decoded frame and the stream's start time."""
    if stream.start_time is None or first.pts is None or stream.time_base is None:
        return 0
    seconds = float((stream.start_time - first.pts) * stream.time_base)
    return max(0, min(int(round(seconds * SAMPLE_RATE)), SAMPLE_RATE))


def _reason(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).splitlines()[0][:300] if text else type(exc).__name__


def main() -> None:
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    import av
    import av.logging

    av.logging.set_level(None)  # FFmpeg's own log stays out of the bridge's log
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = sys.stdout.buffer
    send(out, b"r")
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            samples = decode(av, request["path"], int(request["max_samples"]), out)
            send(out, b"d", json.dumps({"samples": samples}).encode())
        except Refused as exc:
            send(out, b"e", json.dumps({"kind": exc.kind, "message": str(exc)}).encode())
        except MemoryError:
            send(out, b"e", json.dumps({"kind": "invalid", "message": "decoding needed too much memory"}).encode())
        out.flush()


if __name__ == "__main__":
    main()
