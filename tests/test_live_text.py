"""Live text (``gpt-live-transcribe``): the words of a turn while the person is still talking,
through the proxy with the real ``openai`` client's realtime connection and the real engine
(Moonshine), on real read speech sent at real-time pace."""

from __future__ import annotations

import base64
import re
import threading
import time
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from bridge.live_text import LiveTurn, agreed, continuation, stable_cut
from bridge.ports import EngineResult
from tests.helpers import pcm24_of, transcribe, wer
from tests.speech import librispeech_samples, librispeech_text, write_wav16
from tests.test_proxy import ProxyProcess, add_key

CHUNK = 4800  # 100 ms of 24 kHz pcm16
LONG_TURN = "2033-164914-0008"  # 17.3 s of one sentence's worth of read speech
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


def metric(bridge: Any, name: str, **labels: str) -> float:
    """One sample of the bridge's Prometheus metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? ([0-9.e+-]+)$", re.M)
    found = pattern.search(httpx.get(bridge.metrics_url).text)
    return float(found.group(1)) if found else 0.0


def spoken(proxy: ProxyProcess, pcm: bytes, *, transcription: dict[str, Any] | None = None,
           pace: float = 1.0, include: list[str] | None = None) -> list[tuple[float, Any]]:
    """One live session through the SDK, no turn detection: ``pcm`` appended in 100 ms chunks at
    ``pace`` x real time, then a commit; (arrival time, event) until the turn's ``completed``."""
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0)
    events: list[tuple[float, Any]] = []
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        session: Any = {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None,
            "transcription": transcription or {"model": "gpt-live-transcribe"}}}}
        if include:
            session["include"] = include
        conn.session.update(session=session)

        def send() -> None:
            started = time.monotonic()
            for i in range(0, len(pcm), CHUNK):
                time.sleep(max(0.0, started + (i + CHUNK) / 48000 / pace - time.monotonic()))
                conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + CHUNK]).decode())
            conn.input_audio_buffer.commit()

        sender = threading.Thread(target=send)
        sender.start()
        for event in conn:
            events.append((time.monotonic(), event))
            assert event.type != "error", event
            if event.type == COMPLETED:
                break
        sender.join()
    return events


@pytest.fixture(scope="module")
def live_proxy(bridge, tmp_path_factory):
    work = tmp_path_factory.mktemp("live-text")
    proxy = ProxyProcess(bridge.url, work)
    proxy.key = add_key(work / "api-keys.json", "dictation")
    yield proxy
    proxy.stop()


def test_agreement_sends_only_what_two_passes_share():
    assert agreed(["The", "cat", "sat"], ["the", "cat,", "sat", "on"]) == ["the", "cat,", "sat"]
    assert agreed(["a", "b"], ["a", "c", "b"]) == ["a"]
    # What was sent, found again in a newer reading: only the words after it go out.
    assert continuation(["the", "cat"], ["the", "cat", "sat", "down."]) == (["sat", "down."], [])
    # A misheard word was sent: it is not sent twice, and what follows it goes out.
    assert continuation(["the", "cap", "sat"], ["the", "cat", "sat", "on"]) == (["on"], [])
    # Sent words past a segment's end belong to the audio after it.
    assert continuation(["one", "two", "three"], ["one", "two"]) == ([], ["three"])


def transducer_result(text: str, step: float = 0.5) -> EngineResult:
    """A transducer's reply: one token a word, each ``step`` long, one after another."""
    words = text.split()
    return EngineResult(text, [f"\u2581{w}" for w in words], [i * step for i in range(len(words))],
                        [step * 0.8] * len(words), [-0.1] * len(words))


def test_token_times_cut_after_the_last_agreed_sentence_end_or_a_long_passs_last_agreed_word():
    result = transducer_result("one two three. four five six seven eight")
    # Halfway between "three." (ends at 1.4 s) and "four" (starts at 1.5 s).
    cut = stable_cut(result, agreed_words=5, min_seconds=1.0)
    assert cut is not None and (cut.words, cut.tokens) == (3, 3) and cut.seconds == pytest.approx(1.45)
    assert stable_cut(result, agreed_words=2, min_seconds=0.0) is None  # no sentence end agreed, a short pass
    assert stable_cut(result, agreed_words=5, min_seconds=2.0) is None  # the segment would be too short
    long_pass = transducer_result(" ".join(f"w{i}" for i in range(20)))  # 10 s, no sentence end
    cut = stable_cut(long_pass, agreed_words=12, min_seconds=2.0)
    assert cut is not None and cut.words == 12
    assert stable_cut(long_pass, agreed_words=20, min_seconds=2.0).words == 19  # the last word may still grow
    assert stable_cut(EngineResult("one two. three", [], [], [], []), 3, 0.0) is None  # no token times


