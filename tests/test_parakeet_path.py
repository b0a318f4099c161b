"""The parakeet path through the real engine: the production parakeet v2 entry's flags
(``--model-type=nemo_transducer``, batching, 120 s pieces, word times, log-probabilities) served by
the real sherpa-onnx server with the tiny-tdt stand-in's files (``tdt_proxy``), through the proxy
with the real ``openai`` client, on real speech."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import srt
import websockets

from adapters.sherpa_protocol import parse_reply, utterance_frames
from bridge.ports import EngineResult
from tests.conftest import MOONSHINE, TDT_V2, BridgeProcess, bridge_env
from tests.helpers import diarization_score, pcm24, sdk_client
from tests.model_standins import TINY_TDT
from tests.speech import conversation, librispeech_samples, read_wav16, write_wav16
from tests.test_openai_fields import joined

TOKENS = TINY_TDT / "tokens.txt"
UTTERANCES = ["1089-134686-0000", "1089-134686-0001", "1688-142285-0000", "1688-142285-0001"]


@pytest.fixture(scope="module")
def reading(tmp_path_factory):
    return joined(tmp_path_factory.mktemp("reading") / "reading.wav", UTTERANCES, pause=1.2)


def test_words_and_segments_stay_inside_the_audio(tdt_proxy, reading):
    """A transducer's last token duration can run past the audio: no word, segment or cue may."""
    client = sdk_client(tdt_proxy)
    with reading.open("rb") as fh:
        verbose = client.audio.transcriptions.create(model="gpt-transcribe", file=fh, response_format="verbose_json",
                                                     timestamp_granularities=["word", "segment"])
    duration = verbose.duration
    assert verbose.words and verbose.segments
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts)
    for word in verbose.words:
        assert 0 <= word.start <= word.end <= duration, (word, duration)
    for seg in verbose.segments:
        assert 0 <= seg.start <= seg.end <= duration, (seg, duration)
        inside = [w for w in verbose.words if seg.start <= w.start and w.end <= seg.end]
        assert " ".join(w.word for w in inside) == seg.text.strip(), (seg, inside)
        assert seg.end - seg.start <= 15.0 + 0.5  # segments end at pauses or 15 s
        assert seg.avg_logprob < 0  # the engine's scores, not a default
    with reading.open("rb") as fh:
        cues = list(srt.parse(client.audio.transcriptions.create(model="gpt-transcribe", file=fh,
                                                                 response_format="srt")))
    assert [c.content for c in cues] == [s.text.strip() for s in verbose.segments if s.text.strip()]
    assert all(c.end.total_seconds() <= duration + 0.001 for c in cues)


def test_live_text_with_a_real_transducer_carries_its_scores(tdt_proxy):
    """gpt-live-transcribe on the parakeet path (the real engine with tiny-tdt's transducer): the
    ``completed`` transcript carries the engine's own log-probabilities, token for token, for the
    segments settled while the person talked and for the rest after the commit. (How well the
    deltas agree with it says nothing here: the stand-in's words are random.)"""
    from tests.helpers import pcm24_of
    from tests.speech import librispeech_samples
    from tests.test_live_text import COMPLETED, DELTA, spoken

    events = spoken(tdt_proxy, pcm24_of(librispeech_samples("2033-164914-0008")), pace=2.0, transcription={
        "model": "gpt-live-transcribe", "delay": "minimal"}, include=["item.input_audio_transcription.logprobs"])
    completed = events[-1][1]
    assert completed.type == COMPLETED and completed.transcript
    assert "".join(e.delta for _, e in events if e.type == DELTA).strip()
    assert completed.logprobs and all(p.logprob <= 0 for p in completed.logprobs)
    assert "".join(p.token for p in completed.logprobs).split() == completed.transcript.split()


def test_live_text_cuts_a_turn_without_pauses_at_agreed_words_by_token_times(tdt_proxy):
    """A turn with no pause for 30 s on the parakeet path: passes start after the last agreed
    word, by the real engine's token times (segments cut that way are counted), not only at
    pauses; words keep coming to the end of the turn; ``completed`` is the whole turn with the
    engine's scores. (How well deltas and ``completed`` agree says nothing here: the stand-in's
    words are random, so each pass may read the same audio differently.)"""
    import numpy as np

    from tests.helpers import pcm24_of
    from tests.speech import without_pauses
    from tests.test_live_text import COMPLETED, DELTA, metric, spoken

    bridge = tdt_proxy.bridge
    cuts_before = metric(bridge, "stt_bridge_live_segments_total", by="token_times")
    samples = without_pauses(np.concatenate([librispeech_samples(u) for u in UTTERANCES]))
    events = spoken(tdt_proxy, pcm24_of(samples), pace=2.0, transcription={
        "model": "gpt-live-transcribe", "delay": "minimal"}, include=["item.input_audio_transcription.logprobs"])
    completed = events[-1][1]
    assert completed.type == COMPLETED and completed.transcript
    cuts = metric(bridge, "stt_bridge_live_segments_total", by="token_times") - cuts_before
    assert cuts >= 2, f"{cuts} segments cut by token times in a {len(samples) / 16000:.0f} s turn"
    sent = [t for t, e in events if e.type == DELTA]
    committed = next(t for t, e in events if e.type == "input_audio_buffer.committed")
    started = events[0][0]
    assert any(t > started + 0.75 * (committed - started) for t in sent if t < committed), \
        "no words in the last quarter of the turn before its commit"
    assert "".join(p.token for p in completed.logprobs).split() == completed.transcript.split()


