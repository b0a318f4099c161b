"""Live dictation through the proxy: the OpenAI realtime transcription protocol over a WebSocket,
driven by the official ``openai`` SDK and by a plain WebSocket client (browsers' subprotocol auth),
against the real bridge and engine."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import BECKETT_TEXT
from tests.helpers import live_turns, pcm24, transcribe, wer
from tests.speech import SHORT_REPLIES, conversation, dialogue_with_short_replies, librispeech_text, write_wav16
from tests.test_proxy import ProxyProcess, add_key

CHUNK = 4800  # 100 ms of 24 kHz pcm16


def append(pcm: bytes) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})


@pytest.fixture(scope="module")
def live(bridge, tmp_path_factory):
    work = tmp_path_factory.mktemp("realtime")
    keys_file = work / "api-keys.json"
    keys = {name: add_key(keys_file, name) for name in ("talker", "other", "limited", "vanish")}
    proxy = ProxyProcess(bridge.url, work, REALTIME_SESSIONS_PER_KEY="2")
    proxy.keys = keys
    yield proxy
    proxy.stop()


def ws_url(proxy: ProxyProcess) -> str:
    return proxy.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"


def events_until(ws, kind: str, timeout: float = 60) -> list[dict]:
    """Events received until one of type ``kind`` (included)."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        out.append(event)
        if event["type"] == kind:
            return out


def usage_seconds(proxy: ProxyProcess, key: str) -> float:
    r = httpx.get(proxy.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"})
    return sum(t["audio_seconds"] for t in r.json()["totals"])


def test_openai_sdk_live_turns_match_the_upload(live, bridge, beckett):
    """A real recording at real-time pace through the SDK: each turn gets speech_started,
    speech_stopped, committed and completed; the turns' text is the upload's; usage is the audio."""
    key = live.keys["talker"]
    uploaded = transcribe(bridge.url, beckett).json()["text"]
    pcm = pcm24(beckett)
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=key)
    events: list = []
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "whisper-1"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                               "silence_duration_ms": 500}}}})
        started = time.monotonic()

        def send() -> None:
            for i in range(0, len(pcm), CHUNK):
                conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + CHUNK]).decode())
                time.sleep(max(0.0, (i + CHUNK) / 48000 - (time.monotonic() - started)))  # real-time pace
            conn.input_audio_buffer.clear()  # the end: its answer comes after every turn's commit

        sender = threading.Thread(target=send)
        sender.start()
        for event in conn:
            events.append((time.monotonic() - started, event))
            if event.type == "error":
                pytest.fail(f"error event: {event}")
            kinds = [e.type for _, e in events]
            if "input_audio_buffer.cleared" in kinds and kinds.count("input_audio_buffer.committed") == \
                    kinds.count("conversation.item.input_audio_transcription.completed"):
                break
        sender.join()
    kinds = [e.type for _, e in events]
    assert kinds[0] == "session.created" and "session.updated" in kinds
    turns: dict[str, list[str]] = {}
    for _, e in events:
        if getattr(e, "item_id", None):
            turns.setdefault(e.item_id, []).append(e.type)
    assert len(turns) >= 3  # Beckett's lines are spoken with pauses between them
    for item, seen in turns.items():
        steps = [k for k in seen if not k.endswith(".delta")]
        assert steps == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed",
                         "conversation.item.input_audio_transcription.completed"], (item, seen)
    completed = [e for _, e in events if e.type.endswith("transcription.completed")]
    live_text = " ".join(e.transcript for e in completed)
    assert wer(BECKETT_TEXT, live_text) <= wer(BECKETT_TEXT, uploaded) + 0.02, (live_text, uploaded)
    # Usage: every turn is charged the audio since the one before, so together they are the audio
    # up to the end of the last turn; the proxy recorded exactly that for the key.
    charged = sum(e.usage.seconds for e in completed)
    last_end = [e for _, e in events if e.type.endswith("speech_stopped")][-1].audio_end_ms / 1000
    assert charged == pytest.approx(last_end, abs=0.01)
    assert charged == pytest.approx(len(pcm) / 48000 - 1.5, abs=1.0)  # the speech sent, its final pause aside
    deadline = time.monotonic() + 5
    while usage_seconds(live, key) < charged - 0.01 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert usage_seconds(live, key) == pytest.approx(charged, abs=0.01)


