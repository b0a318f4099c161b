"""Wire types of the bridge's API (the contract reads here; the routes use them)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import FormData, UploadFile

from bridge.cutting import Chunking
from bridge.languages import is_iso_639_1
from common.errors import APIError
from common.response_formats import RESPONSE_FORMATS, STREAMED_FORMATS, ResponseFormat

FORM_FIELDS = {
    "file", "model", "language", "prompt", "response_format", "temperature",
    "timestamp_granularities[]", "timestamp_granularities", "stream", "chunking_strategy",
    "include[]", "include", "known_speaker_names[]", "known_speaker_names", "known_speaker_references[]",
    "known_speaker_references", "keywords[]", "keywords", "languages[]", "languages",
}
# gpt-transcribe's lists (OpenAI states no bounds; these are this server's): a keyword is a word or
# phrase of at most MAX_KEYWORD_CHARS, without <, >, CR or LF (reported to be refused by OpenAI).
MAX_KEYWORDS = 100
MAX_KEYWORD_CHARS = 100
MAX_LANGUAGES = 30
KEYWORD_FORBIDDEN = ("<", ">", "\r", "\n")
INCLUDES = ("logprobs",)
CHUNKING_PREFIX = "chunking_strategy["  # the SDKs send a dict as chunking_strategy[type]=..., ...


class ServerVadChunking(BaseModel):
    """``chunking_strategy`` of type ``server_vad`` (OpenAI's fields; bounds are this server's)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["server_vad"]
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(200, ge=0, le=2000)
    silence_duration_ms: int = Field(250, ge=100, le=10_000)

    def chunking(self) -> Chunking:
        return Chunking(threshold=self.threshold, min_silence_seconds=self.silence_duration_ms / 1000,
                        padding_seconds=self.prefix_padding_ms / 1000)


