"""Languages: the ISO-639-1 codes a request may name, and the languages an answer says it heard.

OpenAI's ``gpt-transcribe`` answers ``"languages": [{"code": "en"}]``, and ``[]`` when it cannot
tell. Here:

- a model that speaks one language (parakeet v2, Moonshine) heard that language when it heard any
  words at all, and nothing otherwise;
- a model that speaks several (parakeet v3) has its transcript read by a text language detector
  (py3langid: langid.py's model, shipped in the package, numpy only), limited to the model's own
  languages. It answers only when the text is long enough and the detector sure enough
  (``MIN_LETTERS``, ``MIN_PROBABILITY``), so that an answer is never invented. It reads at most
  ``MAX_CHARS`` of the text: well under a millisecond (``bench/README.md``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

ISO_639_1 = frozenset(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee "
    "el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is it "
    "iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my "
    "na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn "
    "so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh "
    "zu".split())

MIN_LETTERS = 12  # shorter text ("Yes.", "OK") says too little about its language
MIN_PROBABILITY = 0.75  # renormalised over the model's languages; chosen with bench/bench_languages.py
MAX_CHARS = 4000  # enough to be sure; keeps an hour's transcript as cheap as a sentence's


def is_iso_639_1(code: str) -> bool:
    return code in ISO_639_1


class LanguageDetector:
    """py3langid, loaded once (0.8 s) on first use, for the several-language models."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._identifier: Any = None

    def _get(self) -> Any:
        with self._lock:  # loaded once; ranking is read-only
            if self._identifier is None:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            return self._identifier

    def load(self) -> None:
        self._get()

    def detect(self, text: str, candidates: Sequence[str]) -> str | None:
        """The language of ``text`` among ``candidates``, or None when the detector is not sure."""
        text = text[:MAX_CHARS]
        if sum(ch.isalpha() for ch in text) < MIN_LETTERS:
            return None
        # The probabilities over all of langid's languages, renormalised over the candidates: the same
        # as langid's set_languages, without rebuilding its tables on every call.
        scores = {str(code): float(p) for code, p in self._get().rank(text) if code in candidates}
        total = sum(scores.values())
        if len(scores) < 2 or total <= 0:
            return None
        code = max(scores, key=scores.__getitem__)
        return code if scores[code] / total >= MIN_PROBABILITY else None


DETECTOR = LanguageDetector()


def heard_languages(text: str, model_languages: Sequence[str], detector: LanguageDetector = DETECTOR) -> list[str]:
    """The languages the audio was in, as far as can be told from what the model heard: ``[]`` when
    it heard no words, or cannot tell."""
    if not text.strip():
        return []
    if len(model_languages) == 1:
        return [model_languages[0]]
    code = detector.detect(text, model_languages)
    return [code] if code is not None else []


def language_objects(codes: Sequence[str]) -> list[dict[str, str]]:
    """OpenAI's wire shape: ``[{"code": "en"}]``."""
    return [{"code": code} for code in codes]


async def languages_heard(text: str, model_languages: Sequence[str]) -> list[dict[str, str]]:
    """``languages`` of an answer (OpenAI's ``[{"code": ...}]``); the detector runs off the loop."""
    if len(model_languages) > 1:
        return language_objects(await asyncio.to_thread(heard_languages, text, model_languages))
    return language_objects(heard_languages(text, model_languages))
