"""Who spoke when: sherpa-onnx's own offline speaker diarization, run by the bridge.

A request for ``gpt-4o-transcribe-diarize`` (``DIARIZE_ALIASES``) is transcribed by the loaded model
as usual, and its decoded audio is also given to ``sherpa_onnx.OfflineSpeakerDiarization``:
pyannote segmentation 3.0 finds speaker turns in 10 s windows, a speaker-embedding model
(CAM++ in production) describes each, and the turns are clustered into speakers (cosine
distance ``DIARIZATION_THRESHOLD``; the number of speakers is not given). Speakers are named ``A``,
``B``, ... in order of first appearance, or by the names of known speakers (below).

Text is given to speakers by time:

- a model with token times (parakeet): each word goes to the speaker whose turn covers most of it,
  and segments are cut where the speaker changes (``split_by_speaker``);
- a model without them (Moonshine): the audio is cut at the speaker changes before it is
  transcribed (``turn_pieces``), so each piece has one speaker.

Long recordings (over ``DIARIZATION_WINDOW_SECONDS``) are diarized in windows cut at pauses, and
each window's speakers are matched to those of the windows before by their voices
(``SpeakerBook``), so memory stays that of one window however long the recording.

Known speakers: each reference (2-10 s of one person) and each speaker found get an embedding
from the same model; the pairs closest in cosine similarity are matched one to one, down to
``KNOWN_SPEAKER_MIN_SIMILARITY``; speakers left over keep their letters.

The diarization of a request is one job in the fair scheduler (``bridge.scheduler``), in a thread;
one runs at a time per bridge. The Python package's ONNX runtime is the CPU one: on a GPU host
diarization runs on the CPU beside the engine. Limits: overlapping speech goes to one of the
speakers; speakers who say less than about a second may be merged into another.
"""

from __future__ import annotations

import logging
import string
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bridge.cutting import Samples, plan_pieces
from bridge.ports import SAMPLE_RATE
from bridge.transcript import Segment, Word

log = logging.getLogger("bridge.diarization")
K = TypeVar("K")
V = TypeVar("V")

MIN_TURN_SECONDS = 0.3  # shorter speech is not a turn (sherpa-onnx's min_duration_on)
MIN_PAUSE_SECONDS = 0.5  # shorter pauses inside one speaker's speech are bridged (min_duration_off)
SPEAKER_SAMPLE_SECONDS = 30.0  # speech of a speaker used for their embedding (known speakers)
REFERENCE_SECONDS = (2.0, 10.0)  # OpenAI's bounds for a known speaker's reference
MAX_KNOWN_SPEAKERS = 4


@dataclass
class Turn:
    start: float  # seconds
    end: float
    speaker: str


