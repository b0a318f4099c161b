"""Accuracy through the HTTP API: WER on Festival-rendered Harvard sentences, a real recording, and
real read speech under babble against the raw engine; and what the piece guard wins back on real
babble, with the real model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.bench_noisy import hand_cut, mix
from bench.bench_real_speech import noisy_speech, utterances
from bench.bench_stack import in_process_recognizer, recognize
from bridge.decoding.stream import AudioStream
from bridge.guard import GuardLimits, PieceGuard
from bridge.models.model_store import ModelStore
from bridge.ports import EngineResult
from bridge.transcription import SpeechMap, cut_pieces
from bridge.vad import SpeechDetector, find_vad_model
from tests.conftest import BECKETT_TEXT, MOONSHINE
from tests.helpers import transcribe, wer
from tests.speech import HARVARD, festival_wav, have_festival, write_wav16

RATE = 16000
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


def test_the_guard_wins_back_words_the_model_drops_on_real_babble(models_dir):
    """Real read speech under 5 dB babble (the bench's noisy audio, 299 s), cut as the bridge cuts
    it (its VAD, regions side by side, the speech map the guard reads): Moonshine answers a piece
    full of speech with nothing. The piece guard (``bridge.guard``, the bridge's limits) must catch
    it, transcribe it again in halves and keep them, so that the whole file gets more words right
    than the model's first answers (the bench, same audio: 28.08 % without the guard, 27.64 % with
    it). The model runs in process, as the bridge's engine runs it (the bench's figures match)."""
    model = find_vad_model(None)
    if model is None:
        pytest.skip("no Silero VAD model")
    speech, noise, truth = noisy_speech(utterances(), 300)
    audio = mix(speech, noise, 5)
    detector = SpeechDetector(model)
    stream = AudioStream.from_samples(audio)
    spoken = SpeechMap(detector, stream)

    async def cut() -> list[tuple[int, int]]:
        return [p async for p in cut_pieces(stream, MOONSHINE.max_piece_seconds, detector, vad_threads=16,
                                            speech=spoken)]

    # The minute around the piece the model fails on (the whole file takes a minute of Moonshine).
    pieces = [(a, b) for a, b in asyncio.run(cut()) if b > 95 * RATE and a < 150 * RATE]
    span = (pieces[0][0], pieces[-1][1])
    reference = " ".join(text for text, a, b in truth if span[0] <= (a + b) // 2 < span[1])
    raw = in_process_recognizer(MOONSHINE, ModelStore(models_dir).path_for(MOONSHINE.id), 2)
    first = [recognize(raw, audio[a:b]) for a, b in pieces]
    guard = PieceGuard(GuardLimits(), detector)

    async def guarded(a: int, b: int, answer: str) -> str:
        answers = iter([answer])  # the piece's first answer is the one above; its halves are new

        async def submit(samples: np.ndarray) -> EngineResult:
            text = next(answers, None)
            return EngineResult(text=recognize(raw, samples) if text is None else text)

        result = await guard.run(submit, audio[a:b], lambda x, y: spoken.speech_seconds(a + x, a + y))
        return result.text

    kept = [asyncio.run(guarded(a, b, answer)) for (a, b), answer in zip(pieces, first, strict=True)]
    without, with_guard = wer(reference, " ".join(first)), wer(reference, " ".join(kept))
    print(f"{len(pieces)} pieces, {span[0] / RATE:.1f}-{span[1] / RATE:.1f} s at 5 dB: without the guard "
          f"{without:.4f}, with it {with_guard:.4f}; {guard.as_dict()}")
    assert guard.failed["empty"] >= 1, "no piece came back empty: the model or the cut changed; pick another case"
    assert guard.improved >= 1
    assert with_guard < without