def test_two_voices_in_server_vad_turns_keep_every_word(live, bridge, tmp_path):
    """A conversation of two LibriSpeech readers (8 turns, 0.5-1 s pauses) through server VAD
    faster than real time: the turns joined are as close to what was read as the same file
    uploaded, so cutting at each turn's end loses no word. (Against the upload's own text they
    differ by 5-9 % WER on such conversations: the model words the same audio differently when it
    is cut elsewhere, in both directions: 10.1 / 10.2 / 6.7 % from the reading live, 8.1 / 10.2 /
    9.2 % uploaded, on three of them.)"""
    path, rows = conversation(tmp_path / "two-voices.wav", ["1688", "2033"], 8, seed=0)
    read = " ".join(librispeech_text(utterance) for *_, utterance in rows)
    uploaded = transcribe(bridge.url, path, timeout=300).json()["text"]
    turns = live_turns(live.url, live.keys["talker"], pcm24(path), commit_at_end=True)
    assert len(turns) >= 8
    assert wer(read, " ".join(turns)) <= wer(read, uploaded) + 0.03, (turns, uploaded)


def test_quick_one_word_answers_are_turns_not_dropped(live, bridge, tmp_path):
    """Lines of real speech answered by quick single words ("Yes.", "No.": 0.15-0.3 s of voice) with
    pauses between: every answer is a turn of its own, and the joined turns are within 5 WER points
    of the upload of the same audio. (With 0.25 s as the least speech that starts a turn, all five
    answers were dropped.)"""
    path, reference = dialogue_with_short_replies(tmp_path / "dialogue.wav")
    uploaded = transcribe(bridge.url, path).json()["text"]
    turns = live_turns(live.url, live.keys["talker"], pcm24(path, silence_after=0))
    replies = [what for kind, what in SHORT_REPLIES if kind == "tts"]
    assert len(turns) == len(SHORT_REPLIES), turns
    assert wer(reference, " ".join(turns)) <= wer(reference, uploaded) + 0.05, (turns, uploaded)
    # Each answer is its own turn, heard as a single short word (Moonshine may mishear one).
    answers = turns[1::2]
    assert all(len(a.split()) <= 2 for a in answers), answers
    assert wer(" ".join(replies), " ".join(answers)) <= 0.4, answers


def test_noise_bursts_and_clicks_start_no_turn(live, tmp_path):
    rng = np.random.default_rng(1)
    noise = np.zeros(16000 * 17, dtype=np.float32)
    for k in range(8):  # bursts of 100 to 310 ms of loud white noise, and a click a second after each
        start, n = 16000 * (1 + 2 * k), int(16000 * (0.1 + 0.03 * k))
        noise[start:start + n] += 0.2 * rng.standard_normal(n).astype(np.float32)
        noise[start + 16000:start + 16000 + 30] += 0.8
    path = write_wav16(tmp_path / "noise.wav", noise)
    assert live_turns(live.url, live.keys["talker"], pcm24(path, silence_after=0)) == []


def test_a_commit_when_the_recording_stops_completes_the_last_words(live, tmp_path):
    """Speech up to the very end of a recording: without a pause after it no turn ends, so a client
    commits when its recording stops (as the README's example and the toolbar do)."""
    path, _ = dialogue_with_short_replies(tmp_path / "dialogue.wav", tail=0.1)
    ended = live_turns(live.url, live.keys["talker"], pcm24(path, silence_after=0), commit_at_end=True)
    assert len(ended) == len(SHORT_REPLIES) and "okay" in ended[-1].lower(), ended


def test_browser_subprotocol_auth_manual_commit_and_bad_events(live, beckett):
    """The browsers' way in (subprotocols), and a session that goes on after bad events."""
    key = live.keys["other"]
    pcm = pcm24(beckett, silence_after=0)[: 48000 * 2]  # "Ever tried." and a bit
    with connect(ws_url(live), subprotocols=["realtime", f"openai-insecure-api-key.{key}"]) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(json.dumps({"type": "transcription_session.update", "event_id": "u1", "session": {
            "input_audio_format": "pcm16", "turn_detection": None}}))
        updated = events_until(ws, "transcription_session.updated")[-1]
        assert updated["session"]["turn_detection"] is None
        ws.send("{not json")
        assert events_until(ws, "error")[-1]["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"type": "response.create", "event_id": "e7"}))
        error = events_until(ws, "error")[-1]["error"]
        assert error["code"] == "unknown_event" and error["event_id"] == "e7"
        ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c0"}))
        error = events_until(ws, "error")[-1]["error"]
        assert error["code"] == "input_audio_buffer_commit_empty" and error["event_id"] == "c0"
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "%%% not base64"}))
        assert events_until(ws, "error")[-1]["error"]["param"] == "audio"
        # Manual mode: no VAD events; the commit makes the turn.
        for i in range(0, len(pcm), CHUNK):
            ws.send(append(pcm[i:i + CHUNK]))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        got = events_until(ws, "conversation.item.input_audio_transcription.completed")
        assert not [e for e in got if e["type"].endswith(("speech_started", "speech_stopped"))]
        committed = [e for e in got if e["type"] == "input_audio_buffer.committed"]
        assert len(committed) == 1 and committed[0]["item_id"] == got[-1]["item_id"]
        assert "tried" in got[-1]["transcript"].lower()
        assert got[-1]["usage"]["seconds"] == pytest.approx(2.0, abs=0.01)
        ws.send(append(pcm[:CHUNK]))
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert events_until(ws, "input_audio_buffer.cleared")


