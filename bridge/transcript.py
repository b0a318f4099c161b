"""From engine results of pieces to one transcript on the file's time line.

Segments come from the pieces the audio was cut into. Where the engine gives token timestamps
(parakeet) words are built from the tokens (a token that starts with the SentencePiece space mark
U+2581, or the plain space sherpa-onnx puts in its place, begins a new word) and each piece is split
into segments at sentence ends, at pauses between words and before a segment grows past
``MAX_SEGMENT_SECONDS``, so that subtitles get readable cues rather than one per piece (parakeet's
pieces run up to two minutes). Models without token timestamps get one segment per piece; no time
is ever invented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.ports import EngineResult

WORD_START_MARKS = ("\u2581", " ")
TOKEN_FRAME_SECONDS = 0.08  # parakeet's encoder frame: fallback token length when no duration
SENTENCE_ENDS = (".", "?", "!", "\u2026", "\u3002", "\uff1f", "\uff01")
PAUSE_SECONDS = 1.0  # a silence this long between two words ends a segment
MAX_SEGMENT_SECONDS = 15.0


@dataclass
class Word:
    word: str
    start: float
    end: float


@dataclass
class Segment:
    start: float
    end: float
    text: str
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    duration: float
    segments: list[Segment]
    has_word_times: bool
    language: str = ""

    @property
    def words(self) -> list[Word]:
        return [w for seg in self.segments for w in seg.words]


def words_from_tokens(result: EngineResult, offset: float) -> list[Word]:
    """Build words from tokens and their start times (and TDT durations when present)."""
    tokens, starts, durs = result.tokens, result.timestamps, result.durations
    if not tokens or len(starts) != len(tokens):
        return []
    words: list[Word] = []
    current: list[int] = []

    def flush() -> None:
        if not current:
            return
        text = "".join(tokens[i] for i in current).replace("\u2581", " ").strip()
        last = current[-1]
        if len(durs) == len(tokens) and durs[last] > 0:
            end = starts[last] + durs[last]
        elif last + 1 < len(starts):
            end = starts[last + 1]
        else:
            end = starts[last] + TOKEN_FRAME_SECONDS
        if text:
            words.append(Word(text, round(offset + starts[current[0]], 3), round(offset + end, 3)))
        current.clear()

    for i, tok in enumerate(tokens):
        if tok.startswith(WORD_START_MARKS) and current:
            flush()
        current.append(i)
    flush()
    # Punctuation-only tokens that start no word stay attached to the word before them.
    return words


def split_words(words: list[Word]) -> list[list[Word]]:
    """Group a piece's words into segments: a sentence end or a pause closes one, and a word that
    would take a segment past ``MAX_SEGMENT_SECONDS`` starts the next."""
    groups: list[list[Word]] = []
    current: list[Word] = []
    for word in words:
        if current and (word.start - current[-1].end >= PAUSE_SECONDS
                        or word.end - current[0].start > MAX_SEGMENT_SECONDS):
            groups.append(current)
            current = []
        current.append(word)
        if word.word.endswith(SENTENCE_ENDS):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def build_transcript(
    pieces: list[tuple[float, float, EngineResult | None]], duration: float, token_timestamps: bool
) -> Transcript:
    """``pieces``: (start s, end s, result or None for a skipped silent piece), in time order."""
    segments: list[Segment] = []
    language = ""
    for start, end, result in pieces:
        if result is None or not result.text:
            continue
        language = language or result.language
        words = words_from_tokens(result, start) if token_timestamps else []
        if not words:
            segments.append(Segment(round(start, 3), round(end, 3), result.text))
            continue
        for group in split_words(words):
            seg_start = max(start, min(group[0].start, end))
            seg_end = min(end, max(group[-1].end, seg_start))
            text = " ".join(w.word for w in group)
            segments.append(Segment(round(seg_start, 3), round(seg_end, 3), text, group))
    text = " ".join(seg.text for seg in segments)
    return Transcript(text=text, duration=duration, segments=segments,
                      has_word_times=token_timestamps, language=language)
