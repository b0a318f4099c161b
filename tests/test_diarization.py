"""Who spoke when: ``model=gpt-4o-transcribe-diarize`` through the proxy with the openai SDK, on
conversations joined from real LibriSpeech speech, scored with pyannote.metrics.

The bridge runs Moonshine (no token times: pieces are cut at speaker changes) with the test
stand-ins of the diarization models (``../shared/models/diarization/``), which it downloads through
the real download code from a local Hugging Face stand-in, as the production models would be.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from bridge.cutting import turn_pieces
from bridge.diarization import Diarizer, Turn, split_by_speaker
from bridge.transcript import Segment as TextSegment
from bridge.transcript import Word
from tests.conftest import STANDINS
from tests.helpers import assert_openai_error, data_url, diarization_score, sdk_client, wer
from tests.speech import LIBRISPEECH, conversation, librispeech_samples, librispeech_text, read_wav16, speech_span

DIARIZE = "gpt-4o-transcribe-diarize"


def diarize(proxy, path, **extra):
    with path.open("rb") as fh:
        return sdk_client(proxy).audio.transcriptions.create(model=DIARIZE, file=fh, response_format="diarized_json",
                                                             **extra)


# The share of words under the right speaker that each conversation reaches with the stand-in
# models (the bench reports the means over 20 conversations): in the 3-speaker one the stand-in
# embedding puts a short utterance of 3331 and most of another with 3080 (checked on the
# diarizer's own turns, at thresholds 0.4-0.5 alike).
@pytest.mark.parametrize(("speakers", "words_wanted"), [(["1688", "2609"], 0.95), (["2033", "3080", "3331"], 0.8)])
def test_conversations_are_split_by_speaker(diarizing, tmp_path, speakers, words_wanted):
    path, rows = conversation(tmp_path / "talk.wav", speakers, turns=8 if len(speakers) == 2 else 9)
    answer = diarize(diarizing, path)
    segments = answer.segments
    assert sorted({s.speaker for s in segments}) == [chr(ord("A") + i) for i in range(len(speakers))]
    assert segments[0].speaker == "A" and all(s.type == "transcript.text.segment" for s in segments)
    found = diarization_score(rows, [seg.model_dump() for seg in segments], answer.duration)
    assert found["der"] < 0.15 and found["words_right"] >= words_wanted, found
    reference = " ".join(librispeech_text(u) for *_, u in rows)
    assert wer(reference, answer.text) < 0.2
    assert answer.text == " ".join(s.text for s in segments)


def reference_of(speaker: str) -> str:
    """2-10 s of a speaker, from an utterance the conversations below do not use."""
    utterance = sorted(p.stem for p in LIBRISPEECH.glob(f"{speaker}-*.flac"))[-1]
    return data_url(speech_span(librispeech_samples(utterance))[: 16000 * 9])


def test_known_speakers_are_named(diarizing, tmp_path):
    path, rows = conversation(tmp_path / "talk.wav", ["2609", "3331"], turns=6)
    names = {"2609": "Walter", "3331": "Ada"}
    answer = diarize(diarizing, path, known_speaker_names=list(names.values()),
                     known_speaker_references=[reference_of(s) for s in names])
    right = total = 0
    for start, end, speaker, utterance in rows:
        words = len(librispeech_text(utterance).split())
        total += words
        said = max(answer.segments, key=lambda s: min(end, s.end) - max(start, s.start))
        right += words * (said.speaker == names[speaker])
    assert right / total >= 0.95, [(s.speaker, s.text[:30]) for s in answer.segments]


def test_stream_and_subtitles_carry_the_speakers(diarizing, tmp_path):
    path, rows = conversation(tmp_path / "talk.wav", ["1688", "2609"], turns=4)
    client = sdk_client(diarizing)
    with path.open("rb") as fh:
        events = list(client.audio.transcriptions.create(model=DIARIZE, file=fh, response_format="diarized_json",
                                                         stream=True))
    segments = [e for e in events if e.type == "transcript.text.segment"]
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and len(segments) == len(deltas) >= 4
    assert [d.segment_id for d in deltas] == [s.id for s in segments]
    assert "".join(d.delta for d in deltas) == events[-1].text
    assert [s.speaker for s in segments][:4] == ["A", "B", "A", "B"]
    with path.open("rb") as fh:
        srt = client.audio.transcriptions.create(model=DIARIZE, file=fh, response_format="srt")
    # A long turn may be several cues (cut at its pauses), each with its speaker.
    cues = [line[:4] for line in srt.splitlines() if line.startswith("[")]
    assert turns_of(cues) == ["[A] ", "[B] ", "[A] ", "[B] "]
    with path.open("rb") as fh:
        verbose = client.audio.transcriptions.create(model=DIARIZE, file=fh, response_format="verbose_json")
    assert turns_of([s.model_extra["speaker"] for s in verbose.segments]) == ["A", "B", "A", "B"]


def turns_of(labels: list[str]) -> list[str]:
    return [label for i, label in enumerate(labels) if not i or labels[i - 1] != label]


def test_bad_diarize_requests_name_their_field(diarizing, beckett):
    url = diarizing.url + "/v1/audio/transcriptions"
    headers = {"Authorization": f"Bearer {diarizing.key}"}
    short = data_url(librispeech_samples("1089-134691-0000")[:16000])
    long = data_url(np.concatenate([librispeech_samples("1089-134686-0000")] * 2)[: 16000 * 12])
    good = reference_of("2609")
    cases = [
        ({"known_speaker_names[]": ["a"], "known_speaker_references[]": ["https://example.com/a.wav"]},
         "known_speaker_references[0]"),
        ({"known_speaker_names[]": ["a"], "known_speaker_references[]": ["data:audio/wav;base64,@@@"]},
         "known_speaker_references[0]"),
        ({"known_speaker_names[]": ["a"], "known_speaker_references[]": ["data:audio/wav;base64,"
                                                                         + base64.b64encode(b"no audio").decode()]},
         "known_speaker_references[0]"),
        ({"known_speaker_names[]": ["a", "b"], "known_speaker_references[]": [good, short]},
         "known_speaker_references[1]"),
        ({"known_speaker_names[]": ["a"], "known_speaker_references[]": [long]}, "known_speaker_references[0]"),
        ({"known_speaker_names[]": ["a", "b"], "known_speaker_references[]": [good]}, "known_speaker_references[]"),
        ({"known_speaker_names[]": list("abcde"), "known_speaker_references[]": [good] * 5}, "known_speaker_names[]"),
        ({"prompt": "names"}, "prompt"),
        ({"include[]": "logprobs", "response_format": "json"}, "include[]"),
        ({"timestamp_granularities[]": "word", "response_format": "verbose_json"}, "timestamp_granularities[]"),
    ]
    for fields, param in cases:
        with beckett.open("rb") as fh:
            r = httpx.post(url, headers=headers, files={"file": ("b.wav", fh)},
                           data={"model": DIARIZE, "response_format": "diarized_json", **fields}, timeout=60)
        assert assert_openai_error(r, 400)["param"] == param, (fields, r.text)
    with beckett.open("rb") as fh:  # diarized_json needs the diarize model
        r = httpx.post(url, headers=headers, files={"file": ("b.wav", fh)},
                       data={"model": "whisper-1", "response_format": "diarized_json"}, timeout=60)
    assert assert_openai_error(r, 400)["param"] == "response_format"


def test_missing_diarization_models_say_how_to_get_them(bridge, beckett):
    with beckett.open("rb") as fh:
        r = httpx.post(bridge.url + "/v1/audio/transcriptions", files={"file": ("b.wav", fh)},
                       data={"model": DIARIZE}, timeout=60)
    err = assert_openai_error(r, 409, "diarization_not_available")
    assert "python -m bridge models download pyannote-segmentation-3.0" in err["message"]
    assert r.headers["x-should-retry"] == "false"
    # Neither diarization model is a transcription model: not listed, never switched to.
    assert "pyannote-segmentation-3.0" not in {m["id"] for m in httpx.get(bridge.url + "/v1/models").json()["data"]}
    assert httpx.post(bridge.url + "/v1/models/switch", json={"model_id": "pyannote-segmentation-3.0"}).status_code \
        == 400


def test_words_go_to_the_speaker_of_their_time():
    """With token times (parakeet) the words of one segment are split where the speaker changes."""
    words = [Word("Do", 0.0, 0.2), Word("you", 0.2, 0.4), Word("hear?", 0.4, 0.8), Word("Yes.", 1.2, 1.5),
             Word("Good.", 2.0, 2.4)]
    turns = [Turn(0.0, 0.9, "A"), Turn(1.1, 1.6, "B"), Turn(1.9, 2.5, "A")]
    out = split_by_speaker([TextSegment(0.0, 2.4, "Do you hear? Yes. Good.", words)], turns)
    assert [(s.speaker, s.text, s.start, s.end) for s in out] == [
        ("A", "Do you hear?", 0.0, 0.8), ("B", "Yes.", 1.2, 1.5), ("A", "Good.", 2.0, 2.4)]


def test_pieces_are_cut_at_speaker_changes():
    """Without token times the audio is cut at speaker changes: one speaker per piece, padded only
    into pauses, overlaps cut in the middle, runs of one speaker kept together."""
    samples = np.zeros(16000 * 12, dtype=np.float32)
    turns = [Turn(1.0, 3.0, "A"), Turn(3.1, 4.0, "A"), Turn(5.0, 7.0, "B"), Turn(6.8, 9.0, "A")]
    pieces = [(a / 16000, b / 16000, s) for a, b, s in turn_pieces(turns, len(samples), 30.0, samples)]
    assert pieces == [(0.8, 4.2, "A"), (4.8, 6.9, "B"), (6.9, 9.2, "A")]


class ReadCounter:
    """Audio read by slice that remembers the longest stretch read at once: what a reader holds."""

    def __init__(self, samples: np.ndarray) -> None:
        self.samples, self.longest = samples, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, piece: slice) -> np.ndarray:
        out = self.samples[piece]
        self.longest = max(self.longest, len(out))
        return out


def test_a_long_recording_is_diarized_in_windows_its_speakers_matched_across_them(tmp_path):
    """Past ``DIARIZATION_WINDOW_SECONDS`` the speakers are found window by window (memory of one
    window, however long the recording) and matched across windows by voice: here 30 s windows
    on a 75 s conversation of three speakers, with the test stand-ins of the two models."""
    path, rows = conversation(tmp_path / "talk.wav", ["1688", "2033", "2609"], turns=9)
    audio = ReadCounter(read_wav16(path))
    diarizer = Diarizer(STANDINS / "pyannote-segmentation-3.0-sherpa.onnx",
                        STANDINS / "resemblyzer-ge2e-fbank80-sherpa.onnx", threshold=0.45, num_threads=1,
                        min_similarity=0.5, window_seconds=30)
    turns = diarizer.turns(audio)
    assert audio.longest <= 30 * 16000, "the diarizer read more than a window at once"
    assert [t.start for t in turns] == sorted(t.start for t in turns)
    assert turns[0].speaker == "A" and max(t.end for t in turns) <= len(audio) / 16000 + 0.01
    found = diarization_score(rows, [{"start": t.start, "end": t.end, "speaker": t.speaker, "text": ""}
                                     for t in turns], len(audio) / 16000)
    # The same three voices in each window: three speakers, each word under its own.
    assert found["found"] == 3 and found["words_right"] >= 0.95, found