@pytest.mark.parametrize("how", ["header", "subprotocol"])
def test_wrong_key_gets_an_error_event_and_a_close(live, how):
    wrong = "sk-mvp-" + "x" * 40
    kwargs = ({"additional_headers": {"Authorization": f"Bearer {wrong}"}} if how == "header"
              else {"subprotocols": ["realtime", f"openai-insecure-api-key.{wrong}"]})
    with connect(ws_url(live), **kwargs) as ws:
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1008
    assert wrong not in live.log_path.read_text()


def test_sessions_over_the_per_key_limit_are_refused(live):
    key = live.keys["limited"]
    auth = {"additional_headers": {"Authorization": f"Bearer {key}"}}
    first, second = connect(ws_url(live), **auth), connect(ws_url(live), **auth)
    try:
        for ws in (first, second):
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        with connect(ws_url(live), **auth) as third:
            event = json.loads(third.recv(timeout=10))
            assert event["type"] == "error" and event["error"]["code"] == "too_many_sessions"
            with pytest.raises(ConnectionClosed):
                third.recv(timeout=10)
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + 10
    while True:  # the slots come back once the sessions end
        with connect(ws_url(live), **auth) as ws:
            if json.loads(ws.recv(timeout=10))["type"] == "session.created":
                break
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_client_that_vanishes_mid_turn_keeps_its_completed_turns(live, bridge, beckett):
    key = live.keys["vanish"]
    pcm = pcm24(beckett, silence_after=0)
    ws = connect(ws_url(live), additional_headers={"Authorization": f"Bearer {key}"})
    assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
    # The first line and its pause: one turn completes.
    first_turn = pcm[: int(48000 * 1.75)] + b"\0" * 48000
    for i in range(0, len(first_turn), CHUNK):
        ws.send(append(first_turn[i:i + CHUNK]))
    completed = events_until(ws, "conversation.item.input_audio_transcription.completed")[-1]
    # Then half of the next line, and the client's socket is gone without a close.
    rest = pcm[int(48000 * 1.75): int(48000 * 2.5)]
    for i in range(0, len(rest), CHUNK):
        ws.send(append(rest[i:i + CHUNK]))
    events_until(ws, "input_audio_buffer.speech_started")
    ws.socket.shutdown(socket.SHUT_RDWR)
    ws.socket.close()
    deadline = time.monotonic() + 15
    while bridge.health()["realtime_sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert bridge.health()["realtime_sessions"] == 0
    assert usage_seconds(live, key) == pytest.approx(completed["usage"]["seconds"], abs=0.01)
    # And the service goes on.
    assert transcribe(live.url, beckett, headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.fixture(scope="module")
def tight_bridge(models_dir, catalog_file, tmp_path_factory):
    """A bridge of its own with small live-dictation limits."""
    from tests.conftest import BridgeProcess, bridge_env

    work = tmp_path_factory.mktemp("tight")
    proc = BridgeProcess(bridge_env(models_dir, catalog_file, REALTIME_IDLE_SECONDS="1.5", REALTIME_MAX_SESSIONS="1",
                                    REALTIME_MAX_BUFFER_SECONDS="2", ENGINE_CONNECTIONS="2",
                                    SHERPA_NUM_THREADS="1"), work / "bridge.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_sessions_over_the_bridge_limits_are_ended_with_a_reason(tight_bridge, beckett):
    url = tight_bridge.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    with connect(url) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        # One session at most: the next is told so and closed.
        with connect(url) as second:
            event = json.loads(second.recv(timeout=10))
            assert event["type"] == "error" and event["error"]["code"] == "too_many_sessions"
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=10)
            assert closed.value.rcvd.code == 1013
        # More than 2 s of uncommitted audio (manual mode): committed as it stands, and transcribed.
        ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
        events_until(ws, "session.updated")
        pcm = pcm24(beckett, silence_after=0)[: 48000 * 3]
        for i in range(0, len(pcm), CHUNK):
            ws.send(append(pcm[i:i + CHUNK]))
        done = events_until(ws, "conversation.item.input_audio_transcription.completed")
        assert any(e["type"] == "input_audio_buffer.committed" for e in done)
        assert done[-1]["usage"]["seconds"] == pytest.approx(2.0, abs=0.15) and done[-1]["transcript"]
        # Silent for longer than REALTIME_IDLE_SECONDS: an error event that says why, then the close.
        started = time.monotonic()
        event = events_until(ws, "error", timeout=10)[-1]
        assert event["error"]["code"] == "idle_expired" and "REALTIME_IDLE_SECONDS" in event["error"]["message"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1008 and time.monotonic() - started < 5
    assert tight_bridge.health()["realtime_sessions"] == 0
