"""The OpenAPI description of the audio API both services answer (the wire contract,
``OPENAI_API.md``): request bodies the routes read by hand (multipart, JSON) and every status
with its body, errors in the OpenAI shape. The bridge documents its routes with it; the proxy
publishes the same paths with the key and its own refusals on top. Fuzzers (schemathesis) test
both services against it.
"""

from __future__ import annotations

import copy
from typing import Any

from common.response_formats import RESPONSE_FORMATS, TRANSLATION_FORMATS

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}

_ERROR_TEXT = {
    400: "invalid request or audio that cannot be decoded",
    401: "missing or wrong API key",
    403: "the key may not do this",
    404: "no such model or route",
    408: "the request body stalled",
    409: "the model is not downloaded",
    413: "the upload is larger than MAX_UPLOAD_BYTES",
    429: "over a limit of the key (see Retry-After)",
    500: "internal error",
    502: "the bridge's answer broke off",
    503: "busy, engine down or usage store down: retry after Retry-After",
}


def error(status: int) -> dict[str, Any]:
    return {"description": _ERROR_TEXT.get(status, "error"),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


TRANSCRIPTION_FORM = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "audio or video in any format ffmpeg reads (wav, mp3, m4a, ogg, webm, flac, ...)"},
        "model": {"type": "string", "description": "a catalog id, or an alias of the loaded model: gpt-transcribe "
                  "(OpenAI's current name), whisper-1, gpt-4o-transcribe, gpt-4o-mini-transcribe"},
        "language": {"type": "string", "description": "ISO-639-1 code"},
        "prompt": {"type": "string", "maxLength": 10000},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS),
                            "description": "diarized_json: with model gpt-4o-transcribe-diarize only"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["word", "segment"]}},
        "stream": {"type": "boolean"},
        "chunking_strategy": {"type": "string", "description": "'auto' or a server_vad JSON object "
                              "(or its fields as chunking_strategy[type], chunking_strategy[threshold], ...)"},
        "include[]": {"type": "array", "items": {"type": "string", "enum": ["logprobs"]},
                      "description": "logprobs: each token's log-probability (json; models that give them)"},
        "known_speaker_names[]": {"type": "array", "maxItems": 4, "items": {"type": "string"},
                                  "description": "with gpt-4o-transcribe-diarize: names of known speakers"},
        "known_speaker_references[]": {"type": "array", "maxItems": 4, "items": {"type": "string"},
                                       "description": "data URLs of 2-10 s of each known speaker's audio"},
        "keywords[]": {"type": "array", "maxItems": 100,
                       "items": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": "^[^<>\\r\\n]*$"},
                       "description": "words or phrases to guide the transcription (gpt-transcribe); applied by "
                       "models that can bias their decoding (parakeet), otherwise an x-warning says so"},
        "languages[]": {"type": "array", "maxItems": 30,
                        "items": {"type": "string", "minLength": 2, "maxLength": 2},
                        "description": "possible languages of the audio, ISO-639-1 (gpt-transcribe); the loaded "
                        "model must speak at least one"},
    },
}

TRANSLATION_FORM = {
    "type": "object",
    "required": ["file"],
    "properties": {
        **{name: TRANSCRIPTION_FORM["properties"][name]  # type: ignore[index]
           for name in ("file", "model", "prompt", "temperature")},
        "response_format": {"type": "string", "enum": list(TRANSLATION_FORMATS)},
    },
}

TRANSCRIPTION = {
    "type": "object",
    "required": ["text"],
    "properties": {
        "text": {"type": "string"},
        "language": {"type": "string"},
        "languages": {"type": "array", "items": {"type": "object", "required": ["code"],
                                                 "properties": {"code": {"type": "string"}}},
                      "description": "the languages heard (ISO-639-1); [] when none can be told"},
        "duration": {"type": "number"},
        "segments": {"type": "array", "items": {"type": "object"}},
        "words": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": "object"},
    },
}

MODEL = {"type": "object", "required": ["id", "object"],
         "properties": {"id": {"type": "string"}, "object": {"const": "model"}}}

