"""Wire types of the bridge's API (the contract reads here; the routes use them)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.datastructures import FormData, UploadFile

from bridge.formats import RESPONSE_FORMATS
from common.errors import APIError

FORM_FIELDS = {
    "file", "model", "language", "prompt", "response_format", "temperature",
    "timestamp_granularities[]", "timestamp_granularities", "stream", "chunking_strategy",
    "include[]", "include",
}


class TranscriptionParams(BaseModel):
    model: str = ""
    language: str | None = None
    prompt: str | None = Field(None, max_length=10_000)  # a hint; a transducer cannot use it
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)  # decoding is greedy; accepted and ignored
    timestamp_granularities: list[Literal["word", "segment"]] = Field(default_factory=list)
    stream: bool = False
    chunking_strategy: str | dict[str, Any] | None = None
    include: list[str] = Field(default_factory=list)

    @field_validator("language")
    @classmethod
    def _iso639_1(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if len(value) != 2 or not value.isascii() or not value.isalpha():
            raise ValueError("language must be an ISO-639-1 code such as 'en'")
        return value.lower()


def _field_error(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def parse_transcription_form(form: FormData) -> tuple[UploadFile, TranscriptionParams]:
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise APIError(400, f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0],
                       code="unknown_parameter")
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "the 'file' field is required and must be a file upload", param="file",
                       code="missing_file")
    raw: dict[str, Any] = {}
    for name in ("model", "language", "prompt", "response_format", "temperature"):
        value = form.get(name)
        if isinstance(value, UploadFile):
            raise _field_error(name, f"'{name}' must be a plain form field")
        if value is not None and value != "":
            raw[name] = value
    grans = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    raw["timestamp_granularities"] = [g for g in grans if isinstance(g, str)]
    raw["include"] = [i for i in form.getlist("include[]") + form.getlist("include") if isinstance(i, str)]
    stream = form.get("stream")
    if isinstance(stream, str) and stream:
        if stream.lower() not in ("true", "false", "1", "0"):
            raise _field_error("stream", "stream must be true or false")
        raw["stream"] = stream.lower() in ("true", "1")
    chunking = form.get("chunking_strategy")
    if isinstance(chunking, str) and chunking:
        if chunking != "auto":
            try:
                raw["chunking_strategy"] = json.loads(chunking)
            except ValueError:
                raise _field_error("chunking_strategy", "chunking_strategy must be 'auto' or a JSON object") from None
        else:
            raw["chunking_strategy"] = "auto"
    try:
        params = TranscriptionParams(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if param == "response_format":
            msg = f"response_format must be one of {', '.join(RESPONSE_FORMATS)}"
        else:
            msg = f"invalid {param}: {err['msg']}"
        raise _field_error(param or "?", msg) from None
    if params.timestamp_granularities and params.response_format != "verbose_json":
        raise _field_error("timestamp_granularities[]", "timestamp_granularities requires response_format=verbose_json")
    if params.stream and params.response_format not in ("json", "text"):
        raise _field_error("stream", "stream=true is supported with response_format json or text")
    if params.include:
        raise _field_error("include[]", f"include values are not supported by this server: {params.include}")
    if isinstance(params.chunking_strategy, dict) and params.chunking_strategy.get("type") not in (None, "server_vad"):
        raise _field_error("chunking_strategy", "chunking_strategy type must be 'server_vad'")
    return upload, params


class SwitchRequest(BaseModel):
    model_id: str = Field(min_length=1, max_length=128)
