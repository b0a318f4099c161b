"""Concurrent requests run in parallel over the engine's connections and all come back right."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import transcribe, wer
from tests.speech import HARVARD, festival_wav, have_festival

pytestmark = pytest.mark.skipif(not have_festival(), reason="festival/sox not installed")


def test_eight_concurrent_requests_are_all_correct(bridge):
    sentences = HARVARD[:8]
    files = [festival_wav(s) for s in sentences]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda f: transcribe(bridge.url, f), files))
    assert [r.status_code for r in responses] == [200] * 8
    for sentence, r in zip(sentences, responses, strict=True):
        assert wer(sentence, r.json()["text"]) <= 0.2, (sentence, r.json()["text"])
