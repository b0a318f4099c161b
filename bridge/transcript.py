"""From engine results of pieces to one transcript on the file's time line.

Segments come from the pieces the audio was cut into; where the engine gives token timestamps
(parakeet) segment bounds are refined by them and words are built from the tokens: a token that
starts with the SentencePiece space mark (U+2581) or a plain space begins a new word.
Models without token timestamps get segments only; no word time is ever invented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.ports import EngineResult

WORD_START_MARKS = ("\u2581", " ")
TOKEN_FRAME_SECONDS = 0.08  # parakeet's encoder frame: fallback token length when no duration


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
        seg_start, seg_end = start, end
        if words:
            seg_start = max(start, min(words[0].start, end))
            seg_end = min(end, max(words[-1].end, seg_start))
        segments.append(Segment(round(seg_start, 3), round(seg_end, 3), result.text, words))
    text = " ".join(seg.text for seg in segments)
    return Transcript(text=text, duration=duration, segments=segments,
                      has_word_times=token_timestamps, language=language)
