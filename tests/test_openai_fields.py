"""What OpenAI's transcription API added in 2025-26, through the proxy with the openai SDK (its own
types parse every answer): ``include[]=logprobs``, real ``verbose_json`` segment scores,
``chunking_strategy``, ``/v1/audio/translations`` and G.711 live input.

Moonshine (the real engine here) gives no token log-probabilities; the transducer's scores are
tested on the real engine with the tiny-tdt stand-in (``tests/test_parakeet_path.py``). Translation
stays on ``bench.instant_engine --transducer`` under an entry that says it translates: no model
here translates (parakeet v3 and Whisper do, on a GPU host), and what is checked is the bridge's
answer in OpenAI's shapes, not a translation.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from bridge.models.model_store import ModelStore
from tests.conftest import MOONSHINE, BridgeProcess, bridge_env, start_instant_engine
from tests.helpers import g711, live_turns, pcm24, sdk_client, wer
from tests.speech import librispeech_samples, librispeech_text, write_wav16
from tests.test_proxy import ProxyProcess, add_key

TRANSDUCER = "instant-transducer"


@pytest.fixture(scope="module")
def moonshine_proxy(bridge, tmp_path_factory):
    work = tmp_path_factory.mktemp("fields-proxy")
    proxy = ProxyProcess(bridge.url, work)
    proxy.key = add_key(proxy.keys_file, "fields")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def transducer_proxy(tmp_path_factory):
    """A bridge whose model is a transducer (token times and log-probabilities) that translates,
    answered by the stand-in engine; the proxy in front of it."""
    work = tmp_path_factory.mktemp("transducer")
    spec = MOONSHINE.model_copy(update={"id": TRANSDUCER, "description": "test: stand-in transducer",
                                        "token_timestamps": True, "token_logprobs": True, "translates": True})
    ModelStore(work / "models").prepare(spec)  # its token table is Moonshine's (ids in verbose_json)
    catalog = work / "catalog.json"
    catalog.write_text(json.dumps([spec.model_dump()]))
    engine, url = start_instant_engine("--transducer")
    bridge = BridgeProcess(bridge_env(work / "models", catalog, DEFAULT_MODEL=TRANSDUCER, ENGINE_ADAPTER="websocket",
                                      ENGINE_URL=url, SPEED_CHECK="false"), work / "bridge.log")
    proxy = None
    try:
        bridge.wait_ready()
        proxy = ProxyProcess(bridge.url, work / "proxy")
        proxy.key = add_key(proxy.keys_file, "transducer")
        proxy.tokens_file = work / "models" / TRANSDUCER / "tokens.txt"
        yield proxy
    finally:
        if proxy is not None:
            proxy.stop()
        bridge.stop()
        engine.terminate()
        engine.wait(10)


def joined(path, utterances: list[str], pause: float = 0.6, between: np.ndarray | None = None):
    gap = np.zeros(int(16000 * pause), dtype=np.float32) if between is None else between
    parts = []
    for i, u in enumerate(utterances):
        parts += [gap] if i else []
        parts.append(librispeech_samples(u))
    return write_wav16(path, np.concatenate(parts))


def test_logprobs_are_refused_where_the_model_has_none(moonshine_proxy, beckett):
    client = sdk_client(moonshine_proxy)
    with beckett.open("rb") as fh, pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="whisper-1", file=fh, include=["logprobs"])
    err = refused.value.body
    assert err["param"] == "include[]" and err["code"] == "unsupported_include"
    assert "parakeet-tdt-0.6b-v2-int8" in err["message"]  # names the models that give them
    for bad, param in ((dict(include=["logprobs"], response_format="text"), "include[]"),
                       (dict(include=["colour"]), "include[]")):
        with beckett.open("rb") as fh, pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(model="whisper-1", file=fh, **bad)
        assert refused.value.body["param"] == param


def token_table(path) -> dict[str, int]:
    table = {}
    for line in path.read_text().splitlines():
        token, number = line.rsplit(" ", 1)
        table.setdefault(base64.b64decode(token).decode("utf-8", "replace").replace("\u2581", " "), int(number))
    return table


def test_segment_scores_are_real_on_moonshine(moonshine_proxy, tmp_path):
    """``no_speech_prob`` is the share of a segment the VAD heard no speech in: a short recording
    (one piece, one segment) that is mostly noise after a few words scores far higher than the same
    words alone. ``compression_ratio`` is the guard's; Moonshine gives no scores (``avg_logprob`` 0)."""
    rng = np.random.default_rng(7)
    noise = rng.standard_normal(int(16000 * 4.0)).astype(np.float32)
    noise = np.convolve(noise, np.ones(8) / 8, mode="same").astype(np.float32)  # a hiss, no speech in it
    noise *= 0.03 / float(np.sqrt(np.mean(noise ** 2)))
    words = librispeech_samples("1089-134691-0000")  # 2.1 s
    client = sdk_client(moonshine_proxy)
    answers = {}
    for name, samples in (("clean", words), ("noisy", np.concatenate([words, noise]))):
        with write_wav16(tmp_path / f"{name}.wav", samples).open("rb") as fh:
            answers[name] = client.audio.transcriptions.create(model="whisper-1", file=fh,
                                                               response_format="verbose_json")
    (clean,), (noisy,) = answers["clean"].segments, answers["noisy"].segments
    print(clean.no_speech_prob, noisy.no_speech_prob)
    assert 0 <= clean.no_speech_prob < 0.3 and noisy.no_speech_prob > clean.no_speech_prob + 0.4
    assert noisy.no_speech_prob <= 1
    for seg in (clean, noisy):
        assert 0 < seg.compression_ratio < 2.4 and seg.avg_logprob == 0.0 and seg.tokens