async def raw_reply(tdt_proxy, path) -> EngineResult:
    """The engine child's own reply for a file, asked directly over its WebSocket."""
    health = tdt_proxy.bridge.health()
    port = next(a.split("=", 1)[1] for a in psutil.Process(health["engine_pid"]).cmdline() if a.startswith("--port="))
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        for frame in utterance_frames(read_wav16(path)):
            await ws.send(frame)
        reply = parse_reply(await ws.recv())
        await ws.send("Done")
    return reply


def test_scores_are_the_engines_own_on_json_the_stream_and_segments(tdt_proxy, reading):
    """``include[]=logprobs`` on json carries the engine's ``ys_log_probs`` token for token, the
    stream's deltas the same scores as its done event, and each ``verbose_json`` segment's
    ``avg_logprob`` is the mean of its tokens' and its ``tokens`` their ids in the model's table (the
    reading is shorter than a 120 s piece: the engine hears it whole, as the bridge sends it)."""
    raw = asyncio.run(raw_reply(tdt_proxy, reading))
    assert raw.logprobs and len(raw.logprobs) == len(raw.tokens) == len(raw.timestamps)
    client = sdk_client(tdt_proxy)
    with reading.open("rb") as fh:
        answer = client.audio.transcriptions.create(model="gpt-transcribe", file=fh, include=["logprobs"])
    assert [p.logprob for p in answer.logprobs] == pytest.approx(raw.logprobs, abs=1e-5)
    assert "".join(p.token for p in answer.logprobs).split() == answer.text.split()
    with reading.open("rb") as fh:
        events = list(client.audio.transcriptions.create(model="gpt-transcribe", file=fh, include=["logprobs"],
                                                         stream=True))
    # The stream cuts its first pieces short (first text sooner), so the engine hears other pieces:
    # the deltas' scores are the done event's, and its tokens spell its text.
    done = events[-1]
    streamed = [p.logprob for e in events if e.type == "transcript.text.delta" for p in e.logprobs]
    assert done.type == "transcript.text.done" and streamed == [p.logprob for p in done.logprobs]
    assert streamed and all(lp <= 0 for lp in streamed)
    assert "".join(p.token for p in done.logprobs).split() == done.text.split()
    with reading.open("rb") as fh:
        verbose = client.audio.transcriptions.create(model="gpt-transcribe", file=fh, response_format="verbose_json")
    ids = {line.rpartition(" ")[0].replace("\u2581", " "): int(line.rpartition(" ")[2])  # the engine says " "
           for line in TOKENS.read_text().splitlines()}
    for seg in verbose.segments:
        mine = [(token, lp) for token, t, lp in zip(raw.tokens, raw.timestamps, raw.logprobs, strict=True)
                if seg.start <= t < seg.end]
        assert mine and seg.avg_logprob == pytest.approx(sum(lp for _, lp in mine) / len(mine), abs=1e-5), seg
        assert seg.tokens == [ids[token] for token, _ in mine]  # the model's own token ids
        assert 0 < seg.compression_ratio and 0 <= seg.no_speech_prob <= 1
    # UTF-8 bytes with each token; without the include, no logprobs.
    assert all(p.bytes == list(p.token.encode()) for p in answer.logprobs)
    with reading.open("rb") as fh:
        assert client.audio.transcriptions.create(model="gpt-transcribe", file=fh).logprobs is None


def test_the_speed_check_and_a_switch_run_on_the_parakeet_entries(tdt_proxy, models_dir, reading):
    """The speed check runs on the transducer entry before ready, and a switch from it to Moonshine
    and back (the production flags each way) leaves each model answering as itself."""
    bridge = tdt_proxy.bridge
    check = bridge.health()["speed_check"]
    assert check["model"] == TDT_V2 and check["real_time_factor"] > 0 and check["text"]
    # Moonshine's installed files, linked into this bridge's store (a symlink out of it is refused).
    shutil.copytree(models_dir / MOONSHINE.id, bridge.models_dir / MOONSHINE.id, copy_function=os.link)
    try:
        for model, timed in ((MOONSHINE.id, False), (TDT_V2, True)):
            r = httpx.post(bridge.url + "/v1/models/switch", json={"model_id": model}, timeout=120)
            assert r.status_code == 200 and r.json()["switched"], r.text
            health = bridge.health()
            assert health["model"] == model and health["speed_check"]["model"] == model
            with reading.open("rb") as fh:
                verbose = sdk_client(tdt_proxy).audio.transcriptions.create(
                    model="gpt-transcribe", file=fh, response_format="verbose_json",
                    timestamp_granularities=["word", "segment"])
            assert bool(verbose.words) is timed  # word times only from the transducer
    finally:
        if bridge.health()["model"] != TDT_V2:
            httpx.post(bridge.url + "/v1/models/switch", json={"model_id": TDT_V2}, timeout=120)
        shutil.rmtree(bridge.models_dir / MOONSHINE.id)


