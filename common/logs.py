"""Logging both services set up the same way: plain text lines or, with ``LOG_FORMAT=json``, one JSON
object per line. Every line written while a request is handled carries its request id."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

# Set by the request middleware (``common.access``) for the task handling a request; tasks that
# request starts inherit it.
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id", "fields", "color_message"}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        return True


class QuietWebSocketLines(logging.Filter):
    """uvicorn logs every WebSocket handshake and open/close at INFO; each service writes its own
    line per session instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        return not (message in ("connection open", "connection closed") or '"WebSocket /' in message)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id when there
    is one, the structured ``fields`` of an access line, and the exception as text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        for name, value in record.__dict__.items():  # other extra= values
            if name not in _RESERVED and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, fmt: str = "text") -> None:
    """Root logging to stderr at ``level`` ("debug" ... "error"), as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.error").addFilter(QuietWebSocketLines())
    # httpx logs every request at INFO; each service logs its own line per request already.
    logging.getLogger("httpx").setLevel(logging.WARNING)
