"""OpenAI's 2026 transcription contract (``gpt-transcribe``): ``keywords[]``, ``languages[]`` and the
languages an answer says it heard, through the proxy with the real ``openai`` client.

Two real engines: Moonshine (the session bridge; cannot use keywords) and the tiny-tdt stand-in
under the parakeet entries' flags (``tdt_proxy``: the real sherpa-onnx server, and the in-process
keyword decoder of the same files)."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from bridge.languages import heard_languages
from tests.conftest import BECKETT_TEXT, TDT_V2, TDT_V3
from tests.helpers import sdk_client, wer
from tests.speech import librispeech_samples, write_wav16
from tests.test_proxy import ProxyProcess, add_key

UTTERANCE = "1089-134686-0000"


@pytest.fixture(scope="module")
def moonshine_proxy(bridge, tmp_path_factory):
    proxy = ProxyProcess(bridge.url, tmp_path_factory.mktemp("gpt-transcribe-proxy"))
    proxy.key = add_key(proxy.keys_file, "gpt-transcribe")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return write_wav16(tmp_path_factory.mktemp("speech") / "speech.wav", librispeech_samples(UTTERANCE))


def post(proxy, path, data, files=None):
    return httpx.post(proxy.url + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {proxy.key}"},
                      files=files or {"file": path.open("rb")}, data=data, timeout=120)


def test_gpt_transcribe_answers_with_the_languages_it_heard(moonshine_proxy, beckett):
    client = sdk_client(moonshine_proxy)
    with beckett.open("rb") as fh:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="gpt-transcribe", file=fh, keywords=["Beckett", "fail better"], languages=["en"])
    answer = raw.parse()
    assert wer(BECKETT_TEXT, answer.text) < 0.2, answer.text
    assert [lang.code for lang in answer.languages] == ["en"]
    assert raw.headers["x-model-id"] == "moonshine-base-en"
    # Moonshine cannot bias its decoding: the keywords are hints, and the answer says they were not applied.
    assert "keywords were not applied" in raw.headers["x-warning"]
    # The stream's done event carries the languages too.
    with beckett.open("rb") as fh:
        events = list(client.audio.transcriptions.create(model="gpt-transcribe", file=fh, stream=True,
                                                         languages=["en", "de"]))
    assert events[-1].type == "transcript.text.done"
    assert [lang.code for lang in events[-1].languages] == ["en"]
    # verbose_json keeps `language` and adds `languages`; srt still works with the new name.
    with beckett.open("rb") as fh:
        verbose = client.audio.transcriptions.create(model="gpt-transcribe", file=fh, response_format="verbose_json")
    assert verbose.language == "en" and verbose.model_extra["languages"] == [{"code": "en"}]
    with beckett.open("rb") as fh:
        assert "-->" in client.audio.transcriptions.create(model="gpt-transcribe", file=fh, response_format="srt")


def test_lists_with_and_without_brackets_and_the_old_names(moonshine_proxy, beckett):
    for name in ("keywords", "keywords[]"):
        r = post(moonshine_proxy, beckett, {"model": "whisper-1", name: "Beckett", "languages": "EN"})
        assert r.status_code == 200, r.text
        assert r.json()["languages"] == [{"code": "en"}]
    r = post(moonshine_proxy, beckett, {"model": "gpt-4o-transcribe", "language": "en"})
    assert r.status_code == 200 and "x-warning" not in r.headers


def test_silence_is_no_language(moonshine_proxy, tmp_path):
    silent = write_wav16(tmp_path / "silence.wav", np.zeros(16000 * 3, dtype=np.float32))
    r = post(moonshine_proxy, silent, {"model": "gpt-transcribe"})
    assert r.status_code == 200 and r.json() == {"text": "", "languages": [], "usage": r.json()["usage"]}


@pytest.mark.parametrize(("field", "values", "param", "says"), [
    ("keywords[]", ["a", "b", "c", "<script>"], "keywords[3]", "<, >"),
    ("keywords[]", ["fine", "line\nbreak"], "keywords[1]", "CR or LF"),
    ("keywords[]", ["  "], "keywords[0]", "empty"),
    ("keywords[]", ["x" * 101], "keywords[0]", "longer than 100"),
    ("keywords[]", [f"w{i}" for i in range(101)], "keywords[]", "at most 100"),
    ("languages[]", ["en", "xx"], "languages[1]", "ISO-639-1"),
    ("languages[]", ["english"], "languages[0]", "ISO-639-1"),
], ids=["angle", "newline", "empty", "long", "many", "not-iso", "a-name"])
def test_bad_lists_are_refused_naming_the_field(moonshine_proxy, beckett, field, values, param, says):
    files = [("file", ("b.wav", beckett.read_bytes(), "audio/wav"))] + [(field, (None, v)) for v in values]
    r = httpx.post(moonshine_proxy.url + "/v1/audio/transcriptions", files=files, data={"model": "gpt-transcribe"},
                   headers={"Authorization": f"Bearer {moonshine_proxy.key}"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_languages_the_model_does_not_speak_name_the_model_that_does(moonshine_proxy, beckett):
    client = sdk_client(moonshine_proxy)
    with beckett.open("rb") as fh, pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="gpt-transcribe", file=fh, languages=["de", "fr"])
    error = caught.value.body
    assert error["param"] == "languages[]" and error["code"] == "unsupported_language"
    assert "parakeet-tdt-0.6b-v3-int8" in error["message"] and "it speaks: en" in error["message"]
    # One language it speaks among the hints is enough.
    with beckett.open("rb") as fh:
        assert client.audio.transcriptions.create(model="gpt-transcribe", file=fh, languages=["de", "en"]).text


def test_logprobs_with_gpt_transcribe_behave_as_with_the_other_names(moonshine_proxy, beckett):
    client = sdk_client(moonshine_proxy)
    for model in ("gpt-transcribe", "gpt-4o-transcribe"):
        with beckett.open("rb") as fh, pytest.raises(openai.BadRequestError) as caught:
            client.audio.transcriptions.create(model=model, file=fh, include=["logprobs"])
        assert caught.value.body["code"] == "unsupported_include"


# --- keywords on a transducer, through the real engine ---------------------------------------------


def test_a_keyword_makes_its_word_appear(tdt_proxy, speech):
    """tiny-tdt transcribes nothing real, but the same audio always gives the same words: a word of
    its vocabulary that the plain decode never wrote appears once it is a keyword, and only then."""
    client = sdk_client(tdt_proxy)
    with speech.open("rb") as fh:
        plain = client.audio.transcriptions.create(model="gpt-transcribe", file=fh)
    words = set(plain.text.split())
    assert len(words) >= 5, plain.text
    absent = [w for w in ("people", "world", "between", "another") if w not in words]
    assert absent, plain.text
    keyword = absent[0]
    with speech.open("rb") as fh:
        raw = client.audio.transcriptions.with_raw_response.create(model="gpt-transcribe", file=fh,
                                                                   keywords=[keyword])
    boosted = raw.parse()
    assert keyword in boosted.text.split(), (keyword, plain.text, boosted.text)
    assert "x-warning" not in raw.headers
    assert [lang.code for lang in boosted.languages] == ["en"]  # parakeet v2's one language, words heard
    # The keyword decoder gives the transducer's reply: word times still come with keywords.
    with speech.open("rb") as fh:
        verbose = client.audio.transcriptions.create(model="gpt-transcribe", file=fh, keywords=[keyword],
                                                     response_format="verbose_json",
                                                     timestamp_granularities=["word"])
    assert keyword in [w.word for w in verbose.words]
    # Without keywords, the answer is the plain decode's again (the keywords of one request stay in it).
    with speech.open("rb") as fh:
        assert client.audio.transcriptions.create(model="gpt-transcribe", file=fh).text == plain.text


def test_keywords_with_command_characters_do_not_harm_the_engine(tdt_proxy, speech):
    """sherpa-onnx's hotword syntax reads ``/`` and a leading ``:`` as commands: they reach it as spaces."""
    client = sdk_client(tdt_proxy)
    with speech.open("rb") as fh:
        answer = client.audio.transcriptions.create(model="gpt-transcribe", file=fh,
                                                    keywords=[":people", "people :x", "world/people", "#@:", "C++"])
    assert answer.text
    assert httpx.get(tdt_proxy.bridge.url + "/health").json()["engine_restarts"] == 0


