"""Running an ASGI app under uvicorn the way both services want it."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.errors import error_response


class HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head.

    uvicorn times out idle keep-alive connections, but a client that sends a request's headers a
    byte at a time (slowloris) holds its connection for ever: the first byte cancels the keep-alive
    timer and nothing else is armed. Here a timer is armed when a connection opens and after each
    response; if the client has still not sent a complete request head when it fires, the
    connection is closed. Bodies have their own limit in the services (BODY_READ_TIMEOUT).
    """

    head_timeout: float = 10.0
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        if self.head_timeout > 0 and not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_deadline_passed)

    def _head_deadline_passed(self) -> None:
        self._head_deadline = None
        # IDLE: no complete request head since the connection opened or the last response ended.
        # A connection upgraded to a WebSocket has another protocol by then and is left alone.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing() \
                and self.transport.get_protocol() is self:
            self.logger.debug("closing %s: no complete request head within %g s (HEADER_READ_TIMEOUT)",
                              self.client, self.head_timeout)
            self.transport.close()


class AnswerCutOffRequests:
    """A request still running when the graceful shutdown's time is up is cancelled by uvicorn,
    which then answers a plain-text "Internal Server Error" 500. Answer it instead in OpenAI's error
    shape: 503 ``shutting_down`` with Retry-After, which the SDKs retry (a restarted service, or
    another replica, answers it). Found by `docker compose stop` during a long transcription."""

    def __init__(self, app: Any, retry_after: int = 5) -> None:
        self.app = app
        self.retry_after = retry_after

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer = WatchedSend(send)
        try:
            await self.app(scope, receive, answer.send)
        except asyncio.CancelledError:
            if answer.started:
                raise  # part of an answer went out: nothing cleaner can be said now
            response = error_response(503, "the server is shutting down; retry shortly", code="shutting_down",
                                      type="server_error", retry_after=self.retry_after)
            await response(scope, receive, send)


class WatchedSend:
    """An ASGI ``send`` that notes whether the answer has started."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self.started = False

    async def send(self, message: Any) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


KEEP_ALIVE_SECONDS = 5  # how long a service keeps a client's idle connection open (uvicorn's default)


def run_server(app: Any, host: str, port: int, *, graceful_seconds: int = 30, header_timeout: float = 10.0) -> int:
    """Serve until SIGTERM/SIGINT, shut down gracefully, and return an exit code.

    uvicorn re-raises the signal it caught once it has shut down, which makes a clean stop look
    like death by SIGTERM (exit 143) to Docker and supervisors. Handlers that do nothing are
    installed first, so the re-raised signal lands there and a clean stop exits 0.

    ``header_timeout``: seconds a connection may take to send a complete request head (0 = none).
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    protocol = type("HeadDeadlineH11", (HeadDeadlineH11,), {"head_timeout": header_timeout})
    config = uvicorn.Config(AnswerCutOffRequests(app), host=host, port=port, log_config=None, access_log=False,
                            http=protocol, timeout_graceful_shutdown=graceful_seconds, lifespan="on",
                            timeout_keep_alive=KEEP_ALIVE_SECONDS)
    server = uvicorn.Server(config)
    server.run()
    # uvicorn returns normally when the lifespan start failed; say so through the exit code.
    return 0 if server.started else 1
