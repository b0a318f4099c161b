"""``websocket`` adapter: a pool of connections to a sherpa-onnx offline WebSocket server.

Used on its own for a server that someone else runs (``ENGINE_URL``), and by the managed adapter
for the child it supervises. Each connection carries one utterance at a time (the protocol has no
request id), so the pool size is the number of pieces in flight; the server batches what waits.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from adapters.sherpa_protocol import DONE, parse_reply, utterance_frames
from bridge.ports import EngineHealth, EngineModel, EngineRejected, EngineResult, EngineUnavailable, ModelEngine

log = logging.getLogger("bridge.engine")

# A short silence proves a real round trip through the model.
PROBE = np.zeros(4000, dtype=np.float32)


class ConnectionPool:
    def __init__(self, url: str, size: int, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.size = size
        self._idle: asyncio.Queue[ClientConnection | None] = asyncio.Queue()
        self._generation = 0
        for _ in range(size):
            self._idle.put_nowait(None)

    def reset(self, url: str | None = None) -> None:
        """Forget every connection (the server restarted, maybe on another port)."""
        if url is not None:
            self.url = url
        self._generation += 1

    async def transcribe(self, samples: np.ndarray) -> EngineResult:
        conn = await self._idle.get()
        generation = self._generation
        healthy = False
        try:
            if conn is None or conn.state.name != "OPEN" or getattr(conn, "_pool_gen", -1) != generation:
                if conn is not None:
                    await _close_quietly(conn)
                conn = await asyncio.wait_for(
                    connect(self.url, max_size=None, compression=None, ping_interval=None,
                            open_timeout=5, close_timeout=1),
                    timeout=10,
                )
                conn._pool_gen = generation  # type: ignore[attr-defined]
            for frame in utterance_frames(samples):
                await conn.send(frame)
            reply = await asyncio.wait_for(conn.recv(), timeout=self.timeout)
            healthy = True
            return parse_reply(reply)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if code == 1009:
                raise EngineRejected("the engine refused the audio as too long (1009)") from exc
            raise EngineUnavailable(f"engine connection closed ({code})") from exc
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            raise EngineUnavailable(f"engine not reachable at {self.url}: {exc!r}") from exc
        finally:
            if not healthy and conn is not None:
                # Cancelled or failed mid-utterance: the connection's state is unknown, drop it.
                asyncio.ensure_future(_close_quietly(conn))
                conn = None
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        self._generation += 1
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                await _close_quietly(conn, say_done=True)


async def _close_quietly(conn: ClientConnection, say_done: bool = False) -> None:
    try:
        if say_done and conn.state.name == "OPEN":
            await asyncio.wait_for(conn.send(DONE), 1)
        await asyncio.wait_for(conn.close(), 2)
    except Exception:  # noqa: BLE001 - closing a broken connection must not raise
        pass


class WebSocketEngine(ModelEngine):
    """A server we do not run: the pool plus a readiness probe."""

    def __init__(self, spec: EngineModel, url: str, connections: int, timeout: float, provider: str) -> None:
        super().__init__(spec)
        self.pool = ConnectionPool(url, connections, timeout)
        self.provider = provider
        self._ready = False
        self._detail = "not started"

    async def start(self) -> None:
        await self.pool.transcribe(PROBE)
        self._ready = True
        self._detail = f"connected to {self.pool.url}"
        log.info("engine at %s answered a round trip; model %s", self.pool.url, self.spec.id)

    async def transcribe(self, samples: np.ndarray, keywords: tuple[str, ...] = ()) -> EngineResult:
        try:
            result = await self.pool.transcribe(samples)
        except EngineUnavailable as exc:
            self._ready = False
            self._detail = str(exc)
            raise
        self._ready = True
        return result

    def health(self) -> EngineHealth:
        return EngineHealth(ready=self._ready, provider=self.provider, detail=self._detail)

    async def close(self) -> None:
        self._ready = False
        await self.pool.close()
