"""The response formats of the audio API (``OPENAI_API.md``), listed once: the bridge's form
parser and renderers, the stream check, the timed-format check and the OpenAPI schema of both
services read them from here."""

from __future__ import annotations

from typing import Literal, get_args

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt", "diarized_json"]
RESPONSE_FORMATS: tuple[str, ...] = get_args(ResponseFormat)
STREAMED_FORMATS = ("json", "text", "diarized_json")  # with stream=true
TIMED_FORMATS = ("srt", "vtt", "verbose_json")  # a time for each segment or cue
TRANSLATION_FORMATS = tuple(f for f in RESPONSE_FORMATS if f != "diarized_json")  # /v1/audio/translations
