"""The parakeet path through the real engine: the production parakeet v2 entry's flags
(``--model-type=nemo_transducer``, batching, 120 s pieces, word times, log-probabilities) served by
the real sherpa-onnx server with the tiny-tdt stand-in's files (``tdt_proxy``), through the proxy
with the real ``openai`` client, on real speech."""

from __future__ import annotations

import pytest
import srt

from tests.helpers import sdk_client
from tests.test_openai_fields import joined

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
