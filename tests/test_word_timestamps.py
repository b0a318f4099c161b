"""Word timestamps built from the engine's token times (parakeet's reply format).

No parakeet model can run on this machine, so the reply below is written in the engine's JSON
reply format (tokens with the SentencePiece space mark, start times and TDT durations) with
known word times; the same code path parses real replies (``adapters.sherpa_protocol``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.sherpa_protocol import parse_reply
from bridge.formats import to_srt, to_verbose_json
from bridge.transcript import build_transcript, words_from_tokens

FIXTURE = Path(__file__).parent / "fixtures" / "parakeet_reply.json"
EXPECTED = [("The", 0.24, 0.40), ("birch", 0.40, 0.64), ("canoe", 0.72, 1.04), ("slid", 1.04, 1.28),
            ("on", 1.36, 1.52), ("the", 1.52, 1.68), ("smooth", 1.68, 1.92), ("planks.", 1.92, 2.32)]


@pytest.mark.parametrize("mark", ["\u2581", " "])
def test_words_from_parakeet_tokens(mark):
    result = parse_reply(FIXTURE.read_text().replace("\\u2581", mark))
    words = words_from_tokens(result, offset=0.0)
    assert [(w.word, w.start, w.end) for w in words] == [(w, pytest.approx(s), pytest.approx(e))
                                                        for w, s, e in EXPECTED]


def test_words_are_shifted_to_the_file_time_line_and_feed_segments():
    result = parse_reply(FIXTURE.read_text())
    t = build_transcript([(30.0, 33.0, result), (33.0, 40.0, None)], duration=40.0, token_timestamps=True)
    assert [w.word for w in t.words][:2] == ["The", "birch"]
    assert t.words[0].start == pytest.approx(30.24) and t.words[-1].end == pytest.approx(32.32)
    seg = t.segments[0]
    assert seg.start == pytest.approx(30.24) and seg.end == pytest.approx(32.32)  # refined by token times
    body = to_verbose_json(t, "en", want_words=True)
    assert body["words"][1] == {"word": "birch", "start": pytest.approx(30.40), "end": pytest.approx(30.64)}
    assert "00:00:30,240 --> 00:00:32,320" in to_srt(t)


def test_no_token_times_means_no_words():
    moonshine_like = parse_reply('{"text": "Ever tried.", "tokens": [" Ever", " tried", "."], "timestamps": []}')
    t = build_transcript([(0.0, 2.0, moonshine_like)], duration=2.0, token_timestamps=False)
    assert t.words == [] and t.segments[0].start == 0.0 and t.segments[0].end == 2.0
