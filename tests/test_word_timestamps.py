"""Word timestamps built from the engine's token times (parakeet's reply format).

No parakeet model can run on this machine, so the reply below is written in the engine's JSON
reply format with known word times; the same code path parses real replies
(``adapters.sherpa_protocol``). As in sherpa-onnx's sources (symbol-table.cc turns a leading
SentencePiece mark U+2581 of tokens.txt into a space; the NeMo transducer strips the text's leading
space; timestamps are multiples of 10 ms x subsampling 8 = 0.08 s), word-starting tokens begin
with a plain space. The U+2581 form is tested too, for exports whose table keeps the mark.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.sherpa_protocol import parse_reply
from bridge.formats import to_srt, to_verbose_json
from bridge.transcript import MAX_SEGMENT_SECONDS, build_transcript, words_from_tokens

FIXTURE = Path(__file__).parent / "fixtures" / "parakeet_reply.json"
EXPECTED = [("The", 0.24, 0.40), ("birch", 0.40, 0.64), ("canoe", 0.72, 1.04), ("slid", 1.04, 1.28),
            ("on", 1.36, 1.52), ("the", 1.52, 1.68), ("smooth", 1.68, 1.92), ("planks.", 1.92, 2.32)]


@pytest.mark.parametrize("mark", [" ", "\u2581"])
def test_words_from_parakeet_tokens(mark):
    reply = json.loads(FIXTURE.read_text())
    reply["tokens"] = [mark + t[1:] if t.startswith(" ") else t for t in reply["tokens"]]
    result = parse_reply(json.dumps(reply))
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


def reply_of(sentences: list[tuple[float, str]]) -> str:
    """A reply in the engine's format: each sentence's words start at the given time, 0.3 s per word."""
    tokens, starts, durs = [], [], []
    for at, sentence in sentences:
        for i, word in enumerate(sentence.split()):
            tokens.append(" " + word)
            starts.append(round(at + 0.3 * i, 2))
            durs.append(0.24)
    return json.dumps({"text": "".join(tokens).strip(), "tokens": tokens, "timestamps": starts, "durations": durs})


def test_a_long_piece_is_split_into_segments_at_sentences_and_pauses():
    # A two-minute parakeet piece: one cue per sentence (or pause), not one cue for the piece.
    result = parse_reply(reply_of([(0.5, "The birch canoe slid."), (2.0, "Glue the sheet"),
                                   (5.0, "to the dark blue background."), (9.0, "It is easy to tell.")]))
    t = build_transcript([(60.0, 180.0, result)], duration=180.0, token_timestamps=True)
    assert [s.text for s in t.segments] == ["The birch canoe slid.", "Glue the sheet", "to the dark blue background.",
                                            "It is easy to tell."]
    assert [(s.start, s.end) for s in t.segments] == [
        (pytest.approx(60.5), pytest.approx(61.64)), (pytest.approx(62.0), pytest.approx(62.84)),
        (pytest.approx(65.0), pytest.approx(66.44)), (pytest.approx(69.0), pytest.approx(70.44))]
    assert t.text == "The birch canoe slid. Glue the sheet to the dark blue background. It is easy to tell."
    assert "00:01:05,000 --> 00:01:06,440\nto the dark blue background." in to_srt(t)


def test_speech_without_sentence_ends_or_pauses_is_cut_into_bounded_segments():
    words = " ".join(f"w{i}" for i in range(200))  # 60 s of words 0.3 s apart, no pause, no full stop
    t = build_transcript([(0.0, 61.0, parse_reply(reply_of([(0.0, words)])))], duration=61.0, token_timestamps=True)
    assert len(t.segments) >= 4
    assert all(s.end - s.start <= MAX_SEGMENT_SECONDS for s in t.segments)
    assert " ".join(s.text for s in t.segments) == words and t.text == words


def test_text_without_token_times_is_shared_over_cues_by_speech_time():
    from bridge.transcript import share_text, split_at_pauses

    # Shares by characters, moved to a sentence end two words away or less.
    assert share_text("one two three. four five six seven eight. nine ten", [1, 1]) == [
        "one two three.", "four five six seven eight. nine ten"]
    assert share_text("a b c d e f g h", [1, 1, 2]) == ["a b", "c d", "e f g h"]
    # Cue times are the speech's: runs of speech up to 7 s, never the pauses between them.
    segs = split_at_pauses(0.0, 20.0, "First part here. Second part there. Third one.",
                           [(0.5, 3.0), (3.4, 6.0), (8.0, 12.0), (12.3, 14.0), (16.0, 19.5)])
    assert [(s.start, s.end) for s in segs] == [(0.5, 6.0), (8.0, 14.0), (16.0, 19.5)]
    assert " ".join(s.text for s in segs) == "First part here. Second part there. Third one."
