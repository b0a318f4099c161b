"""Accuracy through the HTTP API: WER on Festival-rendered Harvard sentences and a real recording."""

from __future__ import annotations

import pytest

from tests.conftest import BECKETT_TEXT
from tests.helpers import transcribe, wer
from tests.speech import HARVARD, festival_wav, have_festival

pytestmark = pytest.mark.skipif(not have_festival(), reason="festival/sox not installed")


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
