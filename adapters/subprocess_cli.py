"""``subprocess`` adapter: one ``sherpa-onnx-offline`` run per piece of audio.

No long-lived child to supervise, at the price of loading the model on every run (~0.4 s for
Moonshine on CPU, seconds for parakeet). Useful where a resident server is not wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import wave
from pathlib import Path

import numpy as np

from adapters.managed_websocket import _die_with_parent
from adapters.sherpa_protocol import parse_reply
from bridge.ports import SAMPLE_RATE, EngineHealth, EngineModel, EngineRejected, EngineResult, ModelEngine

log = logging.getLogger("bridge.engine")

CLI_BINARY = "sherpa-onnx-offline"


def write_wav16(path: Path, samples: np.ndarray) -> None:
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.tobytes())


class SubprocessEngine(ModelEngine):
    def __init__(self, spec: EngineModel, *, binary: str, provider: str,
                 num_threads: int, concurrency: int, timeout: float) -> None:
        super().__init__(spec)
        self.binary = binary
        self.provider = provider
        self.provider_in_use = provider
        self.num_threads = num_threads
        self.timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._ready = False
        self._detail = "not started"

    async def start(self) -> None:
        await self.transcribe(np.zeros(4000, dtype=np.float32))
        self._ready = True
        self._detail = "one sherpa-onnx-offline run per request"

    async def transcribe(self, samples: np.ndarray, keywords: tuple[str, ...] = ()) -> EngineResult:
        async with self._slots:
            with tempfile.TemporaryDirectory(prefix="bridge-cli-") as tmp:
                wav = Path(tmp) / "piece.wav"
                write_wav16(wav, samples)
                proc = await asyncio.create_subprocess_exec(
                    self.binary,
                    *self.spec.flags,
                    f"--provider={self.provider}",
                    f"--num-threads={self.num_threads}",
                    str(wav),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    preexec_fn=_die_with_parent,
                )
                try:
                    out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                    raise
        if b"Fallback to cpu" in err:
            self.provider_in_use = "cpu"
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise EngineRejected(f"sherpa-onnx-offline exited with {proc.returncode}: {' | '.join(tail)}")
        # stdout: optionally the file name and a '----' line, then one JSON line per file.
        for line in out.decode("utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                return parse_reply(line)
        raise EngineRejected("sherpa-onnx-offline printed no result")

    def health(self) -> EngineHealth:
        return EngineHealth(ready=self._ready, provider=self.provider_in_use, detail=self._detail)

    async def close(self) -> None:
        self._ready = False