def letters(n: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA, ..."""
    name = ""
    n += 1
    while n:
        n, rest = divmod(n - 1, 26)
        name = string.ascii_uppercase[rest] + name
    return name


class Diarizer:
    """The two models, loaded at the first request that needs them."""

    def __init__(self, segmentation: Path, embedding: Path, *, threshold: float, num_threads: int,
                 min_similarity: float, window_seconds: float = 600.0) -> None:
        self.segmentation = segmentation
        self.window_seconds = window_seconds
        self.embedding = embedding
        self.threshold = threshold
        self.num_threads = num_threads
        self.min_similarity = min_similarity
        self._diarization: Any = None
        self._extractor: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        if self._diarization is not None:
            return
        import sherpa_onnx

        embedding = sherpa_onnx.SpeakerEmbeddingExtractorConfig(model=str(self.embedding),
                                                                num_threads=self.num_threads, provider="cpu")
        config = sherpa_onnx.OfflineSpeakerDiarizationConfig(
            segmentation=sherpa_onnx.OfflineSpeakerSegmentationModelConfig(
                pyannote=sherpa_onnx.OfflineSpeakerSegmentationPyannoteModelConfig(model=str(self.segmentation)),
                num_threads=self.num_threads, provider="cpu"),
            embedding=embedding,
            clustering=sherpa_onnx.FastClusteringConfig(num_clusters=-1, threshold=self.threshold),
            min_duration_on=MIN_TURN_SECONDS, min_duration_off=MIN_PAUSE_SECONDS)
        if not config.validate():
            raise RuntimeError(f"speaker diarization models cannot be loaded from {self.segmentation} and "
                               f"{self.embedding}")
        self._diarization = sherpa_onnx.OfflineSpeakerDiarization(config)
        self._extractor = sherpa_onnx.SpeakerEmbeddingExtractor(embedding)
        log.info("speaker diarization loaded: %s, %s (threshold %.2f)", self.segmentation.parent.name,
                 self.embedding.parent.name, self.threshold)

    def turns(self, audio: Samples) -> list[Turn]:
        """The speaker turns of 16 kHz mono audio, in time order, speakers lettered by first
        appearance (blocking: call it in a thread). Audio longer than ``window_seconds`` is
        diarized window by window, the windows cut at pauses, so that memory stays that of one
        window however long the recording; each window's speakers are matched to those found
        before by their voices (``SpeakerBook``)."""
        windows = plan_pieces(audio, self.window_seconds)
        if len(windows) == 1:
            return [Turn(a, b, letters(speaker)) for a, b, speaker in self._local_turns(audio[:])]
        book = SpeakerBook(1 - self.threshold)
        turns: list[Turn] = []
        for start, end in windows:
            samples = audio[start:end]
            local = self._local_turns(samples)
            voices = {speaker: self.embed(speech_sample(samples, [Turn(a, b, "") for a, b, s in local if s == speaker]))
                      for speaker in dict.fromkeys(s for _, _, s in local)}
            names = book.match(voices)
            offset = start / SAMPLE_RATE
            turns += [Turn(round(a + offset, 3), round(b + offset, 3), names[s]) for a, b, s in local]
        log.info("speakers found in %d windows of up to %.0f s: %d", len(windows), self.window_seconds, len(book))
        return join_turns(turns)

    def _local_turns(self, samples: np.ndarray) -> list[tuple[float, float, int]]:
        """sherpa-onnx's turns of one stretch of audio: (start s, end s, speaker) in time order,
        speakers numbered from 0 by first appearance."""
        with self._lock:
            self._load()
            found = self._diarization.process(np.ascontiguousarray(samples, dtype=np.float32)).sort_by_start_time()
        numbers: dict[int, int] = {}
        turns = []
        for seg in found:
            number = numbers.setdefault(seg.speaker, len(numbers))
            turns.append((round(float(seg.start), 3), round(float(seg.end), 3), number))
        return turns

    def embed(self, samples: np.ndarray) -> np.ndarray:
        """A unit-length speaker embedding of some audio (blocking)."""
        with self._lock:
            self._load()
            stream = self._extractor.create_stream()
            stream.accept_waveform(SAMPLE_RATE, np.ascontiguousarray(samples, dtype=np.float32))
            stream.input_finished()
            vector = np.asarray(self._extractor.compute(stream), dtype=np.float64)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def name_speakers(self, audio: Samples, turns: list[Turn], references: dict[str, np.ndarray]) -> list[Turn]:
        """Give speakers the names of the known speakers they match (blocking)."""
        if not references or not turns:
            return turns
        found = {speaker: self.embed(speech_sample(audio, [t for t in turns if t.speaker == speaker]))
                 for speaker in dict.fromkeys(t.speaker for t in turns)}
        renamed = best_pairs([(float(found[s] @ ref), s, name) for s in found for name, ref in references.items()],
                             self.min_similarity)
        log.info("known speakers matched: %s", ", ".join(f"{s}={n}" for s, n in renamed.items()) or "none")
        return [Turn(t.start, t.end, renamed.get(t.speaker, t.speaker)) for t in turns]


def best_pairs(pairs: list[tuple[float, K, V]], min_similarity: float) -> dict[K, V]:
    """(similarity, a, b) pairs matched one to one, most similar first, down to ``min_similarity``:
    each ``a`` -> its ``b`` (known speakers to references, a window's speakers to those before)."""
    matched: dict[K, V] = {}
    for similarity, a, b in sorted(pairs, reverse=True):
        if similarity < min_similarity:
            break
        if a not in matched and b not in matched.values():
            matched[a] = b
    return matched


def speech_sample(audio: Samples, turns: list[Turn]) -> np.ndarray:
    """Up to ``SPEAKER_SAMPLE_SECONDS`` of one speaker's speech, longest turns first: what their
    embedding is computed from."""
    parts, seconds = [], 0.0
    for t in sorted(turns, key=lambda t: t.start - t.end):
        if seconds >= SPEAKER_SAMPLE_SECONDS:
            break
        parts.append(audio[int(t.start * SAMPLE_RATE):int(t.end * SAMPLE_RATE)])
        seconds += t.end - t.start
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


class SpeakerBook:
    """The speakers of a long recording, met window by window: each has the sum of the embeddings
    of their voice in the windows where they spoke. A window's speakers are matched one to one to
    known ones, most similar pairs first, down to ``min_similarity`` (cosine, the clustering's own
    distance threshold turned around); a speaker left over is new. Speakers are lettered in the
    order they are met."""

    def __init__(self, min_similarity: float) -> None:
        self.min_similarity = min_similarity
        self._voices: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._voices)

    def match(self, voices: dict[int, np.ndarray]) -> dict[int, str]:
        """Each of a window's speakers (by number, in order of appearance) -> a letter."""
        known = [v / max(float(np.linalg.norm(v)), 1e-12) for v in self._voices]
        taken = best_pairs([(float(voice @ k), speaker, i) for speaker, voice in voices.items()
                            for i, k in enumerate(known)], self.min_similarity)
        for speaker, voice in voices.items():
            if speaker in taken:
                self._voices[taken[speaker]] = self._voices[taken[speaker]] + voice
            else:
                taken[speaker] = len(self._voices)
                self._voices.append(voice)
        return {speaker: letters(i) for speaker, i in taken.items()}


def join_turns(turns: list[Turn]) -> list[Turn]:
    """Turns in time order, one speaker's neighbours closer than ``MIN_PAUSE_SECONDS`` joined (a turn
    cut in two where one window ended and the next began)."""
    out: list[Turn] = []
    for t in sorted(turns, key=lambda t: t.start):
        if out and out[-1].speaker == t.speaker and t.start - out[-1].end < MIN_PAUSE_SECONDS:
            out[-1] = Turn(out[-1].start, max(out[-1].end, t.end), t.speaker)
        else:
            out.append(t)
    return out


def speaker_at(turns: list[Turn], start: float, end: float) -> str:
    """The speaker whose turns cover most of [start, end]; the nearest turn's when none does."""
    if not turns:
        return ""
    cover: dict[str, float] = {}
    for t in turns:
        overlap = min(end, t.end) - max(start, t.start)
        if overlap > 0:
            cover[t.speaker] = cover.get(t.speaker, 0.0) + overlap
    if cover:
        return max(cover, key=lambda s: cover[s])
    middle = (start + end) / 2
    return min(turns, key=lambda t: min(abs(t.start - middle), abs(t.end - middle))).speaker


def split_by_speaker(segments: list[Segment], turns: list[Turn]) -> list[Segment]:
    """Segments with words (token times) cut where the speaker changes, each with its speaker;
    segments without words get the speaker of most of their time."""
    out: list[Segment] = []
    for seg in segments:
        if not seg.words:
            out.append(Segment(seg.start, seg.end, seg.text, flags=seg.flags, speaker=speaker_at(turns, seg.start,
                                                                                                 seg.end)))
            continue
        run: list[Word] = []
        speaker = ""
        for word in seg.words:
            who = speaker_at(turns, word.start, word.end)
            if run and who != speaker:
                out.append(_segment(run, speaker, seg.flags))
                run = []
            run.append(word)
            speaker = who
        out.append(_segment(run, speaker, seg.flags))
    return out


def _segment(words: list[Word], speaker: str, flags: list[str]) -> Segment:
    return Segment(words[0].start, words[-1].end, " ".join(w.word for w in words), list(words), list(flags),
                   speaker=speaker)
