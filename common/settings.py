"""Settings helpers both services use: comma-separated lists, and errors that name the variable."""

from __future__ import annotations

from typing import Annotated

from pydantic import ValidationError
from pydantic_settings import NoDecode

CommaList = Annotated[list[str], NoDecode]


def split_comma_list(value: object) -> object:
    """Lists in environment variables are comma-separated throughout the project."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class SettingsError(RuntimeError):
    """A setting from the environment is invalid; the message names the variable."""


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]).upper() if err["loc"] else "?"
        lines.append(f"invalid setting {name}={err.get('input')!r}: {err['msg']}")
    return "\n".join(lines)
