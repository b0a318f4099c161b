"""Streamed forwarding to the bridge with httpx: bodies flow through in chunks both ways, SSE
included; hop-by-hop headers and the client's credentials never reach the bridge. A body is read
with a stall timeout and a size cap (``spool_body``), spooled to a temporary file when it must be.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.requests import Request

from common.errors import APIError

# RFC 9110 7.6.1 hop-by-hop headers, plus what the proxy sets itself.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}
NOT_FORWARDED_UP = HOP_BY_HOP | {"authorization", "cookie", "x-api-key"}
NOT_FORWARDED_DOWN = HOP_BY_HOP | {"content-encoding", "server", "date"}


def upstream_headers(headers: list[tuple[str, str]], request_id: str, content_length: int | None) -> dict[str, str]:
    connection_listed = {h.strip().lower() for k, v in headers if k.lower() == "connection" for h in v.split(",")}
    out = {k: v for k, v in headers if k.lower() not in NOT_FORWARDED_UP and k.lower() not in connection_listed}
    out["x-request-id"] = request_id
    if content_length is not None:
        out["content-length"] = str(content_length)
    return out


def downstream_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in NOT_FORWARDED_DOWN}


class SSEUsageScanner:
    """Finds ``usage.seconds`` in the ``transcript.text.done`` event of a passing SSE stream
    without holding the stream back."""

    def __init__(self) -> None:
        self._buffer = b""
        self.audio_seconds: float | None = None

    def feed(self, chunk: bytes) -> None:
        import json

        self._buffer += chunk
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in event.splitlines():
                if line.startswith(b"data:") and b"transcript.text.done" in line:
                    try:
                        data = json.loads(line[5:].strip())
                        self.audio_seconds = float(data["usage"]["seconds"])
                    except (ValueError, KeyError, TypeError):
                        pass
        if len(self._buffer) > 1 << 20:  # a line this long is not an event we care about
            self._buffer = b""


async def file_chunks(path: str, size: int = 1 << 16) -> AsyncIterator[bytes]:
    import anyio

    async with await anyio.open_file(path, "rb") as fh:
        while chunk := await fh.read(size):
            yield chunk


def form_field(path: str, content_type: str, name: str, limit: int = 256) -> str | None:
    """The value of the plain field ``name`` in a multipart/form-data body saved at ``path`` (the
    model a request names, read before it is routed); None when absent or not multipart. The
    file's bytes pass through the parser and are dropped; only the field's first ``limit``
    bytes are kept."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return None
    state: dict[str, Any] = {"field": b"", "value": b"", "headers": {}, "current": None, "found": None}

    def on_part_begin() -> None:
        state["headers"], state["value"], state["current"] = {}, b"", None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        key = state["field"].lower()
        state["headers"][key] = state["headers"].get(key, b"") + data[start:end]

    def on_header_end() -> None:
        state["field"] = b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name") == name.encode() and b"filename" not in disposition:
            state["current"] = name

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["current"] is not None and len(state["value"]) < limit:
            state["value"] += data[start:min(end, start + limit - len(state["value"]))]

    def on_part_end() -> None:
        if state["current"] is not None and state["found"] is None:
            state["found"] = str(state["value"], "utf-8", "replace")

    parser = MultipartParser(boundary, {  # type: ignore[arg-type]
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    try:
        with open(path, "rb") as fh:
            while state["found"] is None and (chunk := fh.read(1 << 16)):
                parser.write(chunk)
    except Exception:  # noqa: BLE001 - a malformed body: the bridge says what is wrong with it
        return state["found"]
    return state["found"]


async def body_chunks(request: Request, timeout: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that sends nothing for ``timeout`` seconds (a slow
    upload holding a slot: slowloris) gets a 408."""
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body stalled: nothing arrived for {timeout:g} s (BODY_READ_TIMEOUT)",
                           code="request_timeout") from None
        yield chunk


async def spool_body(request: Request, cap: int, timeout: float = 30.0,
                     spool: bool = False) -> tuple[Any, int, str | None]:
    """Returns (body to forward, its length, temp path to delete).

    With Content-Length the body streams straight through (checked against the cap first), unless
    ``spool``. A chunked body, or any body with ``spool`` (several bridges: the body is read for
    its model and may be sent to a second bridge), is spooled to a temporary file while counting,
    so an oversized one is refused before anything reaches a bridge."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"request body larger than {cap // (1024 * 1024)} MiB", code="file_too_large",
                         param="file", should_retry=False)
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise APIError(400, "invalid Content-Length", code="invalid_request") from None
        if length > cap:
            raise too_large

    if declared is not None and not spool:

        async def counted() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in body_chunks(request, timeout):
                seen += len(chunk)
                if seen > cap:
                    raise too_large
                yield chunk

        return counted(), length, None
    if request.method in ("GET", "DELETE") and declared is None:
        return b"", 0, None
    tmp = tempfile.NamedTemporaryFile(prefix="auth-upload-", delete=False)
    size = 0
    try:
        async for chunk in body_chunks(request, timeout):
            size += len(chunk)
            if size > cap:
                raise too_large
            await asyncio.to_thread(tmp.write, chunk)
        tmp.close()
    except BaseException:
        tmp.close()
        os.unlink(tmp.name)
        raise
    return file_chunks(tmp.name), size, tmp.name
