"""The OpenAI error shape, used by every non-2xx answer of both services.

``{"error": {"message", "type", "param", "code"}}``; ``x-should-retry: false`` where a retry
cannot help (the OpenAI SDKs honour it), ``Retry-After`` where waiting can.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An error answered to the client in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or default_type(status)
        self.retry_after = retry_after
        self.should_retry = default_should_retry(status) if should_retry is None else should_retry
        self.headers = headers or {}

    def to_response(self) -> JSONResponse:
        return error_response(
            self.status,
            self.message,
            code=self.code,
            param=self.param,
            type=self.type,
            retry_after=self.retry_after,
            should_retry=self.should_retry,
            headers=self.headers,
        )


def default_type(status: int) -> str:
    return _TYPES.get(status, "server_error")


def default_should_retry(status: int) -> bool:
    # What the SDKs retry. Other 4xx are never retried by them anyway; the header says it
    # explicitly so that proxies and other clients know too.
    return status in (408, 409, 429) or status >= 500


def error_body(message: str, *, type: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
    retry_after: float | None = None,
    should_retry: bool | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if should_retry is None:
        should_retry = default_should_retry(status)
    out = dict(headers or {})
    if retry_after is not None:
        out["Retry-After"] = str(max(1, int(round(retry_after))))
    out["x-should-retry"] = "true" if should_retry else "false"
    body = error_body(message, type=type or default_type(status), code=code, param=param)
    return JSONResponse(body, status_code=status, headers=out)


def validation_error_response(errors: list[Any]) -> JSONResponse:
    """FastAPI's request validation errors (``RequestValidationError.errors()``) as a 400 in the
    OpenAI shape, naming the first bad field, rather than FastAPI's 422."""
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ())[1:])
    return error_response(400, f"invalid {where or 'request'}: {first.get('msg', 'not valid')}", param=where or None,
                          code="invalid_value")
