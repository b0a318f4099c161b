"""Accuracy through the HTTP API: WER on Festival-rendered Harvard sentences, a real recording, and
real read speech under babble against the raw engine."""

from __future__ import annotations

import pytest

from bench.bench_noisy import hand_cut, mix
from bench.bench_real_speech import noisy_speech, utterances
from bench.bench_stack import in_process_recognizer, recognize
from bridge.model_store import ModelStore
from tests.conftest import BECKETT_TEXT, MOONSHINE
from tests.helpers import transcribe, wer
from tests.speech import HARVARD, festival_wav, have_festival, write_wav16

needs_festival = pytest.mark.skipif(not have_festival(), reason="festival/sox not installed")


@needs_festival
def test_wer_on_harvard_sentences_and_beckett(bridge, beckett):
    refs, hyps = [], []
    for sentence in HARVARD:
        r = transcribe(bridge.url, festival_wav(sentence))
        assert r.status_code == 200, r.text
        refs.append(sentence)
        hyps.append(r.json()["text"])
    refs.append(BECKETT_TEXT)
    hyps.append(transcribe(bridge.url, beckett).json()["text"])
    score = wer(refs, hyps)
    print(f"WER over {len(refs)} utterances: {score:.3f}")
    assert score <= 0.10, list(zip(refs, hyps, strict=True))


@pytest.mark.slow  # about 2 minutes of Moonshine on 2 cores; its first minute alone shows no difference
def test_real_speech_under_babble_beats_hand_cuts(bridge, models_dir, tmp_path):
    """Real read speech (LibriSpeech) under babble of four other speakers plus pink noise at 20 dB
    (the bench's noisy case, ``bench/bench_real_speech.py``): the bridge (its VAD's cuts, the piece
    guard) makes fewer errors than the raw engine on the same audio cut by hand at the utterance
    bounds into pieces of up to 25 s, where Moonshine starts dropping words. (The bench, same
    audio: raw 15.9 %, bridge 11.4 %.)"""
    speech, noise, truth = noisy_speech(utterances(), 150)
    audio = mix(speech, noise, 20)
    reference = " ".join(text for text, _, _ in truth)
    raw = in_process_recognizer(MOONSHINE, ModelStore(models_dir).path_for(MOONSHINE.id), 1)
    raw_wer = wer(reference, " ".join(recognize(raw, audio[a:b]) for a, b in hand_cut(truth)))
    r = transcribe(bridge.url, write_wav16(tmp_path / "babble-20db.wav", audio), timeout=300)
    assert r.status_code == 200, r.text
    stack_wer = wer(reference, r.json()["text"])
    print(f"{len(audio) / 16000:.0f} s at 20 dB: raw on hand cuts {raw_wer:.3f}, bridge {stack_wer:.3f}")
    assert stack_wer <= 0.8 * raw_wer
