"""Decoded audio as it arrives (``AudioStream``) and where its samples live.

Every upload becomes 16 kHz mono samples in an ``AudioStream``, which grows while the decoder runs,
so that the VAD and the engine start on the first seconds of a long file while the rest is still
being decoded. The samples are kept as 16-bit PCM in an unnamed temporary file in ``TMPDIR``
(``SampleFile``) and read back by slice, so a request's memory stays the same for a minute or for
hours of audio; the disk holds 115 MB per hour, freed when the request ends. A full disk finishes
the stream with ``AudioStorageFull`` (the request's 507), never the bridge. The decoders that fill
it are in ``bridge.decoding.ffmpeg`` and ``bridge.decoding.pyav_decoder``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
import threading
from collections.abc import Callable

import numpy as np

from bridge.ports import SAMPLE_RATE

# Decode a little past the limit so that "longer than the limit" can be told apart.
OVERSHOOT_SECONDS = 0.5


class AudioDecodeError(ValueError):
    """The upload is not decodable audio (or has no audio track)."""


class AudioTooLong(ValueError):
    def __init__(self, limit_seconds: float) -> None:
        super().__init__(f"audio is longer than the limit of {limit_seconds:.0f} s")
        self.limit_seconds = limit_seconds


class AudioTimeout(RuntimeError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"decoding took longer than {seconds:.0f} s")
        self.seconds = seconds


def cap_samples(max_seconds: float) -> int:
    """Samples a decoder may produce for a file limited to ``max_seconds``."""
    return int((max_seconds + OVERSHOOT_SECONDS) * SAMPLE_RATE)


class AudioStorageFull(OSError):
    """The disk that holds requests' decoded audio (TMPDIR) is full."""


