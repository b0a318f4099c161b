"""Response formats of ``/v1/audio/transcriptions``: json, text, srt, vtt, verbose_json."""

from __future__ import annotations

import zlib
from typing import Any

from starlette.responses import JSONResponse, PlainTextResponse, Response

from bridge.transcript import Transcript

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def usage(seconds: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": round(seconds, 3)}


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def to_srt(t: Transcript) -> str:
    blocks = []
    for i, seg in enumerate([seg for seg in t.segments if seg.text], start=1):  # no empty cues
        blocks.append(f"{i}\n{_clock(seg.start, ',')} --> {_clock(seg.end, ',')}\n{seg.text}\n")
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = ["WEBVTT\n"]
    for seg in t.segments:
        if not seg.text:
            continue
        blocks.append(f"{_clock(seg.start, '.')} --> {_clock(seg.end, '.')}\n{seg.text}\n")
    return "\n".join(blocks)


def _compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return round(len(raw) / max(1, len(zlib.compress(raw))), 3) if raw else 0.0


def to_verbose_json(t: Transcript, language: str, want_words: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": language,
        "duration": round(t.duration, 3),
        "text": t.text,
        "segments": [
            {
                "id": i,
                "seek": int(seg.start * 100),  # Whisper's unit: 10 ms frames
                "start": seg.start,
                "end": seg.end,
                "text": seg.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": _compression_ratio(seg.text),
                "no_speech_prob": 0.0,
                # Checks this segment's audio still failed after retries (bridge.guard): "empty",
                # "too_long", "repetitive". Only on such segments.
                **({"flags": seg.flags} if seg.flags else {}),
            }
            for i, seg in enumerate(t.segments)
        ],
        "usage": usage(t.duration),
    }
    if want_words:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in t.words]
    return body


def render(t: Transcript, response_format: str, *, language: str, want_words: bool,
           headers: dict[str, str]) -> Response:
    if response_format == "json":
        return JSONResponse({"text": t.text, "usage": usage(t.duration)}, headers=headers)
    if response_format == "verbose_json":
        return JSONResponse(to_verbose_json(t, language, want_words), headers=headers)
    if response_format == "text":
        return PlainTextResponse(t.text + "\n", headers=headers)
    if response_format == "srt":
        return PlainTextResponse(to_srt(t), headers=headers)
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(t), headers=headers)
    raise ValueError(response_format)
