"""The default decoder (``AUDIO_DECODER=pyav``): a pool of decoder worker processes started once.

Each worker (``bridge.decoding.pyav_worker``) decodes one file at a time with FFmpeg's libraries and streams
16 kHz mono 16-bit samples back, which go into the request's ``AudioStream`` as it arrives. A request
waits for a free worker (at most ``DECODER_WORKERS`` decode at once; decoding is far faster than
the engine, so this is not where requests queue).

Isolation: a worker that dies mid-file (a decoder crash on a crafted file) fails that request with
a 400 and is replaced; one that runs past the wall-clock limit, or whose request went away, is
killed and replaced. Other requests are decoded by other workers meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bridge.decoding.stream import AudioDecodeError, AudioStream, AudioTimeout, AudioTooLong

log = logging.getLogger("bridge.decoder")
HEADER = struct.Struct("<cI")
MAX_FRAME = 64 * 1024 * 1024
READ_BUFFER = 1 << 20  # bytes read ahead from a worker's pipe (asyncio's default, 64 KiB, stalls on its chunks)


class WorkerGone(RuntimeError):
    pass


class DecoderWorker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.ready = False  # the worker's "r" frame has been read

    @classmethod
    async def spawn(cls, memory_mb: int) -> DecoderWorker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.decoding.pyav_worker", str(memory_mb),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
            cwd=str(Path(__file__).resolve().parents[2]),
            limit=READ_BUFFER,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def read_frame(self) -> tuple[bytes, bytes]:
        assert self.proc.stdout is not None
        try:
            kind, size = HEADER.unpack(await self.proc.stdout.readexactly(HEADER.size))
            if size > MAX_FRAME:
                raise WorkerGone(f"decoder worker sent a frame of {size} bytes")
            payload = await self.proc.stdout.readexactly(size) if size else b""
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise WorkerGone("decoder worker exited") from exc
        return kind, payload

    async def wait_ready(self) -> None:
        if not self.ready:
            kind, _ = await self.read_frame()
            if kind != b"r":
                raise WorkerGone(f"decoder worker sent {kind!r} before ready")
            self.ready = True

    async def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


@dataclass
class Lease:
    """One file's hold on a worker: which worker (once one is free), and whether it is left ready
    for the next file (it finished this one cleanly)."""

    worker: DecoderWorker | None = None
    reusable: bool = False


class DecoderPool:
    def __init__(self, workers: int, memory_mb: int) -> None:
        self.size = workers
        self.memory_mb = memory_mb
        self._idle: asyncio.Queue[DecoderWorker] = asyncio.Queue()
        self._all: set[DecoderWorker] = set()
        self._closed = False
        self.replaced = 0  # workers killed or lost and replaced (crash, hang, request gone)

    async def start(self, timeout: float = 60.0) -> None:
        """Start the workers and wait until each has loaded FFmpeg's libraries."""
        workers = await asyncio.gather(*(DecoderWorker.spawn(self.memory_mb) for _ in range(self.size)))
        self._all.update(workers)
        try:
            await asyncio.wait_for(asyncio.gather(*(w.wait_ready() for w in workers)), timeout)
        except (WorkerGone, asyncio.TimeoutError) as exc:
            await self.close()
            raise RuntimeError("the PyAV decoder workers did not start (is the 'av' package installed? "
                               "AUDIO_DECODER=ffmpeg uses the ffmpeg command instead); see the log above") from exc
        for w in workers:
            self._idle.put_nowait(w)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._all if w.alive]

    async def decode(self, path: Path, stream: AudioStream, *, timeout: float) -> None:
        """Decode ``path`` into ``stream`` (finishing it with the result) within ``timeout`` seconds,
        waiting for a free worker included."""
        lease = Lease()
        try:
            await asyncio.wait_for(self._decode_on(lease, path, stream), timeout)
        except asyncio.TimeoutError:
            stream.finish(AudioTimeout(timeout))
            if lease.worker is not None:
                log.warning("decoder worker %d passed the %.0f s limit on one file: killed", lease.worker.pid, timeout)
        except WorkerGone:
            assert lease.worker is not None
            log.warning("decoder worker %d died on a file (exit %s): replaced", lease.worker.pid,
                        lease.worker.proc.returncode)
            stream.finish(AudioDecodeError("could not decode the audio: the decoder failed on this file"))
        except BaseException as exc:  # cancelled (the request went away) or a bug: never reuse
            stream.finish(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            raise
        finally:
            await self._give_back(lease)

    async def _decode_on(self, lease: Lease, path: Path, stream: AudioStream) -> None:
        """Take a live worker into ``lease`` and decode the file on it."""
        lease.worker = await self._idle.get()
        while not lease.worker.alive:  # died while idle (killed from outside): not this file's fault
            await self._replace(lease.worker, reason="exited while idle")
            lease.worker = await self._idle.get()
        lease.reusable = await self._run(lease.worker, path, stream)

    async def _give_back(self, lease: Lease) -> None:
        """The leased worker back to the idle ones if it is ready for another file, else replaced."""
        if lease.worker is None:
            return
        if lease.reusable and lease.worker.alive:
            self._idle.put_nowait(lease.worker)
        else:
            await self._replace(lease.worker)

    async def _run(self, worker: DecoderWorker, path: Path, stream: AudioStream) -> bool:
        """One file through one worker; True when the worker is left ready for the next file."""
        assert worker.proc.stdin is not None
        request = {"path": str(path), "max_samples": stream.limit}
        try:
            worker.proc.stdin.write(json.dumps(request).encode() + b"\n")
            await worker.proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise WorkerGone("decoder worker exited") from exc
        await worker.wait_ready()
        while True:
            kind, payload = await worker.read_frame()
            if kind == b"a":
                if not stream.append(np.frombuffer(payload, dtype="<i2")):
                    return False  # too long or aborted here: the worker is mid-file, replace it
            elif kind == b"d":
                stream.finish()
                return True
            elif kind == b"e":
                info = json.loads(payload)
                if info.get("kind") == "too_long":
                    stream.finish(AudioTooLong(stream.max_seconds))
                elif info.get("kind") == "no_audio":
                    stream.finish(AudioDecodeError("could not decode the audio: the file has no audio track"))
                else:
                    stream.finish(AudioDecodeError(f"could not decode the audio: {info.get('message', '?')}"))
                return True
            else:
                raise WorkerGone(f"decoder worker sent an unknown frame {kind!r}")

    async def _replace(self, worker: DecoderWorker, reason: str = "") -> None:
        self._all.discard(worker)
        await worker.kill()
        if self._closed:
            return
        self.replaced += 1
        fresh = await DecoderWorker.spawn(self.memory_mb)
        log.info("decoder worker %d replaced by %d%s", worker.pid, fresh.pid, f" ({reason})" if reason else "")
        self._all.add(fresh)
        self._idle.put_nowait(fresh)  # its "ready" frame is read before its first file

    async def close(self) -> None:
        self._closed = True
        for worker in list(self._all):
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
        for worker in list(self._all):
            try:
                await asyncio.wait_for(worker.proc.wait(), 2)
            except asyncio.TimeoutError:
                await worker.kill()
        self._all.clear()