def test_a_cut_by_token_times_makes_the_agreed_words_final_and_starts_the_next_pass_there():
    turn = LiveTurn("item", anchor=16000)
    first = transducer_result("one two three. four")
    assert turn.settle(first.text.split(), 1.0) == ([], 0)
    second = transducer_result("one two three. four five")
    new, settled = turn.settle(second.text.split(), 2.0)
    assert (new, settled) == (["one", "two", "three.", "four"], 4)
    turn.record(new, past_anchor=True)
    cut = stable_cut(second, settled, 0.0)
    assert turn.cut(second, cut) == []  # all of it went out already
    assert turn.finals == ["one two three."] and [t for t, _ in turn.scored] == [" one", " two", " three."]
    assert turn.anchor == 16000 + round(1.45 * 16000)
    assert turn.sent_after_anchor == ["four"] and turn.previous == ["four", "five"]
    # The next pass hears from the cut on: what it agrees on past "four" goes out.
    assert turn.settle(["four", "five", "six"], 3.0) == (["five"], 2)


def test_words_arrive_while_the_person_is_still_talking(live_proxy, bridge):
    """A 17 s turn sent at real-time pace: words before the commit, the deltas joined are the
    turn's text, ``completed`` is the whole turn."""
    runs_before = metric(bridge, "stt_bridge_live_passes_total", outcome="run")
    samples = librispeech_samples(LONG_TURN)
    events = spoken(live_proxy, pcm24_of(samples))
    kinds = [e.type for _, e in events]
    committed = kinds.index("input_audio_buffer.committed")
    before = [e for _, e in events[:committed] if e.type == DELTA]
    assert len(before) >= 2, kinds  # words on screen while the person talks, not all at the end
    deltas = [e for _, e in events if e.type == DELTA]
    completed = events[-1][1]
    item = events[committed][1].item_id
    assert {e.item_id for e in deltas} == {item} == {completed.item_id}
    assert all(d.delta.strip() for d in deltas) and all(d.delta.startswith(" ") for d in deltas[1:])
    joined = "".join(d.delta for d in deltas)
    assert wer(completed.transcript, joined) <= 0.1, (joined, completed.transcript)
    assert wer(librispeech_text(LONG_TURN), completed.transcript) <= 0.2, completed.transcript
    assert completed.usage.seconds == pytest.approx(len(samples) / 16000, abs=0.1)
    assert metric(bridge, "stt_bridge_live_passes_total", outcome="run") > runs_before


def test_text_at_the_commit_only_without_live_text(live_proxy):
    """``gpt-transcribe`` in a session transcribes committed turns only, as OpenAI's does."""
    samples = librispeech_samples(LONG_TURN)[: 16000 * 6]
    events = spoken(live_proxy, pcm24_of(samples), transcription={"model": "gpt-transcribe"}, pace=3.0)
    kinds = [e.type for _, e in events]
    assert DELTA not in kinds[: kinds.index("input_audio_buffer.committed")]
    assert events[-1][1].transcript


def test_a_busy_engine_skips_passes_instead_of_queueing_them(live_proxy, bridge, tmp_path):
    """An upload of three minutes of speech keeps the engine busy: the session's passes are skipped
    (counted) while it holds the engine, the upload's text is its own, and the turn still gets its
    whole text at the commit.

    The bound on what live text costs an upload, counted rather than timed: no pass starts while the
    upload's pieces wait for the engine or fill the connections it may use, so an upload waits
    behind at most the one pass per session already running when it came (at most
    ``MAX_PASS_SECONDS`` of audio; milliseconds on a GPU), and passes start beside it only once its
    last pieces leave a connection free. Here the session starts after the upload: at most 2 passes
    may run before the upload's answer, against up to one a second (the CPU's `medium` pace) without the rule."""
    copies = 10
    long_audio = write_wav16(tmp_path / "long.wav", np.tile(librispeech_samples(LONG_TURN), copies))
    skipped_before = metric(bridge, "stt_bridge_live_passes_total", outcome="skipped_busy")
    answers: list[httpx.Response] = []
    ran_by_the_answer: list[float] = []

    def upload() -> None:
        answers.append(transcribe(bridge.url, long_audio, timeout=600))
        ran_by_the_answer.append(metric(bridge, "stt_bridge_live_passes_total", outcome="run"))

    uploading = threading.Thread(target=upload)
    uploading.start()
    time.sleep(1.0)
    ran_before = metric(bridge, "stt_bridge_live_passes_total", outcome="run")
    events = spoken(live_proxy, pcm24_of(librispeech_samples(LONG_TURN)[: 16000 * 8]), pace=1.0)
    uploading.join()
    assert answers[0].status_code == 200
    assert wer(" ".join([librispeech_text(LONG_TURN)] * copies), answers[0].json()["text"]) <= 0.2
    ran = ran_by_the_answer[0] - ran_before
    assert ran <= 2, f"{ran:.0f} passes ran beside the upload's pieces"
    assert metric(bridge, "stt_bridge_live_passes_total", outcome="skipped_busy") > skipped_before
    assert events[-1][1].transcript


