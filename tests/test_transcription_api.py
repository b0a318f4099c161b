"""The OpenAI transcription contract, through real HTTP to the real bridge and engine."""

from __future__ import annotations

import json

import httpx
import srt
import webvtt

from tests.conftest import BECKETT_TEXT, COPY_ID
from tests.helpers import assert_openai_error, normalize, transcribe, wer


def test_json_is_the_default_and_carries_usage(bridge, beckett):
    r = transcribe(bridge.url, beckett)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert wer(BECKETT_TEXT, body["text"]) <= 0.1
    assert body["usage"]["type"] == "duration"
    assert abs(body["usage"]["seconds"] - 9.96) < 0.05
    assert abs(float(r.headers["x-audio-seconds"]) - 9.96) < 0.05
    assert r.headers["x-model-id"] == "moonshine-base-en"


def test_text_srt_vtt_parse_with_real_parsers(bridge, beckett):
    reference = transcribe(bridge.url, beckett).json()["text"]

    text = transcribe(bridge.url, beckett, response_format="text")
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text.strip() == reference

    subs = list(srt.parse(transcribe(bridge.url, beckett, response_format="srt").text))
    assert subs and " ".join(s.content for s in subs) == reference
    assert subs[0].start.total_seconds() >= 0
    assert subs[-1].end.total_seconds() <= 10.0
    assert all(s.start < s.end for s in subs)

    vtt_body = transcribe(bridge.url, beckett, response_format="vtt").text
    assert vtt_body.startswith("WEBVTT")
    captions = webvtt.from_string(vtt_body)
    assert " ".join(c.text for c in captions) == reference
    assert captions[0].start.count(":") == 2 and "." in captions[0].start


def test_verbose_json_has_the_documented_fields(bridge, beckett):
    body = transcribe(bridge.url, beckett, response_format="verbose_json").json()
    assert body["task"] == "transcribe"
    assert body["language"] == "en"
    assert abs(body["duration"] - 9.96) < 0.05
    assert "words" not in body  # only when asked for
    assert body["segments"]
    for seg in body["segments"]:
        assert set(seg) >= {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                            "compression_ratio", "no_speech_prob"}
        assert 0 <= seg["start"] < seg["end"] <= body["duration"] + 0.01
    assert " ".join(s["text"] for s in body["segments"]) == body["text"]
    assert body["usage"] == {"type": "duration", "seconds": body["duration"]}


def test_word_timestamps_on_a_model_without_token_times_are_not_invented(bridge, beckett):
    r = transcribe(bridge.url, beckett, response_format="verbose_json", **{"timestamp_granularities[]": "word"})
    assert r.status_code == 200
    assert r.json()["words"] == []
    assert "word timestamps" in r.headers["x-warning"]


def test_openai_aliases_and_the_loaded_id_are_accepted(bridge, beckett):
    for name in ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "moonshine-base-en"):
        r = transcribe(bridge.url, beckett, model=name)
        assert r.status_code == 200, (name, r.text)
        assert r.headers["x-model-id"] == "moonshine-base-en"


def test_a_catalog_model_that_is_not_loaded_is_refused_with_a_hint(bridge, beckett):
    r = transcribe(bridge.url, beckett, model=COPY_ID)
    err = assert_openai_error(r, 400, "model_not_loaded")
    assert "moonshine-base-en" in err["message"] and "/v1/models/switch" in err["message"]
    assert r.headers["x-should-retry"] == "false"
    assert_openai_error(transcribe(bridge.url, beckett, model="no-such-model"), 404, "model_not_found")
    # One that is not downloaded either: the answer names the download, which must come before a switch.
    err = assert_openai_error(transcribe(bridge.url, beckett, model="parakeet-tdt-0.6b-v3-int8"), 400,
                              "model_not_loaded")
    assert "python -m bridge models download parakeet-tdt-0.6b-v3-int8" in err["message"]
    assert "download" not in assert_openai_error(transcribe(bridge.url, beckett, model=COPY_ID), 400)["message"]


def test_unknown_and_unsupported_options_get_a_clear_400(bridge, beckett):
    assert_openai_error(transcribe(bridge.url, beckett, colour="blue"), 400, "unknown_parameter")
    assert_openai_error(transcribe(bridge.url, beckett, response_format="docx"), 400)
    assert_openai_error(transcribe(bridge.url, beckett, language="de"), 400, "unsupported_language")
    assert_openai_error(transcribe(bridge.url, beckett, language="english"), 400)
    assert_openai_error(transcribe(bridge.url, beckett, **{"timestamp_granularities[]": "word"}), 400)
    assert_openai_error(transcribe(bridge.url, beckett, temperature="7"), 400)
    assert_openai_error(transcribe(bridge.url, beckett, stream="true", response_format="srt"), 400)
    # Hints OpenAI also treats as hints are accepted.
    ok = transcribe(bridge.url, beckett, prompt="Samuel Beckett", temperature="0.2", language="en",
                    chunking_strategy="auto")
    assert ok.status_code == 200


def test_stream_sends_deltas_then_done(bridge, beckett):
    with beckett.open("rb") as fh, httpx.stream(
        "POST", bridge.url + "/v1/audio/transcriptions", files={"file": ("b.wav", fh)},
        data={"stream": "true"}, timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    deltas = [e["delta"] for e in events if e["type"] == "transcript.text.delta"]
    done = [e for e in events if e["type"] == "transcript.text.done"]
    assert len(done) == 1 and events[-1] is done[0]
    assert "".join(deltas) == done[0]["text"]
    assert normalize(done[0]["text"]) == normalize(BECKETT_TEXT)
    assert done[0]["usage"]["type"] == "duration"


def test_models_list_shape(bridge):
    body = httpx.get(bridge.url + "/v1/models").json()
    assert body["object"] == "list"
    ids = {m["id"] for m in body["data"]}
    assert {"parakeet-tdt-0.6b-v2-int8", "parakeet-tdt-0.6b-v3-int8", "moonshine-base-en"} <= ids
    for m in body["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
    loaded = [m["id"] for m in body["data"] if m["loaded"]]
    assert loaded == [body["loaded"]] == ["moonshine-base-en"]


def test_health_reports_engine(bridge):
    h = httpx.get(bridge.url + "/health")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ready" and body["model"] == "moonshine-base-en"
    assert body["provider"] == "cpu" and isinstance(body["engine_pid"], int)
    assert body["uptime_s"] > 0 and body["engine_restarts"] >= 0


def test_unknown_route_uses_the_error_shape(bridge):
    assert_openai_error(httpx.get(bridge.url + "/v1/nothing-here"), 404)