def test_a_committed_turn_carries_the_engines_scores(tdt_proxy, beckett):
    """A live session without server VAD (the client commits): ``completed`` carries the engine's
    log-probabilities, token for token with its transcript."""
    events: list = []
    client = sdk_client(tdt_proxy)
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        conn.session.update(session={"type": "transcription", "include": ["item.input_audio_transcription.logprobs"],
                                     "audio": {"input": {"turn_detection": None}}})
        pcm = pcm24(beckett, silence_after=0)
        for i in range(0, len(pcm), 4800):
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + 4800]).decode())
        conn.input_audio_buffer.commit()
        for event in conn:
            events.append(event)
            if event.type in ("conversation.item.input_audio_transcription.completed", "error"):
                break
    completed = events[-1]
    assert completed.type == "conversation.item.input_audio_transcription.completed", completed
    assert completed.logprobs and "".join(p.token for p in completed.logprobs).split() == completed.transcript.split()
    assert all(p.logprob <= 0 for p in completed.logprobs)


def test_speakers_are_split_at_the_engines_word_boundaries(tdt_proxy, tmp_path):
    """``diarized_json`` with a transducer: each word goes to the speaker of its time and segments
    are cut where the speaker changes, so every segment starts at a word's start and ends at a
    word's end (the engine's token times, as ``verbose_json`` gives them), and the speakers follow
    the conversation (the words are the stand-in's, their times are real)."""
    path, rows = conversation(tmp_path / "talk.wav", ["1688", "2609"], turns=8)
    client = sdk_client(tdt_proxy)
    with path.open("rb") as fh:
        verbose = client.audio.transcriptions.create(model="gpt-transcribe", file=fh, response_format="verbose_json",
                                                     timestamp_granularities=["word"])
    with path.open("rb") as fh:
        answer = client.audio.transcriptions.create(model="gpt-4o-transcribe-diarize", file=fh,
                                                    response_format="diarized_json")
    starts, ends = {round(w.start, 2) for w in verbose.words}, {round(w.end, 2) for w in verbose.words}
    segments = answer.segments
    assert len({s.speaker for s in segments}) == 2 and len(segments) >= 8
    for seg in segments:
        assert round(seg.start, 2) in starts and round(seg.end, 2) in ends, seg
    assert " ".join(s.text for s in segments).split() == verbose.text.split()
    found = diarization_score(rows, [s.model_dump() for s in segments], answer.duration)
    assert found["words_right"] >= 0.9, found


def test_requests_at_once_reach_the_engines_batch(tdt_proxy, tmp_path):
    """Several requests at once are decoded together in the engine's batches (``--max-batch-size``),
    as the engine's own log says ("size: N" per batch, shown with ``ENGINE_LOG_LEVEL=debug``), and
    each answer stays its request's own. A bridge tuned as on a GPU host (8 connections, fewer
    work threads than connections), on the tdt bridge's store."""
    utterances = ["1089-134686-0000", "1688-142285-0000", "2033-164914-0002", "3080-5032-0001",
                  "1998-15444-0001", "2414-128291-0003", "367-130732-0001", "533-1066-0002"]
    clips = [write_wav16(tmp_path / f"{u}.wav", librispeech_samples(u)) for u in utterances]
    env = bridge_env(tdt_proxy.bridge.models_dir, tdt_proxy.bridge.catalog_file, DEFAULT_MODEL=TDT_V2,
                     SHERPA_NUM_THREADS="1", ENGINE_CONNECTIONS="8", SHERPA_NUM_WORK_THREADS="1",
                     ENGINE_LOG_LEVEL="debug", SPEED_CHECK="false")
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    try:
        bridge.wait_ready()

        def text(path) -> str:
            with path.open("rb") as fh:
                r = httpx.post(bridge.url + "/v1/audio/transcriptions", files={"file": fh}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["text"]

        alone = [text(c) for c in clips]
        for _ in range(3):
            with ThreadPoolExecutor(len(clips)) as pool:
                together = list(pool.map(text, clips))
            assert together == alone  # each request's own words, batched or not
        batches = [int(n) for n in re.findall(r"size: (\d+)", bridge.log())]
    finally:
        bridge.stop()
    print("batch sizes:", sorted(set(batches)), len(batches))
    assert batches and max(batches) >= 2, batches