def test_session_settings_for_live_text_are_checked_and_echoed(live_proxy):
    client = openai.OpenAI(base_url=live_proxy.url + "/v1", api_key=live_proxy.key, max_retries=0)
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        def update(transcription: dict[str, Any]) -> Any:
            conn.session.update(session={"type": "transcription", "audio": {"input": {  # type: ignore[typeddict-item]
                "transcription": transcription, "turn_detection": None}}})
            for event in conn:
                if event.type in ("session.updated", "error"):
                    return event

        ok = update({"model": "gpt-live-transcribe", "keywords": ["Quilter"], "languages": ["en"], "delay": "medium"})
        assert ok.type == "session.updated"
        echoed = ok.session.audio.input.transcription
        assert (echoed.model, echoed.keywords, echoed.languages) == ("gpt-live-transcribe", ["Quilter"], ["en"])
        assert ok.session.model_dump()["audio"]["input"]["transcription"]["delay"] == "medium"
        for transcription, code, param in (
                ({"model": "gpt-live-transcribe", "delay": "instant"}, "invalid_value", "delay"),
                ({"model": "gpt-live-transcribe", "languages": ["de"]}, "unsupported_language", "languages"),
                ({"model": "gpt-live-transcribe", "languages": ["english"]}, "invalid_value", "languages[0]"),
                ({"model": "gpt-live-transcribe", "keywords": ["<b>"]}, "invalid_value", "keywords[0]")):
            error = update(transcription)
            assert error.type == "error" and error.error.code == code, error
            assert error.error.param == f"session.audio.input.transcription.{param}"


@pytest.fixture(scope="module")
def capped_bridge(models_dir, catalog_file, tmp_path_factory):
    """A bridge of its own: one session with live text at a time, 2 s of uncommitted audio at most."""
    from tests.conftest import BridgeProcess, bridge_env

    work = tmp_path_factory.mktemp("capped")
    proc = BridgeProcess(bridge_env(models_dir, catalog_file, REALTIME_LIVE_SESSIONS="1",
                                    REALTIME_MAX_BUFFER_SECONDS="2", ENGINE_CONNECTIONS="2", SHERPA_NUM_THREADS="1"),
                         work / "bridge.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_live_text_is_capped_per_bridge_and_a_turn_never_committed_is_bounded(capped_bridge):
    """REALTIME_LIVE_SESSIONS: the second session is told it gets text at each commit only; a client
    that never commits gets its turn committed at REALTIME_MAX_BUFFER_SECONDS, live text or not."""
    from websockets.sync.client import connect

    from tests.test_realtime import append, events_until

    url = capped_bridge.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    update = {"type": "session.update", "session": {"audio": {"input": {
        "turn_detection": None, "transcription": {"model": "gpt-live-transcribe"}}}}}
    import json

    with connect(url) as first, connect(url) as second:
        first.send(json.dumps(update))
        events_until(first, "session.updated")
        second.send(json.dumps(update))
        refused = events_until(second, "error", timeout=15)[-1]
        assert refused["error"]["code"] == "live_text_unavailable"
        assert "REALTIME_LIVE_SESSIONS" in refused["error"]["message"]
        assert metric(capped_bridge, "stt_bridge_live_text_sessions") == 1
        pcm = pcm24_of(librispeech_samples(LONG_TURN))[: 48000 * 3]
        for i in range(0, len(pcm), CHUNK):
            first.send(append(pcm[i:i + CHUNK]))
            time.sleep(0.05)
        done = events_until(first, COMPLETED)
        assert any(e["type"] == "input_audio_buffer.committed" for e in done)
        assert done[-1]["usage"]["seconds"] == pytest.approx(2.0, abs=0.15) and done[-1]["transcript"]
    deadline = time.monotonic() + 10
    while metric(capped_bridge, "stt_bridge_live_text_sessions") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(capped_bridge, "stt_bridge_live_text_sessions") == 0  # the slot is given back