def test_a_several_language_model_detects_the_language(tdt_proxy, speech):
    """The v3 entry (25 languages) runs the text detector on what it heard: tiny-tdt's made-up words
    are English words, so English or nothing, never a guess."""
    bridge = tdt_proxy.bridge
    switched = httpx.post(bridge.url + "/v1/models/switch", json={"model_id": TDT_V3}, timeout=120)
    assert switched.status_code == 200, switched.text
    try:
        r = post(tdt_proxy, speech, {"model": "gpt-transcribe", "languages[]": "de"})
        assert r.status_code == 200, r.text
        assert r.json()["languages"] in ([{"code": "en"}], []), r.json()
    finally:
        httpx.post(bridge.url + "/v1/models/switch", json={"model_id": TDT_V2}, timeout=120)


SENTENCES = {
    "en": "The weather was fine this morning, so we walked to the station together.",
    "de": "Das Wetter war heute Morgen schön, also sind wir zusammen zum Bahnhof gegangen.",
    "fr": "Il faisait beau ce matin, alors nous sommes allés à la gare ensemble.",
    "es": "Hacía buen tiempo esta mañana, así que caminamos juntos hasta la estación.",
    "it": "Stamattina il tempo era bello, così siamo andati insieme alla stazione.",
    "pl": "Dziś rano była ładna pogoda, więc poszliśmy razem na dworzec.",
    "ru": "Сегодня утром была хорошая погода, поэтому мы вместе пошли на вокзал.",
}


def test_the_detector_answers_only_when_sure():
    v3 = ["bg", "cs", "da", "de", "el", "en", "es", "et", "fi", "fr", "hr", "hu", "it", "lt", "lv", "mt", "nl",
          "pl", "pt", "ro", "ru", "sk", "sl", "sv", "uk"]
    for code, text in SENTENCES.items():
        assert heard_languages(text, v3) == [code], (code, text)
    assert heard_languages("Yes.", v3) == []  # too short to tell
    assert heard_languages("", v3) == []
    assert heard_languages("", ["en"]) == [] and heard_languages("ok", ["en"]) == ["en"]


def test_usage_is_metered_under_the_model_that_answered(tdt_proxy, speech):
    """The proxy meters gpt-transcribe requests, with and without keywords, as any other: the
    audio seconds each answer reports, under the catalog model that answered."""
    key = add_key(tdt_proxy.keys_file, "metered")
    client = openai.OpenAI(base_url=tdt_proxy.url + "/v1", api_key=key, max_retries=0)
    seconds = 0.0
    for keywords in ([], ["people"]):
        with speech.open("rb") as fh:
            seconds += client.audio.transcriptions.create(model="gpt-transcribe", file=fh,
                                                          keywords=keywords).usage.seconds
    body = httpx.get(tdt_proxy.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert [(t["key_name"], t["requests"]) for t in body["totals"]] == [("metered", 2)]
    assert body["totals"][0]["audio_seconds"] == pytest.approx(seconds, abs=0.01)
    assert {r["model"] for r in body["records"]} == {TDT_V2}
