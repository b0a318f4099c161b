"""``managed-websocket`` adapter (default): the bridge starts and supervises
``sherpa-onnx-offline-websocket-server`` as its child and talks to it over a connection pool.

* Ready = the child printed ``Listening on`` and answered a real round trip.
* Its stdout/stderr are drained line by line into the bridge's log (a full pipe blocks the child).
* A child that dies is restarted with capped exponential backoff; more than
  ``ENGINE_MAX_RESTARTS`` crashes within ``ENGINE_RESTART_WINDOW`` seconds and the supervisor
  gives up: the bridge reports not ready and says so in the log.
* The child gets SIGKILL if the bridge dies (PR_SET_PDEATHSIG), SIGTERM then SIGKILL on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from adapters.websocket import PROBE, ConnectionPool
from bridge.ports import EngineHealth, EngineModel, EngineResult, EngineUnavailable, ModelEngine

log = logging.getLogger("bridge.engine")

SERVER_BINARY = "sherpa-onnx-offline-websocket-server"
_PR_SET_PDEATHSIG = 1


class EngineStartError(RuntimeError):
    pass


def find_binary(name: str, binary_dir: Path | None) -> str:
    if binary_dir is not None:
        candidate = Path(binary_dir) / name
        if candidate.is_file():
            return str(candidate)
        raise EngineStartError(f"{name} not found in ENGINE_BINARY_DIR={binary_dir}")
    # PATH first; then beside the running Python, where pip puts sherpa-onnx-bin's binaries in a
    # virtual environment that was not activated (.venv/bin/python -m bridge).
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise EngineStartError(
            f"{name} not found on PATH: install sherpa-onnx-bin==1.13.3 (pip) or set ENGINE_BINARY_DIR"
        )
    return found


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the bridge dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# What the engine (websocketpp) prints when a connection goes away mid-write: the bridge closing a
# connection whose piece was cancelled, or the bridge stopping. The bridge sees and reports any real
# failure on its side of the connection, so these are chatter.
CONNECTION_CHATTER = ("[connect]", "[disconnect]", "Number of active connections", "handle_write_frame error",
                      "async_write error", "Broken pipe", "Decode:")
ALARMING = ("error", "warn", "fail", "exception", "fatal")


def engine_line_level(text: str, *, ready: bool, closing: bool) -> int:
    """The log level of one line of the engine's output: its start-up at INFO, per-connection
    chatter and the noise of a clean stop at DEBUG (shown with ENGINE_LOG_LEVEL=debug), anything
    else alarming at WARNING."""
    if closing or any(c in text for c in CONNECTION_CHATTER):
        return logging.DEBUG
    if any(w in text.lower() for w in ALARMING):
        return logging.WARNING
    return logging.DEBUG if ready else logging.INFO


class EngineSupervisor:
    """Starts, watches and restarts one engine child for one model."""

    def __init__(
        self,
        spec: EngineModel,
        *,
        binary: str,
        provider: str,
        num_threads: int,
        num_work_threads: int,
        max_batch_size: int,
        max_utterance_seconds: float,
        ready_timeout: float,
        max_restarts: int,
        restart_window: float,
        pool: ConnectionPool,
    ) -> None:
        self.spec = spec
        self.binary = binary
        self.requested_provider = provider
        self.provider_in_use = provider
        self.num_threads = num_threads
        self.num_work_threads = num_work_threads
        self.max_batch_size = max_batch_size
        self.max_utterance_seconds = max_utterance_seconds
        self.ready_timeout = ready_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.pool = pool
        self.proc: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self.restarts = 0
        self.gave_up = False
        self.ready = asyncio.Event()
        self.detail = "not started"
        self._closing = False
        self._crashes: deque[float] = deque()
        self._listening: asyncio.Event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_task: asyncio.Task[None] | None = None

    def command(self, port: int) -> list[str]:
        return [
            self.binary,
            f"--port={port}",
            f"--provider={self.requested_provider}",
            f"--num-threads={self.num_threads}",
            f"--num-work-threads={self.num_work_threads}",
            "--num-io-threads=1",
            f"--max-batch-size={self.max_batch_size if self.spec.batches else 1}",
            f"--max-utterance-length={int(self.max_utterance_seconds) + 1}",
            # The default ./log.txt grows forever; everything useful is on stderr anyway.
            "--log-file=/dev/null",
            *self.spec.flags,
        ]

    async def start(self) -> None:
        await self._spawn_until_ready()
        self._watch_task = asyncio.create_task(self._watch(), name=f"engine-watch-{self.spec.id}")

    async def _spawn_until_ready(self) -> None:
        port = free_port()
        self._listening = asyncio.Event()
        self.provider_in_use = self.requested_provider
        started = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        self.port = port
        proc = self.proc
        log.info("engine starting: pid %s, port %s, model %s, provider %s",
                 proc.pid, port, self.spec.id, self.requested_provider)
        self._tasks = [
            asyncio.create_task(self._drain(proc.stdout, proc.pid)),  # type: ignore[arg-type]
            asyncio.create_task(self._drain(proc.stderr, proc.pid)),  # type: ignore[arg-type]
        ]
        exited = asyncio.create_task(proc.wait())
        listening = asyncio.create_task(self._listening.wait())
        done, _ = await asyncio.wait({exited, listening}, timeout=self.ready_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if exited in done:
            await self._reap_drains()
            raise EngineStartError(f"engine exited with code {proc.returncode} before listening")
        exited.cancel()
        if listening not in done:
            await self._kill()
            raise EngineStartError(f"engine did not listen within {self.ready_timeout:.0f} s")
        self.pool.reset(f"ws://127.0.0.1:{port}")
        try:
            await self.pool.transcribe(PROBE)
        except Exception as exc:
            await self._kill()
            raise EngineStartError(f"engine listened but failed a round trip: {exc}") from exc
        self.detail = f"ready in {time.monotonic() - started:.2f} s"
        log.info("engine ready: pid %s, model %s, provider in use %s (%s)",
                 proc.pid, self.spec.id, self.provider_in_use, self.detail)
        self.ready.set()

    async def _drain(self, stream: asyncio.StreamReader, pid: int) -> None:
        while True:
            try:
                line = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an overlong line: skip it rather than stop draining
            if not line:
                return
            text = line.decode("utf-8", errors="replace").rstrip()
            if not text:
                continue
            if "Listening on" in text:
                self._listening.set()
            if "Fallback to cpu" in text:
                self.provider_in_use = "cpu"
                log.warning("engine[%s]: CUDA requested but not available; running on CPU", pid)
            log.log(engine_line_level(text, ready=self.ready.is_set(), closing=self._closing),
                    "engine[%s] %s", pid, text)

    async def _reap_drains(self) -> None:
        for task in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 2)

    async def _watch(self) -> None:
        while not self._closing:
            assert self.proc is not None
            code = await self.proc.wait()
            await self._reap_drains()
            if self._closing:
                return
            self.ready.clear()
            self.pool.reset()
            log.error("engine pid %s exited with code %s; restarting", self.proc.pid, code)
            while not self._closing:
                now = time.monotonic()
                self._crashes.append(now)
                while self._crashes and now - self._crashes[0] > self.restart_window:
                    self._crashes.popleft()
                if len(self._crashes) > self.max_restarts:
                    self.gave_up = True
                    self.detail = (f"gave up: {len(self._crashes)} engine crashes within "
                                   f"{self.restart_window:.0f} s")
                    log.critical("engine for %s crashed %d times within %.0f s; giving up (not ready)."
                                 " Check the engine log lines above, then restart the bridge.",
                                 self.spec.id, len(self._crashes), self.restart_window)
                    return
                delay = min(10.0, 0.25 * 2 ** (len(self._crashes) - 1))
                self.detail = f"restarting in {delay:.2f} s"
                await asyncio.sleep(delay)
                if self._closing:
                    return
                try:
                    await self._spawn_until_ready()
                except EngineStartError as exc:
                    log.error("engine restart failed: %s", exc)
                    continue
                self.restarts += 1
                break

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            await self._reap_drains()
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await self._reap_drains()

    async def close(self) -> None:
        self._closing = True
        self.ready.clear()
        await self.pool.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self._kill()
        if self.proc is not None:
            log.info("engine pid %s stopped (code %s)", self.proc.pid, self.proc.returncode)


class ManagedWebSocketEngine(ModelEngine):
    def __init__(self, spec: EngineModel, supervisor: EngineSupervisor, restart_wait: float = 15.0) -> None:
        super().__init__(spec)
        self.supervisor = supervisor
        self.restart_wait = restart_wait

    async def start(self) -> None:
        await self.supervisor.start()

    async def transcribe(self, samples: np.ndarray, keywords: tuple[str, ...] = ()) -> EngineResult:
        sup = self.supervisor
        # One internal retry: a request caught by an engine crash waits for the restart once.
        for attempt in (1, 2):
            if not sup.ready.is_set():
                if sup.gave_up:
                    raise EngineUnavailable("engine gave up after repeated crashes", retry_after=30)
                try:
                    await asyncio.wait_for(sup.ready.wait(), self.restart_wait)
                except asyncio.TimeoutError:
                    raise EngineUnavailable("engine is restarting", retry_after=5) from None
            try:
                return await sup.pool.transcribe(samples)
            except EngineUnavailable:
                if attempt == 2 or sup._closing:
                    raise
                # Did the child die? Give the event loop a moment to reap it; if so, wait for
                # the supervisor's restart before the one retry.
                proc = sup.proc
                if proc is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(proc.wait()), 1.0)
                    if proc.returncode is not None and sup.proc is proc:
                        sup.ready.clear()
        raise AssertionError("unreachable")

    def health(self) -> EngineHealth:
        sup = self.supervisor
        alive = sup.proc is not None and sup.proc.returncode is None
        return EngineHealth(
            ready=sup.ready.is_set() and alive,
            provider=sup.provider_in_use,
            pid=sup.proc.pid if alive and sup.proc else None,
            restarts=sup.restarts,
            detail=sup.detail,
        )

    async def close(self) -> None:
        await self.supervisor.close()