class TranscriptionParams(BaseModel):
    model: str = ""
    language: str | None = None
    prompt: str | None = Field(None, max_length=10_000)  # a hint; a transducer cannot use it
    response_format: ResponseFormat = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)  # decoding is greedy; accepted and ignored
    timestamp_granularities: list[Literal["word", "segment"]] = Field(default_factory=list)
    stream: bool = False
    chunking_strategy: Literal["auto"] | ServerVadChunking | None = None
    include: list[str] = Field(default_factory=list)
    known_speaker_names: list[str] = Field(default_factory=list)
    known_speaker_references: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)
    languages: list[str] = Field(default_factory=list)

    @property
    def chunking(self) -> Chunking | None:
        strategy = self.chunking_strategy
        return strategy.chunking() if isinstance(strategy, ServerVadChunking) else None

    @property
    def logprobs(self) -> bool:
        return "logprobs" in self.include

    @field_validator("language")
    @classmethod
    def _iso639_1(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if not is_iso_639_1(value.lower()):
            raise ValueError("language must be an ISO-639-1 code such as 'en'")
        return value.lower()


def _field_error(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _chunking_field(form: FormData) -> str | ServerVadChunking | None:
    """``chunking_strategy`` as sent: ``auto``, a JSON object (curl), or the SDKs' bracketed fields."""
    nested = {key[len(CHUNKING_PREFIX):-1]: value for key, value in form.multi_items()
              if key.startswith(CHUNKING_PREFIX) and key.endswith("]")}
    chunking = form.get("chunking_strategy")
    if nested:
        if chunking is not None:
            raise _field_error("chunking_strategy", "send chunking_strategy either whole or as its fields, not both")
        return _server_vad(nested)
    if not isinstance(chunking, str) or not chunking or chunking == "auto":
        return chunking if isinstance(chunking, str) and chunking else None
    try:
        value = json.loads(chunking)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise _field_error("chunking_strategy", "chunking_strategy must be 'auto' or a JSON object "
                           "{\"type\": \"server_vad\", ...}")
    return _server_vad(value)


def _server_vad(value: dict[str, Any]) -> ServerVadChunking:
    try:
        return ServerVadChunking(**value)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(["chunking_strategy", *(str(part) for part in err["loc"])])
        raise _field_error(param, f"invalid {param}: {err['msg']} (chunking_strategy is 'auto' or "
                           "{\"type\": \"server_vad\", \"threshold\": 0-1, \"prefix_padding_ms\": 0-2000, "
                           "\"silence_duration_ms\": 100-10000})") from None


def _form_list(form: FormData, name: str) -> list[str]:
    """A list field as the SDKs send it (repeated ``name[]`` parts) or without the brackets."""
    values = form.getlist(f"{name}[]") + form.getlist(name)
    if any(not isinstance(v, str) for v in values):
        raise _field_error(f"{name}[]", f"'{name}[]' must be plain form fields")
    return [str(v) for v in values]


def valid_keywords(values: list[str]) -> list[str]:
    """``keywords[]``: words or phrases to guide the transcription, each checked (the error names it)."""
    if len(values) > MAX_KEYWORDS:
        raise _field_error("keywords[]", f"too many keywords: {len(values)}; at most {MAX_KEYWORDS}")
    for i, keyword in enumerate(values):
        problem = ("is empty" if not keyword.strip() else
                   f"is longer than {MAX_KEYWORD_CHARS} characters" if len(keyword) > MAX_KEYWORD_CHARS else
                   "holds <, >, CR or LF" if any(ch in keyword for ch in KEYWORD_FORBIDDEN) else "")
        if problem:
            raise _field_error(f"keywords[{i}]", f"keywords[{i}] {problem}: a keyword is a word or phrase of "
                               f"1 to {MAX_KEYWORD_CHARS} characters without <, >, CR or LF")
    return [keyword.strip() for keyword in values]


def valid_languages(values: list[str]) -> list[str]:
    """``languages[]``: the languages the audio may be in, ISO-639-1 codes."""
    if len(values) > MAX_LANGUAGES:
        raise _field_error("languages[]", f"too many languages: {len(values)}; at most {MAX_LANGUAGES}")
    codes = [value.strip().lower() for value in values]
    for i, code in enumerate(codes):
        if not is_iso_639_1(code):
            raise _field_error(f"languages[{i}]", f"languages[{i}] is {values[i]!r}, not an ISO-639-1 code "
                               "such as 'en' or 'de'")
    return list(dict.fromkeys(codes))


def parse_transcription_form(form: FormData) -> tuple[UploadFile, TranscriptionParams]:
    unknown = sorted(k for k in set(form.keys()) - FORM_FIELDS
                     if not (k.startswith(CHUNKING_PREFIX) and k.endswith("]")))
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
    for name in ("known_speaker_names", "known_speaker_references"):
        raw[name] = _form_list(form, name)
    raw["keywords"] = valid_keywords(_form_list(form, "keywords"))
    raw["languages"] = valid_languages(_form_list(form, "languages"))
    stream = form.get("stream")
    if isinstance(stream, str) and stream:
        if stream.lower() not in ("true", "false", "1", "0"):
            raise _field_error("stream", "stream must be true or false")
        raw["stream"] = stream.lower() in ("true", "1")
    chunking = _chunking_field(form)
    if chunking is not None:
        raw["chunking_strategy"] = chunking
    try:
        params = TranscriptionParams(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(part) for part in err["loc"]]
        param = loc[0] if loc else "?"
        if param == "response_format":
            msg = f"response_format must be one of {', '.join(RESPONSE_FORMATS)}"
        else:
            msg = f"invalid {param}: {err['msg']}"
        raise _field_error(param, msg) from None
    if params.timestamp_granularities and params.response_format != "verbose_json":
        raise _field_error("timestamp_granularities[]", "timestamp_granularities requires response_format=verbose_json")
    if params.stream and params.response_format not in STREAMED_FORMATS:
        raise _field_error("stream", f"stream=true is supported with response_format {', '.join(STREAMED_FORMATS)}")
    unsupported = [value for value in params.include if value not in INCLUDES]
    if unsupported:
        raise _field_error("include[]", f"include values not supported: {unsupported}; this server knows "
                           f"{', '.join(INCLUDES)}")
    if params.logprobs and params.response_format != "json":
        raise _field_error("include[]", "include[]=logprobs works with response_format json only")
    return upload, params


TRANSLATION_FIELDS = {"file", "model", "prompt", "response_format", "temperature"}


def parse_translation_form(form: FormData) -> tuple[UploadFile, TranscriptionParams]:
    """``/v1/audio/translations`` takes OpenAI's five fields; the rest as for a transcription."""
    unknown = sorted(set(form.keys()) - TRANSLATION_FIELDS)
    if unknown:
        raise APIError(400, f"unknown parameter(s) for a translation: {', '.join(unknown)}", param=unknown[0],
                       code="unknown_parameter")
    return parse_transcription_form(form)


class SwitchRequest(BaseModel):
    model_id: str = Field(min_length=1, max_length=128)
