"""A decoder worker: FFmpeg's libraries through PyAV, in a process of its own.

``bridge.decoding.pyav_decoder`` starts a few of these once and sends each one file at a time, so a request
costs no process start, while a decoder that crashes or hangs on a crafted file takes down only its
worker (the bridge kills and replaces it). Each worker caps its own address space
(``DECODER_MEMORY_MB``), so a file that makes the decoder allocate without end fails alone.

Protocol, over the worker's stdin and stdout:
- request: one JSON line ``{"path": ..., "max_samples": ...}``;
- replies: frames of a 1-byte kind and a 4-byte little-endian length, then the payload:
  ``r`` ready (once, at start), ``a`` audio (16 kHz mono 16-bit little-endian: what the request's
  ``AudioStream`` stores), then exactly one of
  ``d`` done (JSON ``{"samples": n}``) or ``e`` error (JSON ``{"kind": ..., "message": ...}``, kind
  ``invalid``, ``no_audio`` or ``too_long``).

The protections are those of the ffmpeg command line in ``bridge.decoding.ffmpeg``: the ``file`` protocol
only, the demuxer whitelist, the first audio stream only, and decoding stops once the output passes
``max_samples`` (the duration cap, enforced while decoding).

Run as ``python -m bridge.decoding.pyav_worker MEMORY_MB``.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Any, BinaryIO

from bridge.decoding.ffmpeg import DEMUXER_WHITELIST  # the same whitelist as the ffmpeg command line
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
    """Decode the first audio stream of ``path`` to 16 kHz mono 16-bit samples, sending them in chunks."""
    try:
        container = av.open(f"file:{path}", mode="r", metadata_errors="ignore",
                            options={"protocol_whitelist": "file", "format_whitelist": DEMUXER_WHITELIST})
    except av.FFmpegError as exc:
        raise Refused("invalid", _reason(exc)) from None
    with container:
        if not container.streams.audio:
            raise Refused("no_audio", "the file has no audio track")
        stream = container.streams.audio[0]
        sink = SampleSink(out, max_samples)
        gathered = Gathered(av, sink)
        try:
            _decode_packets(container, stream, sink, gathered)
            gathered.finish()
        except av.FFmpegError as exc:
            # As ffmpeg's -xerror: a corrupt packet is an error, not a silently partial answer.
            raise Refused("invalid", _reason(exc)) from None
        sink.flush()
        return sink.total


def _decode_packets(container: Any, stream: Any, sink: SampleSink, gathered: Gathered) -> None:
    for packet in container.demux(stream):
        if packet.is_corrupt:  # as ffmpeg -xerror: "corrupt input packet" ends the decode
            raise Refused("invalid", "corrupt input packet (the file is truncated or damaged)")
        for frame in packet.decode():
            if sink.to_drop is None:
                sink.to_drop = _priming(stream, frame)
            gathered.add(frame)


class SampleSink:
    """Resampled samples on their way out: the encoder's priming dropped (samples before the
    stream's start time, Opus pre-skip, AAC priming: the ffmpeg command line starts its output
    there, so the same audio comes out of both), the cap checked, sent in chunks."""

    def __init__(self, out: BinaryIO, max_samples: int) -> None:
        self.out, self.max_samples = out, max_samples
        self.pending: list[bytes] = []
        self.pending_samples = 0
        self.total = 0
        self.to_drop: int | None = None  # known once the first frame is decoded

    def emit(self, frames: list[Any]) -> None:
        for frame in frames:
            n = frame.samples
            skip = 0
            if self.to_drop:
                skip = min(n, self.to_drop)
                self.to_drop -= skip
                n -= skip
            if not n:
                continue
            self.pending.append(memoryview(frame.planes[0])[skip * 2:(skip + n) * 2].tobytes())
            self.pending_samples += n
            self.total += n
        if self.total > self.max_samples:
            raise Refused("too_long", "longer than the limit")
        if self.pending_samples >= CHUNK_SAMPLES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            send(self.out, b"a", b"".join(self.pending))
            self.out.flush()
            self.pending.clear()
            self.pending_samples = 0


class Gathered:
    """Decoded frames gathered into blocks of about half a second before the resampler: a call per
    decoded frame (1152 samples of mp3) cost as much as the decoding itself. A new shape mid-stream
    (rate, layout or sample format) ends the block and the resampler, and starts new ones."""

    def __init__(self, av: Any, sink: SampleSink) -> None:
        self.av, self.sink = av, sink
        self.fifo: Any = None
        self.resampler: Resampler | None = None
        self.shape: tuple[str, str, int] | None = None

    def add(self, frame: Any) -> None:
        if (frame.format.name, frame.layout.name, frame.sample_rate) != self.shape:
            # A new shape mid-stream (or the first frame): what was gathered goes first.
            self.finish()
            self.shape = (frame.format.name, frame.layout.name, frame.sample_rate)
            self.fifo = self.av.AudioFifo()
            self.resampler = Resampler(self.av, frame)
        frame.pts = None  # the FIFO checks pts against its count; positions are not used
        self.fifo.write(frame)
        if self.fifo.samples >= frame.sample_rate // 2:
            self._resample()

    def finish(self) -> None:
        """What is gathered, and what the resampler still holds, goes out."""
        self._resample()
        if self.resampler is not None:
            self.sink.emit(self.resampler.resample(None))
            self.resampler = None

    def _resample(self) -> None:
        if self.resampler is not None and self.fifo.samples:
            self.sink.emit(self.resampler.resample(self.fifo.read()))


class Resampler:
    """FFmpeg's resampler (libswresample, through a filter graph) from one shape of decoded audio to
    16 kHz mono 16-bit: downmixed at the source rate first, in float, then resampled and rounded
    (as ``lrintf(x * 32768)``, clipped). Downmixing first leaves a third of the resampling work for
    48 kHz stereo (``bench/README.md``); the samples are those of one resampler doing it all, to one
    step of 16 bits."""

    def __init__(self, av: Any, template: Any) -> None:
        self.av = av
        self.graph = graph = av.filter.Graph()
        nodes = [graph.add("abuffer", sample_rate=str(template.sample_rate), sample_fmt=template.format.name,
                           channel_layout=template.layout.name, time_base=f"1/{template.sample_rate}"),
                 graph.add("aformat", sample_fmts="fltp", channel_layouts="mono"),
                 graph.add("aformat", sample_fmts="s16", sample_rates=str(SAMPLE_RATE)),
                 graph.add("abuffersink")]
        graph.link_nodes(*nodes).configure()

    def resample(self, frame: Any) -> list[Any]:
        """The output for ``frame`` (``None``: the end, the resampler's delay flushed)."""
        self.graph.push(frame)
        out = []
        while True:
            try:
                out.append(self.graph.pull())
            except (self.av.BlockingIOError, self.av.EOFError):
                return out


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
