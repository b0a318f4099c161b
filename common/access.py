"""What both services do around every request: a request id, one log line, and the figures the
metrics are made of.

``AccessMiddleware`` keeps a valid ``x-request-id`` from the caller (or makes one), returns it in
the response, makes it the request id of every log line written meanwhile, and when the response
has ended writes one access line from the request's ``AccessRecord``. Handlers fill in what only
they know (the key name, the model, the audio seconds) through ``access_record(request)``.
Metrics are served by prometheus-client on a port of their own (``serve_metrics``), never on the
API port.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.logs import request_id_var

# Letters, digits and . _ : - only: an id is written into log lines and headers as it is.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's x-request-id when it is a valid one, else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
    return uuid.uuid4().hex


def route_label(path: str, routes: Collection[str]) -> str:
    """The route a path belongs to, as a metric label: one of ``routes`` ("/v1/models/{id}" matches
    any one segment there), else "other" (so unknown paths cannot grow the label set)."""
    if path in routes:
        return path
    parts = path.split("/")
    for route in routes:
        pattern = route.split("/")
        if "{" in route and len(pattern) == len(parts) and all(
                p == s or (p.startswith("{") and s) for p, s in zip(pattern, parts, strict=True)):
            return route
    return "other"


@dataclass
class AccessRecord:
    request_id: str
    method: str
    path: str
    route: str
    status: int = 0  # the response's; a handler may set what really happened (499 client gone)
    key: str = ""  # key name (proxy), never the key
    key_hint: str = ""  # a refused key's first characters, so an operator can tell which one
    model: str = ""
    audio_seconds: float | None = None
    bytes_in: int = 0
    seconds: float = 0.0

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": self.request_id, "method": self.method, "path": self.path,
                               "status": self.status, "latency_ms": round(self.seconds * 1000, 1)}
        for name in ("key", "key_hint", "model"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.audio_seconds is not None:
            out["audio_seconds"] = round(self.audio_seconds, 3)
        out["bytes_in"] = self.bytes_in
        return out

    def line(self) -> str:
        text = f"{self.request_id} {self.method} {self.path} {self.status} {self.seconds * 1000:.0f} ms"
        if self.key:
            text += f" key={self.key}"
        if self.key_hint:
            text += f" key_hint={self.key_hint}"
        if self.model:
            text += f" model={self.model}"
        if self.audio_seconds is not None:
            text += f" audio={self.audio_seconds:.2f}s"
        return text


def access_record(request: Request) -> AccessRecord:
    record: AccessRecord = request.scope["state"]["access"]
    return record


def key_hint(token: str) -> str:
    """At most the first 12 characters of a presented key, and at most a quarter of it: enough to
    tell keys apart in a log, never enough to use one."""
    return token[:min(12, len(token) // 4)] + "…"


class AccessMiddleware:
    def __init__(self, app: ASGIApp, *, logger: str, routes: Collection[str],
                 observe: Callable[[AccessRecord], None] | None = None,
                 quiet_paths: Collection[str] = ("/health",)) -> None:
        self.app = app
        self.log = logging.getLogger(logger)
        self.routes = routes
        self.observe = observe
        self.quiet_paths = quiet_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        record = AccessRecord(request_id_from(scope["headers"]), scope["method"], path,
                              route_label(path, self.routes))
        scope.setdefault("state", {})["access"] = record
        token = request_id_var.set(record.request_id)
        started = time.monotonic()
        header = (b"x-request-id", record.request_id.encode())

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                record.bytes_in += len(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                if not record.status:
                    record.status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message["headers"] = [*headers, header]
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_id)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            record.seconds = time.monotonic() - started
            if path not in self.quiet_paths:
                self.log.info("%s", record.line(), extra={"fields": record.fields()})
            if self.observe is not None:
                try:
                    self.observe(record)
                except Exception:  # noqa: BLE001 - metrics never fail a request
                    self.log.exception("recording metrics failed")
            request_id_var.reset(token)


def serve_metrics(registry: Any, host: str, port: int, setting: str) -> Callable[[], None] | None:
    """Serve ``registry`` at http://host:port/metrics from a thread (prometheus-client's own
    server); returns the function that stops it, or None when ``port`` is 0 (off). A port that is
    taken stops the start with a message naming ``setting``."""
    from prometheus_client import start_http_server

    if not port:
        return None
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise RuntimeError(f"cannot serve metrics on {host}:{port} ({setting}; 0 turns them off): {exc}") from exc
    logging.getLogger("common.metrics").info("metrics at http://%s:%d/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
