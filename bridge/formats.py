"""Response formats of ``/v1/audio/transcriptions``: json, text, srt, vtt, verbose_json.

``verbose_json`` segment scores, as subtitle and pipeline tools that filter on Whisper's read them:

- ``avg_logprob``: the mean log-probability of the segment's tokens as the engine scored them
  (parakeet; 0.0 where the model gives none, e.g. Moonshine: nothing is filtered out);
- ``compression_ratio``: the segment's text bytes over their zlib-compressed size, the same ratio
  the piece guard checks for loops (``bridge.guard``; above 2.4 reads as repetitive);
- ``no_speech_prob``: the share of the segment's time in which the VAD found no speech;
- ``tokens``: the ids of its tokens in the model's token table (``bridge.tokens``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse, PlainTextResponse, Response

from bridge.tokens import logprob_entries
from bridge.transcript import Segment, Transcript, compression_ratio

TokenIds = Callable[[list[str]], list[int]]



def usage(seconds: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": round(seconds, 3)}


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def _cue(seg: Segment) -> str:
    return f"[{seg.speaker}] {seg.text}" if seg.speaker else seg.text


def to_srt(t: Transcript) -> str:
    blocks = []
    for i, seg in enumerate([seg for seg in t.segments if seg.text], start=1):  # no empty cues
        blocks.append(f"{i}\n{_clock(seg.start, ',')} --> {_clock(seg.end, ',')}\n{_cue(seg)}\n")
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = ["WEBVTT\n"]
    for seg in t.segments:
        if not seg.text:
            continue
        blocks.append(f"{_clock(seg.start, '.')} --> {_clock(seg.end, '.')}\n{_cue(seg)}\n")
    return "\n".join(blocks)


def to_verbose_json(t: Transcript, language: str, want_words: bool, token_ids: TokenIds | None = None,
                    task: str = "transcribe", languages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": task,
        "language": language,
        "languages": languages or [],
        "duration": round(t.duration, 3),
        "text": t.text,
        "segments": [
            {
                "id": i,
                "seek": int(seg.start * 100),  # Whisper's unit: 10 ms frames
                "start": seg.start,
                "end": seg.end,
                "text": seg.text,
                "tokens": token_ids(seg.tokens) if token_ids is not None else [],
                "temperature": 0.0,
                "avg_logprob": round(sum(seg.logprobs) / len(seg.logprobs), 6) if seg.logprobs else 0.0,
                "compression_ratio": round(compression_ratio(seg.text), 3),
                "no_speech_prob": seg.no_speech,
                # Checks this segment's audio still failed after retries (bridge.guard): "empty",
                # "too_long", "repetitive". Only on such segments.
                **({"flags": seg.flags} if seg.flags else {}),
                **({"speaker": seg.speaker} if seg.speaker else {}),
            }
            for i, seg in enumerate(t.segments)
        ],
        "usage": usage(t.duration),
    }
    if want_words:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in t.words]
    return body


def segment_id(index: int) -> str:
    return f"seg_{index}"


def diarized_segment(index: int, seg: Segment) -> dict[str, Any]:
    return {"type": "transcript.text.segment", "id": segment_id(index), "start": seg.start, "end": seg.end,
            "text": seg.text, "speaker": seg.speaker}


def to_diarized_json(t: Transcript) -> dict[str, Any]:
    """OpenAI's ``diarized_json``: the text, and segments each with its speaker."""
    segments = [seg for seg in t.segments if seg.text]
    return {"task": "transcribe", "duration": round(t.duration, 3), "text": t.text,
            "segments": [diarized_segment(i, seg) for i, seg in enumerate(segments)], "usage": usage(t.duration)}


def render(t: Transcript, response_format: str, *, language: str, want_words: bool,
           headers: dict[str, str], logprobs: bool = False, token_ids: TokenIds | None = None,
           task: str = "transcribe", languages: list[dict[str, str]] | None = None) -> Response:
    """The answer in ``response_format``; ``languages`` (OpenAI's ``[{"code": ...}]``, what the audio was
    heard to be) on json and verbose_json."""
    if response_format == "json":
        body: dict[str, Any] = {"text": t.text, "languages": languages or []}
        if logprobs:
            body["logprobs"] = logprob_entries(t.token_logprobs)
        return JSONResponse({**body, "usage": usage(t.duration)}, headers=headers)
    if response_format == "verbose_json":
        return JSONResponse(to_verbose_json(t, language, want_words, token_ids, task, languages), headers=headers)
    if response_format == "diarized_json":
        return JSONResponse(to_diarized_json(t), headers=headers)
    if response_format == "text":
        return PlainTextResponse(t.text + "\n", headers=headers)
    if response_format == "srt":
        return PlainTextResponse(to_srt(t), headers=headers)
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(t), headers=headers)
    raise ValueError(response_format)