class SampleFile:
    """Samples kept as 16-bit PCM in an unnamed temporary file in ``TMPDIR``, written as they are
    decoded and read back by slice: a request's audio costs disk (115 MB an hour), not memory. The
    file has no name from the start, so the system frees it when it is closed or when the process
    ends, however it ends. Reads and writes may come from several threads; after ``close`` a read
    gives nothing (a VAD thread still finishing a window after its request went away)."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="bridge-audio-")
        self._lock = threading.Lock()
        self._closed = False

    def write(self, at: int, chunk: np.ndarray) -> None:
        """Samples ``at``.. onwards (16-bit as they are, float rounded to 16 bits); raises
        ``AudioStorageFull`` when the disk is."""
        if chunk.dtype != np.int16:
            chunk = np.clip(np.rint(chunk * 32768.0), -32768, 32767)
        data = memoryview(chunk.astype("<i2", copy=False).tobytes())
        offset = at * 2
        with self._lock:
            if self._closed:
                return
            try:
                while data:
                    written = os.pwrite(self._file.fileno(), data, offset)
                    data, offset = data[written:], offset + written
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise AudioStorageFull(exc.errno, "no space left for the decoded audio (TMPDIR)") from None
                raise

    def read(self, start: int, end: int) -> np.ndarray:
        with self._lock:
            data = b"" if self._closed or end <= start else os.pread(self._file.fileno(), (end - start) * 2, start * 2)
        return np.frombuffer(data, dtype="<i2").astype(np.float32) * np.float32(1 / 32768)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._file.close()


class SampleArray:
    """Samples kept in memory: audio that arrives whole and short (a live turn, a test's array)."""

    def __init__(self, samples: np.ndarray) -> None:
        self.samples = np.ascontiguousarray(samples, dtype=np.float32)

    def write(self, at: int, chunk: np.ndarray) -> None:
        raise RuntimeError("a stream made from samples is complete")

    def read(self, start: int, end: int) -> np.ndarray:
        return self.samples[start:end]

    def close(self) -> None:
        pass


class AudioStream:
    """16 kHz mono samples that grow while a decoder appends them, kept in a ``SampleFile`` (so a
    request's memory does not grow with its recording) and read back by slice: ``stream[a:b]``
    (``len(stream)`` is what exists so far).

    The decoder side runs on the event loop (``append``, ``finish``); readers are the VAD thread
    (``wait_samples``) and the request (``wait_done``). Holds at most ``limit`` samples: more
    finishes the stream with ``AudioTooLong``. ``close`` (the request's end) frees the file."""

    def __init__(self, max_seconds: float, store: SampleFile | SampleArray | None = None) -> None:
        self.max_seconds = max_seconds
        self.limit = cap_samples(max_seconds)
        self._store = store if store is not None else SampleFile()
        self._n = 0
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._finished = asyncio.Event()
        self._on_abort: Callable[[], None] | None = None
        self._waiters: list[asyncio.Future[None]] = []

    @classmethod
    def from_samples(cls, samples: np.ndarray) -> AudioStream:
        """A stream that is already complete, in memory (live turns, tests, benchmarks)."""
        stream = cls(len(samples) / SAMPLE_RATE, SampleArray(samples))
        stream._n = len(samples)
        stream._done = True
        stream._finished.set()
        return stream

    def close(self) -> None:
        """The request is over: stop the decoder if it still runs, and free the samples."""
        self.abort()
        self._store.close()

    # -- decoder side -------------------------------------------------------------------------

    def append(self, chunk: np.ndarray) -> bool:
        """Add decoded samples (float32, or 16-bit from the PyAV workers); False once the stream is
        finished (too long, aborted, disk full)."""
        if self._done:
            return False
        if chunk.dtype != np.int16 and not np.isfinite(chunk).all():
            chunk = np.nan_to_num(chunk, nan=0.0, posinf=0.0, neginf=0.0)
        end = self._n + len(chunk)
        if end > self.limit:
            self.finish(AudioTooLong(self.max_seconds))
            return False
        try:
            self._store.write(self._n, chunk)
        except AudioStorageFull as exc:
            self.finish(exc)
            return False
        with self._cond:
            self._n = end
            self._cond.notify_all()
        self._wake()
        return True

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._finish_locked(error)

    def _finish_locked(self, error: BaseException | None) -> None:
        if self._done:
            return
        if error is None and self._n == 0:
            error = AudioDecodeError("could not decode the audio: the file contains no audio samples")
        elif error is None and self._n > (self.max_seconds + 0.05) * SAMPLE_RATE:
            error = AudioTooLong(self.max_seconds)
        self._done = True
        self._error = error
        self._cond.notify_all()
        self._finished.set()
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def on_abort(self, callback: Callable[[], None]) -> None:
        self._on_abort = callback

    def abort(self) -> None:
        """The request no longer wants this audio: stop the decoder."""
        if not self._done:
            self.finish(asyncio.CancelledError())
            if self._on_abort is not None:
                self._on_abort()

    # -- reader side --------------------------------------------------------------------------

    @property
    def available(self) -> int:
        return self._n

    @property
    def done(self) -> bool:
        return self._done

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def seconds(self) -> float:
        return self._n / SAMPLE_RATE

    def view(self, start: int, end: int) -> np.ndarray:
        """Samples ``start``..``end`` (as far as they exist), read back as float32."""
        return self._store.read(max(0, start), min(end, self._n))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, piece: slice) -> np.ndarray:
        start, end, step = piece.indices(self._n)
        assert step == 1, "audio is read by contiguous slices"
        return self.view(start, end)

    def wait_samples(self, count: int, stop: threading.Event | None = None) -> int:
        """Block (a thread, never the loop) until ``count`` samples exist or the stream is finished;
        returns how many exist. Raises the decoder's error, if any."""
        with self._cond:
            while self._n < count and not self._done:
                if stop is not None and stop.is_set():
                    break
                self._cond.wait(0.25)
            if self._error is not None:
                raise self._error
            return self._n

    def window(self, start: int, end: int) -> StreamWindow:
        """Samples ``start``..``end`` of this stream, read like a stream of their own."""
        return StreamWindow(self, start, end)

    async def wait_available(self, count: int) -> int:
        """On the loop: wait until ``count`` samples exist or the stream is finished; how many exist."""
        while self._n < count and not self._done:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        return self._n

    async def wait_done(self) -> int:
        """Wait for the end of decoding: the number of samples, or the decoder's error."""
        await self._finished.wait()
        if self._error is not None:
            raise self._error
        return self._n


class StreamWindow:
    """A stretch of an ``AudioStream`` with the reader side of one (``bridge.vad`` scans regions of a
    long file side by side)."""

    def __init__(self, stream: AudioStream, start: int, end: int) -> None:
        self.stream, self.start, self.end = stream, start, end

    @property
    def done(self) -> bool:
        return self.stream.done or self.stream.available >= self.end

    @property
    def available(self) -> int:
        return max(0, min(self.stream.available, self.end) - self.start)

    def view(self, start: int, end: int) -> np.ndarray:
        return self.stream.view(self.start + start, min(self.start + end, self.end))

    def wait_samples(self, count: int, stop: threading.Event | None = None) -> int:
        self.stream.wait_samples(min(self.start + count, self.end), stop)
        return self.available
