"""Settings helpers both services use: comma-separated lists, a metrics port apart from the API's,
and errors that name the variable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from pydantic import ValidationError, ValidationInfo
from pydantic_settings import NoDecode

CommaList = Annotated[list[str], NoDecode]


def split_comma_list(value: object) -> object:
    """Lists in environment variables are comma-separated throughout the project."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def apart_from_port(api_field: str) -> Callable[[int, ValidationInfo], int]:
    """A validator for a metrics port: 0 (off) or not the API's port (``api_field``, declared
    before it). On the same port the metrics server, started first, would answer every path."""

    def check(value: int, info: ValidationInfo) -> int:
        if value and value == info.data.get(api_field):
            raise ValueError(f"must differ from {api_field.upper()} (or be 0: no metrics)")
        return value

    return check


class SettingsError(RuntimeError):
    """A setting from the environment is invalid; the message names the variable."""


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]).upper() if err["loc"] else "?"
        lines.append(f"invalid setting {name}={err.get('input')!r}: {err['msg']}")
    return "\n".join(lines)