# Operations by (path, method): their request body and answers. Statuses the proxy adds are in
# ``PROXY_ERRORS``.
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/audio/transcriptions", "post"): {
        "summary": "Transcribe an audio file (OpenAI audio API)",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": TRANSCRIPTION_FORM}}},
        "responses": {
            "200": {"description": "the transcript: JSON (json, verbose_json), text (text, srt, vtt), or "
                                   "server-sent events with stream=true",
                    "content": {"application/json": {"schema": TRANSCRIPTION},
                                "text/plain": {"schema": {"type": "string"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **{str(s): error(s) for s in (400, 404, 413, 500, 503)},
        },
    },
    ("/v1/audio/translations", "post"): {
        "summary": "Translate speech into English (OpenAI audio API); only models the catalog marks as "
                   "translating, others answer 400 model_cannot_translate",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": TRANSLATION_FORM}}},
        "responses": {
            "200": {"description": "the English text: JSON (json, verbose_json) or text (text, srt, vtt)",
                    "content": {"application/json": {"schema": TRANSCRIPTION},
                                "text/plain": {"schema": {"type": "string"}}}},
            **{str(s): error(s) for s in (400, 404, 413, 500, 503)},
        },
    },
    ("/v1/models", "get"): {
        "summary": "The model catalog",
        "responses": {"200": {"description": "the catalog", "content": {"application/json": {"schema": {
            "type": "object", "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL}}}}}},
            "503": error(503)},
    },
    ("/v1/models/{model_id}", "get"): {
        "summary": "One catalog entry",
        "responses": {"200": {"description": "the model", "content": {"application/json": {"schema": MODEL}}},
                      "400": error(400), "404": error(404)},
    },
    ("/v1/models/switch", "post"): {
        "summary": "Load another model in place of the one loaded",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["model_id"],
            "properties": {"model_id": {"type": "string", "minLength": 1, "maxLength": 128}}}}}},
        "responses": {"200": {"description": "switched (or already loaded)", "content": {"application/json": {
            "schema": {"type": "object", "required": ["model", "switched"]}}}},
            **{str(s): error(s) for s in (400, 404, 409, 500, 503)}},
    },
}

HEALTH = {"summary": "Readiness (no key needed)",
          "responses": {"200": {"description": "ready", "content": {"application/json": {"schema": {
              "type": "object", "required": ["status"]}}}},
              "503": {"description": "not ready", "content": {"application/json": {"schema": {
                  "type": "object", "required": ["status"]}}}}}}

PROXY_ERRORS = (401, 403, 408, 413, 429, 502, 503)


def _with_error_schema(schema: dict[str, Any]) -> dict[str, Any]:
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    return schema


def document_bridge(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's generated schema of the bridge with the contract's bodies and answers in place."""
    schema = copy.deepcopy(schema)
    for (path, method), op in OPERATIONS.items():
        target = schema["paths"].setdefault(path, {}).setdefault(method, {})
        target.update(copy.deepcopy(op))
    schema["paths"].setdefault("/health", {})["get"] = copy.deepcopy(HEALTH)
    schema["components"] = {k: v for k, v in schema.get("components", {}).items() if k != "schemas"}
    return _with_error_schema(schema)


def proxy_schema(title: str, version: str, extra_paths: dict[str, Any]) -> dict[str, Any]:
    """The proxy's schema: the contract's operations behind a bearer key, with the refusals the
    proxy adds (key, limits, slow bodies, usage store down), its own ``extra_paths`` and /health."""
    paths: dict[str, Any] = {}
    for (path, method), op in OPERATIONS.items():
        op = copy.deepcopy(op)
        for status in PROXY_ERRORS:
            op["responses"].setdefault(str(status), error(status))
        op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = op
    # With several bridges (BRIDGE_URLS) a switch loads the model on one bridge or on all of them.
    paths["/v1/models/switch"]["post"]["parameters"] = [
        {"name": "bridges", "in": "query", "required": False, "schema": {"type": "string", "enum": ["one", "all"]}}]
    if ("/v1/models/{model_id}", "get") in OPERATIONS:
        paths["/v1/models/{model_id}"]["get"]["parameters"] = [
            {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths.update(copy.deepcopy(extra_paths))
    paths["/health"] = {"get": copy.deepcopy(HEALTH)}
    schema = {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
              "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
    return _with_error_schema(schema)
