"""Accuracy on real read speech (``../shared/data/librispeech/``): the stack against the raw engine.

    .venv/bin/python -m bench.bench_real_speech [--long 300 600] [--noisy-seconds 300] [--snr 20 10 5]

Three measurements in one run, with the bridge's model and settings, WER over all words
(``tests.helpers.wer``: lower case, no punctuation):

- **Short clips.** Each of the 104 utterances alone, through the bridge and through the raw engine
  (sherpa-onnx's in-process ``OfflineRecognizer``, the bridge's model and threads): the bridge must
  add nothing on clips it does not cut.
- **Long recordings.** The utterances joined in order, each with its own edges and a pause of
  0.3-1.0 s of quiet room noise (-60 dBFS) after it, to 5 and 10 minutes: the bridge on the whole
  file (its VAD cuts it) against the raw engine on each utterance alone (the best cutting there is).
- **Noisy.** The utterances of seven speakers joined as above, under babble (four streams of the
  four other speakers' speech) plus pink noise at each SNR: the raw engine on the same noisy audio
  cut at each utterance's bounds, and cut by hand at utterance bounds into pieces of up to 25 s (the
  length at which Moonshine starts to drop words), and the bridge with and without the piece guard
  (``GUARD_PIECES``). A first row without noise shows the model's floor on this speech.

``python -m bench`` runs this after its speed table (``--no-accuracy`` skips it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.bench_noisy import babble_and_pink, hand_cut, mix, pink_noise, start_bridges
from bench.bench_stack import Services, in_process_recognizer, recognize
from bridge.config import load_settings
from bridge.models.catalog import Catalog
from bridge.models.model_store import ModelStore
from tests.helpers import wer
from tests.speech import LIBRISPEECH, librispeech_samples, librispeech_text, speech_span, write_wav16

RATE = 16000
BABBLE_SPEAKERS = ("1688", "2033", "2609", "3080")  # their speech is the noise; the rest is the speech


@dataclass
class Utterance:
    uid: str
    text: str
    samples: np.ndarray

    @property
    def speaker(self) -> str:
        return self.uid.split("-")[0]


def utterances() -> list[Utterance]:
    uids = sorted(p.stem for p in LIBRISPEECH.glob("*.flac"))
    return [Utterance(u, librispeech_text(u), librispeech_samples(u)) for u in uids]


def room(seconds: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal(int(seconds * RATE)) * 10 ** (-60 / 20)).astype(np.float32)


def join(utts: list[Utterance], seconds: float, seed: int = 0
         ) -> tuple[np.ndarray, list[tuple[str, int, int]], list[Utterance]]:
    """Utterances in order, each followed by 0.3-1.0 s of room noise, while they fit in ``seconds``
    (cycling through them if needed): the audio, (text, start, end) of each, and the ones used."""
    rng = np.random.default_rng(seed)
    parts, truth, used, pos, k = [], [], [], 0, 0
    while True:
        u = utts[k % len(utts)]
        gap = room(float(rng.uniform(0.3, 1.0)), rng)
        if pos + len(u.samples) + len(gap) > seconds * RATE:
            break
        truth.append((u.text, pos, pos + len(u.samples)))
        used.append(u)
        parts += [u.samples, gap]
        pos += len(u.samples) + len(gap)
        k += 1
    return np.concatenate(parts), truth, used


def babble(n: int, utts: list[Utterance], seed: int = 1) -> np.ndarray:
    """Four streams of the babble speakers' speech (cut to their voice, random order) plus pink noise,
    ``n`` samples at unit power."""
    rng = np.random.default_rng(seed)
    clips = [speech_span(u.samples) for u in utts if u.speaker in BABBLE_SPEAKERS]

    def stream() -> np.ndarray:
        out: list[np.ndarray] = []
        while sum(map(len, out)) < n:
            out.append(clips[int(rng.integers(len(clips)))])
        return np.concatenate(out)[:n]

    pink = pink_noise(n, rng)
    return babble_and_pink([stream() for _ in range(4)], pink).astype(np.float32)


def noisy_speech(utts: list[Utterance], seconds: float) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int, int]]]:
    """(speech of the non-babble speakers, babble of the same length, truth)."""
    speech, truth, _ = join([u for u in utts if u.speaker not in BABBLE_SPEAKERS], seconds, seed=2)
    return speech, babble(len(speech), utts), truth


def post(client: httpx.Client, url: str, path: Path) -> str:
    with path.open("rb") as fh:
        r = client.post(url + "/v1/audio/transcriptions", files={"file": (path.name, fh, "audio/wav")})
    r.raise_for_status()
    return str(r.json()["text"])


def measure(post_to: Callable[[str, Path], str], raw: Callable[[np.ndarray], str], work: Path,
            long_seconds: list[float], noisy_seconds: float, snrs: list[float],
            limit: int | None = None) -> list[str]:
    """The three tables as markdown lines; ``post_to(bridge, wav)`` answers through the bridge named
    ``guard`` or ``no guard``."""
    every = utterances()
    utts = every[:limit]
    lines = [f"### Accuracy on real speech (LibriSpeech, {len(utts)} utterances, "
             f"{sum(len(u.samples) for u in utts) / RATE:.0f} s, {len({u.speaker for u in utts})} speakers)", ""]

    raw_text: dict[str, str] = {}
    bridge_text: dict[str, str] = {}

    def raw_alone(u: Utterance) -> str:
        if u.uid not in raw_text:
            raw_text[u.uid] = raw(u.samples)
        return raw_text[u.uid]

    t0 = time.perf_counter()
    for u in utts:
        raw_alone(u)
        bridge_text[u.uid] = post_to("guard", write_wav16(work / "clip.wav", u.samples))
    refs = [u.text for u in utts]
    lines += ["| audio | raw engine | bridge | bridge - raw |", "| --- | --- | --- | --- |"]
    if utts:  # --utterances 0: the noisy table alone
        raw_wer = wer(refs, [raw_text[u.uid] for u in utts])
        lines.append(f"| each utterance alone | {raw_wer:.2%} | {wer(refs, [bridge_text[u.uid] for u in utts]):.2%} "
                     f"| {100 * (wer(refs, [bridge_text[u.uid] for u in utts]) - raw_wer):+.2f} pt |")
        print(f"short clips: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    for seconds in long_seconds:
        audio, truth, used = join(utts or every, seconds)
        text = post_to("guard", write_wav16(work / f"long-{seconds:g}.wav", audio))
        reference = " ".join(u.text for u in used)
        per_utt = wer(reference, " ".join(raw_alone(u) for u in used))
        joined = wer(reference, text)
        lines.append(f"| {len(audio) / RATE / 60:.1f} min joined ({len(used)} utterances): bridge on the file, "
                     f"raw on each utterance | {per_utt:.2%} | {joined:.2%} | {100 * (joined - per_utt):+.2f} pt |")
        print(f"long {seconds:g} s: done", file=sys.stderr)

    if snrs:
        speech, noise, truth = noisy_speech(every, noisy_seconds)
        reference = " ".join(t for t, _, _ in truth)
        lines += ["", f"Noisy: {len(speech) / RATE:.0f} s of {len({u.speaker for u in every} - set(BABBLE_SPEAKERS))} "
                  f"speakers under babble of {len(BABBLE_SPEAKERS)} others plus pink noise. Raw, each utterance: "
                  "the raw engine on the noisy audio cut at every utterance's bounds (the best cutting there is); "
                  "raw, hand cut: cut at utterance bounds into pieces of up to 25 s. The clean row is the same "
                  "speech without noise: no cutting of the noisy audio can do much better than it.", "",
                  "| SNR | raw, each utterance | raw, hand cut | bridge, no guard | bridge with guard "
                  "| guard / hand cut |", "| --- | --- | --- | --- | --- | --- |"]
        for snr in [None, *snrs]:
            audio = mix(speech, noise, snr)
            path = write_wav16(work / f"noisy-{snr}.wav", audio)
            each = wer(reference, " ".join(raw(audio[a:b]) for _, a, b in truth))
            raw_w = wer(reference, " ".join(raw(audio[a:b]) for a, b in hand_cut(truth)))
            off = wer(reference, post_to("no guard", path))
            on = wer(reference, post_to("guard", path))
            label = "clean" if snr is None else f"{snr:g} dB"
            lines.append(f"| {label} | {each:.2%} | {raw_w:.2%} | {off:.2%} | {on:.2%} | {on / raw_w:.2f}x |")
            print(f"noisy {label}: done", file=sys.stderr)
    return lines


def run(services: Services, work: Path, long_seconds: list[float], noisy_seconds: float, snrs: list[float],
        limit: int | None = None) -> list[str]:
    settings = load_settings()
    spec = Catalog.load(settings.catalog_file).get(settings.default_model)
    store = ModelStore(settings.models_dir)
    store.ensure(spec)
    recognizer = in_process_recognizer(spec, store.path_for(spec.id), settings.sherpa_num_threads,
                                       settings.sherpa_provider)
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "MODELS_DIR": str(settings.models_dir),
           "DEFAULT_MODEL": spec.id}
    urls = start_bridges(services, env, "accuracy-")
    with httpx.Client(timeout=1800) as client:
        lines = measure(lambda name, path: post(client, urls[name], path), lambda a: recognize(recognizer, a), work,
                        long_seconds, noisy_seconds, snrs, limit)
    lines.insert(1, f"\nModel {spec.id}, {settings.sherpa_num_threads} thread(s) per model run; WER over all words.")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_real_speech", description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", type=float, nargs="*", default=[300, 600], help="joined recordings, seconds")
    ap.add_argument("--noisy-seconds", type=float, default=300)
    ap.add_argument("--snr", type=float, nargs="*", default=[20, 10, 5])
    ap.add_argument("--utterances", type=int, default=None,
                    help="only the first N as short clips and in the joined recordings (a quick look; 0: no short "
                         "clips, all in the joined ones)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-real-speech-"))
    services = Services(work)
    try:
        lines = run(services, work, args.long, args.noisy_seconds, args.snr, args.utterances)
    finally:
        services.stop()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