def test_chunking_strategy_changes_the_cuts(moonshine_proxy, tmp_path):
    """With the default cutting, a 0.6 s pause ends a stretch of speech and the cues follow;
    ``server_vad`` with a 2 s ``silence_duration_ms`` keeps the talk as one stretch."""
    utterances = ["1089-134686-0000", "1089-134691-0000", "367-130732-0001"]
    path = joined(tmp_path / "three.wav", utterances, pause=0.8)
    client = sdk_client(moonshine_proxy)

    def segments(**extra) -> list:
        with path.open("rb") as fh:
            return client.audio.transcriptions.create(model="whisper-1", file=fh, response_format="verbose_json",
                                                      **extra).segments

    auto = segments(chunking_strategy="auto")
    long_pauses = segments(chunking_strategy={"type": "server_vad", "silence_duration_ms": 2000})
    assert len(auto) >= 2 and len(long_pauses) == 1
    reference = " ".join(librispeech_text(u) for u in utterances)
    for found in (auto, long_pauses):
        assert wer(reference, " ".join(s.text for s in found)) < 0.15  # nothing lost either way
    for bad, param in (({"type": "server_vad", "threshold": 1.5}, "chunking_strategy.threshold"),
                       ({"type": "server_vad", "silence_duration_ms": 5}, "chunking_strategy.silence_duration_ms"),
                       ({"type": "semantic"}, "chunking_strategy.type"),
                       ({"type": "server_vad", "colour": 1}, "chunking_strategy.colour")):
        with path.open("rb") as fh, pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(model="whisper-1", file=fh, chunking_strategy=bad)
        assert refused.value.body["param"] == param and refused.value.body["code"] == "invalid_value"


def test_translations(moonshine_proxy, transducer_proxy, beckett):
    with beckett.open("rb") as fh, pytest.raises(openai.BadRequestError) as refused:
        sdk_client(moonshine_proxy).audio.translations.create(model="whisper-1", file=fh)
    err = refused.value.body
    assert err["code"] == "model_cannot_translate" and err["param"] == "model"
    assert "/v1/audio/transcriptions" in err["message"]
    with beckett.open("rb") as fh, pytest.raises(openai.BadRequestError) as refused:
        sdk_client(moonshine_proxy).audio.translations.create(model="whisper-1", file=fh,
                                                              extra_body={"language": "en"})
    assert refused.value.body["code"] == "unknown_parameter"
    # A model the catalog says translates answers in OpenAI's shapes.
    client = sdk_client(transducer_proxy)
    with beckett.open("rb") as fh:
        assert client.audio.translations.create(model="whisper-1", file=fh).text.startswith("piece of")
    with beckett.open("rb") as fh:
        verbose = client.audio.translations.create(model="whisper-1", file=fh, response_format="verbose_json")
    assert verbose.segments and verbose.model_extra.get("task") == "translate"


def test_g711_live_sessions_hear_what_pcm16_hears(moonshine_proxy, tmp_path):
    """A recording sent live as G.711 (mu-law, A-law: 8 kHz, made by FFmpeg) is transcribed within
    2 WER points of the same recording sent as 24 kHz pcm16, although the phone line keeps only
    half the band. (Measured on these 159 words: pcm16 11.3 %, mu-law 11.9 %, A-law 12.6 %; the
    same G.711 decoded by FFmpeg's CLI and sent as pcm16: 10.7 % and 10.1 %.)"""
    utterances = ["1089-134686-0000", "1688-142285-0000", "367-130732-0001", "1998-15444-0001",
                  "2033-164914-0002", "2414-128291-0003", "3080-5032-0001", "533-1066-0002"]
    path = joined(tmp_path / "talk.wav", utterances, pause=1.0)
    reference = " ".join(librispeech_text(u) for u in utterances)
    key = moonshine_proxy.key
    pcm16 = wer(reference, " ".join(live_turns(moonshine_proxy.url, key, pcm24(path))))
    assert pcm16 < 0.2
    # The two G.711 sessions side by side (each its own session, as two callers would be).
    with ThreadPoolExecutor(2) as pool:
        heard = dict(zip(("pcmu", "pcma"), pool.map(
            lambda fl: " ".join(live_turns(moonshine_proxy.url, key, g711(path, fl[1]), fmt=fl[0])),
            (("pcmu", "mulaw"), ("pcma", "alaw"))), strict=True))
    print("live WER: pcm16", round(pcm16, 4), {fmt: round(wer(reference, text), 4) for fmt, text in heard.items()})
    for fmt, text in heard.items():
        assert wer(reference, text) <= pcm16 + 0.02, (fmt, pcm16, text)


def test_live_logprobs_are_refused_where_the_model_has_none(moonshine_proxy):
    # A model without scores: the include is refused with an error event naming it.
    client = sdk_client(moonshine_proxy)
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        conn.session.update(session={"type": "transcription", "include": ["item.input_audio_transcription.logprobs"]})
        for event in conn:
            if event.type == "error":
                assert event.error.code == "unsupported_include" and event.error.param == "session.include"
                break
            assert event.type != "session.updated"

