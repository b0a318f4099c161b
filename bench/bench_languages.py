"""How well the answers' language detector (``bridge.languages``) tells parakeet v3's 25 languages
apart, and what it costs.

Text: real translated sentences from the gettext catalogs Debian installs (``/usr/share/locale/<code>/
LC_MESSAGES/*.mo``: messages of apt, coreutils, bash, ... translated by people), 5 to 40 words each,
up to ``--per-language`` of them per language; and the LibriSpeech transcripts in ``../shared/data``
(real read English speech). parakeet v3 cannot run on this machine, so the detector reads reference
text, not v3's own transcripts: its accuracy on a model's errors is not measured here.

    .venv/bin/python -m bench.bench_languages [--per-language 200]

For each language: correct, wrong (another language: the harm), none (``[]``: the honest answer),
and the time per call.
"""

from __future__ import annotations

import argparse
import gettext
import random
import re
import statistics
import time
from pathlib import Path

from bridge.languages import LanguageDetector
from bridge.models.catalog import BUILTIN_MODELS

V3 = next(m for m in BUILTIN_MODELS if m.id == "parakeet-tdt-0.6b-v3-int8").languages
LOCALE = Path("/usr/share/locale")
LIBRISPEECH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "librispeech" / "transcripts.tsv"
PLACEHOLDER = re.compile(r"%|\{|\}|\$|<|>|\\|--|_|/|=")


def sentences(code: str, limit: int, rng: random.Random) -> list[str]:
    found: set[str] = set()
    for mo in sorted((LOCALE / code / "LC_MESSAGES").glob("*.mo")):
        try:
            with mo.open("rb") as fh:
                catalog = gettext.GNUTranslations(fh)._catalog  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError):
            continue
        for key, text in catalog.items():
            if not isinstance(text, str) or not key or isinstance(key, tuple) or text == key:
                continue
            text = " ".join(text.split())
            if 5 <= len(text.split()) <= 40 and not PLACEHOLDER.search(text):
                found.add(text)
    chosen = sorted(found)
    rng.shuffle(chosen)
    return chosen[:limit]


def english_speech(limit: int) -> list[str]:
    if not LIBRISPEECH.is_file():
        return []
    rows = [line.split("\t")[-1].strip() for line in LIBRISPEECH.read_text().splitlines() if "\t" in line]
    return [r.lower() for r in rows if r][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-language", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(1)
    detector = LanguageDetector()
    started = time.perf_counter()
    detector.load()
    print(f"detector loaded in {time.perf_counter() - started:.2f} s")
    print("| language | texts | correct | wrong | none | wrong as |")
    print("| --- | --- | --- | --- | --- | --- |")
    totals = [0, 0, 0, 0]
    times: list[float] = []
    for code in V3:
        texts = sentences(code, args.per_language, rng)
        label = code
        if code == "en":
            texts = english_speech(args.per_language) + texts
            label = "en (LibriSpeech + catalogs)"
        counts = [0, 0, 0]
        wrong_as: dict[str, int] = {}
        for text in texts:
            t0 = time.perf_counter()
            got = detector.detect(text, V3)
            times.append(time.perf_counter() - t0)
            index = 2 if got is None else 0 if got == code else 1
            counts[index] += 1
            if index == 1:
                wrong_as[str(got)] = wrong_as.get(str(got), 0) + 1
        n = len(texts)
        totals = [totals[0] + n, totals[1] + counts[0], totals[2] + counts[1], totals[3] + counts[2]]
        if n:
            top = ", ".join(f"{k} {v}" for k, v in sorted(wrong_as.items(), key=lambda kv: -kv[1])[:3])
            print(f"| {label} | {n} | {counts[0] / n:.1%} | {counts[1] / n:.1%} | {counts[2] / n:.1%} | {top} |")
    n = totals[0]
    print(f"| all | {n} | {totals[1] / n:.1%} | {totals[2] / n:.1%} | {totals[3] / n:.1%} | |")
    print(f"time per call: median {statistics.median(times) * 1e3:.3f} ms, "
          f"max {max(times) * 1e3:.3f} ms ({len(times)} calls)")


if __name__ == "__main__":
    main()
