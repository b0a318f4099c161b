"""From engine results of pieces to one transcript on the file's time line.

Segments come from the pieces the audio was cut into. Where the engine gives token timestamps
(parakeet) words are built from the tokens (a token that starts with the SentencePiece space mark
U+2581, or the plain space sherpa-onnx puts in its place, begins a new word) and each piece is split
into segments at sentence ends, at pauses between words and before a segment grows past
``MAX_SEGMENT_SECONDS``, so that subtitles get readable cues rather than one per piece (parakeet's
pieces run up to two minutes). Models without token timestamps get one segment per piece; no time
is ever invented.

Models without token timestamps (Moonshine) get one segment per piece, and a piece runs up to 30 s:
too long for a subtitle cue. For the timed formats the caller passes the speech spans the VAD
finds inside each long piece (``speech``); the piece then becomes one cue per run of speech up to
``CUE_SECONDS`` (a single span longer than that stays whole), with the cue times those of the
speech. The piece's text, transcribed in one go (cutting the audio smaller costs the model
context: 5-minute WER 2.7 % -> 4.4-9.3 % in pieces of 7 s), is shared over the cues in proportion
to their speech time, moved to a sentence end when one is within two words. The times are real;
which cue a word next to a pause lands in is an estimate.

Each segment also carries its tokens (and their log-probabilities where the engine gives them),
shared out by the words of its text, and, when the speech spans are known, the share of its time
the VAD heard no speech in (``no_speech``; each span widened by the padding the cutter keeps around
speech, since Silero's spans end tight on the voice: 0.4 of a clean 2 s sentence was "no speech").
"""

from __future__ import annotations

import zlib
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.cutting import Spans, speech_share
from bridge.ports import EngineResult

WORD_START_MARKS = ("\u2581", " ")
TOKEN_FRAME_SECONDS = 0.08  # parakeet's encoder frame: fallback token length when no duration
SENTENCE_ENDS = (".", "?", "!", "\u2026", "\u3002", "\uff1f", "\uff01")
PAUSE_SECONDS = 1.0  # a silence this long between two words ends a segment
MAX_SEGMENT_SECONDS = 15.0
CUE_SECONDS = 7.0  # without token times: a piece longer than this is split at its pauses
SNAP_WORDS = 2  # a cue boundary moves to a sentence end this close (in words)


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
    flags: list[str] = field(default_factory=list)  # checks its piece still fails (bridge.guard)
    tokens: list[str] = field(default_factory=list)  # the engine's tokens for its text (U+2581 as a space)
    logprobs: list[float] = field(default_factory=list)  # one per token, when the engine gives them
    no_speech: float = 0.0  # share of its time without speech (VAD); 0 when not measured
    speaker: str = ""  # who spoke it, when diarized (bridge.diarization)


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

    @property
    def token_logprobs(self) -> list[tuple[str, float]]:
        """(token, log-probability) over the whole text, in order, each segment's first token starting
        a word (``word_start``); empty when the engine gives none."""
        return [(word_start(token) if i == 0 else token, logprob) for seg in self.segments
                for i, (token, logprob) in enumerate(zip(seg.tokens, seg.logprobs, strict=False))]


def words_from_tokens(result: EngineResult, offset: float, limit: float = float("inf")) -> list[Word]:
    """Build words from tokens and their start times (and TDT durations when present), none past
    ``limit`` (the piece's end: a transducer's last duration can run past the audio it heard)."""
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
            first = min(offset + starts[current[0]], limit)
            words.append(Word(text, round(first, 3), round(min(offset + end, limit), 3)))
        current.clear()

    for i, tok in enumerate(tokens):
        if tok.startswith(WORD_START_MARKS) and current:
            flush()
        current.append(i)
    flush()
    # Punctuation-only tokens that start no word stay attached to the word before them.
    return words


def word_start(token: str) -> str:
    """A piece's (or segment's) first token as text that starts a word: texts are joined with a space,
    so their tokens must be too, even where the engine's first token continues no word of its own."""
    return token if token[:1].isspace() else " " + token


def scored_tokens(result: EngineResult) -> list[tuple[str, float]]:
    """(token, log-probability) of one piece, U+2581 read as a space, the first starting a word;
    empty when the engine gives none."""
    if len(result.logprobs) != len(result.tokens):
        return []
    tokens = [t.replace("\u2581", " ") for t in result.tokens]
    return [(word_start(t) if i == 0 else t, p) for i, (t, p) in enumerate(zip(tokens, result.logprobs, strict=True))]


def share_tokens(result: EngineResult, segments: list[Segment]) -> None:
    """Give each segment of one piece its tokens (and log-probabilities): tokens are counted into
    words as in ``words_from_tokens`` and handed out by the number of words in each segment's text
    (the segments share out the piece's text in order); the last segment takes any rest."""
    if not segments or not result.tokens:
        return
    tokens = [t.replace("\u2581", " ") for t in result.tokens]  # as the engine said them: token ids
    probs = result.logprobs if len(result.logprobs) == len(tokens) else []
    firsts = [0]  # index of each segment's first word
    for seg in segments[:-1]:
        firsts.append(firsts[-1] + len(seg.text.split()))
    word = -1
    for i, token in enumerate(tokens):
        if word < 0 or (token.startswith(" ") and token.strip()):
            word += 1
        seg = segments[bisect_right(firsts, word) - 1]
        seg.tokens.append(token)
        if probs:
            seg.logprobs.append(probs[i])


def compression_ratio(text: str) -> float:
    """A text's bytes over their zlib-compressed size: high for text that repeats itself (Whisper's
    measure, in ``verbose_json`` segments and the piece guard)."""
    raw = text.encode("utf-8")
    return len(raw) / max(1, len(zlib.compress(raw))) if raw else 0.0


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


def cue_spans(speech: Spans, cue_seconds: float = CUE_SECONDS) -> list[tuple[float, float, float]]:
    """Speech spans (in order) merged into cues while a cue stays within ``cue_seconds``:
    (start, end, seconds of speech in it)."""
    cues: list[tuple[float, float, float]] = []
    for start, end in speech:
        if cues and end - cues[-1][0] <= cue_seconds:
            first, _, spoken = cues[-1]
            cues[-1] = (first, end, spoken + end - start)
        else:
            cues.append((start, end, end - start))
    return cues


def share_text(text: str, weights: list[float]) -> list[str]:
    """``text`` cut at spaces into ``len(weights)`` parts of about those shares of its characters;
    a cut within ``SNAP_WORDS`` words of a sentence end moves to it. Parts may be empty."""
    words = text.split()
    total = sum(weights)
    if not words or total <= 0:
        return [text] + [""] * (len(weights) - 1)
    lengths = [len(w) + 1 for w in words]
    chars = sum(lengths)
    cuts: list[int] = []  # index of the first word of each part after the first
    seen, k, share = 0, 0, 0.0
    for k_weight in weights[:-1]:
        share += k_weight / total
        while k < len(words) and (seen + lengths[k] / 2) / chars < share:
            seen += lengths[k]
            k += 1
        cuts.append(k)
    for i, cut in enumerate(cuts):
        low = cuts[i - 1] if i else 0
        high = cuts[i + 1] if i + 1 < len(cuts) else len(words)
        ends = [j + 1 for j in range(max(low, cut - SNAP_WORDS - 1), min(high, cut + SNAP_WORDS))
                if words[j].endswith(SENTENCE_ENDS) and low < j + 1 <= high]
        if ends:
            cuts[i] = min(ends, key=lambda j: abs(j - cut))
    bounds = [0, *cuts, len(words)]
    return [" ".join(words[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def split_at_pauses(start: float, end: float, text: str, speech: Spans) -> list[Segment]:
    """One segment per cue of speech inside [start, end] (see the module's docstring)."""
    cues = cue_spans([(max(a, start), min(b, end)) for a, b in speech if b > start and a < end])
    if len(cues) < 2:
        return [Segment(round(start, 3), round(end, 3), text)]
    parts = share_text(text, [spoken for _, _, spoken in cues])
    segments: list[Segment] = []
    for (a, b, _), part in zip(cues, parts, strict=True):
        if part:
            segments.append(Segment(round(a, 3), round(b, 3), part))
        elif segments:  # no words for this cue: its time joins the one before
            segments[-1].end = round(b, 3)
    return segments


def build_transcript(
    pieces: list[tuple[float, float, EngineResult | None]], duration: float, token_timestamps: bool,
    speech: Callable[[float, float], Spans] | None = None,
) -> Transcript:
    """``pieces``: (start s, end s, result or None for a skipped silent piece), in time order.
    ``speech(start, end)``: the speech spans in that stretch, for cutting pieces without token
    times into cues (the timed formats) and for each segment's ``no_speech``; None keeps one
    segment per such piece and measures nothing."""
    segments: list[Segment] = []
    language = ""
    for start, end, result in pieces:
        if result is not None and not result.text.strip() and result.flags:
            # The model gave nothing for a piece of speech, even in halves: shown, never dropped.
            segments.append(Segment(round(start, 3), round(end, 3), "", flags=list(result.flags)))
            continue
        if result is None or not result.text:
            continue
        language = language or result.language
        first = len(segments)
        words = words_from_tokens(result, start, end) if token_timestamps else []
        if not words and speech is not None and end - start > CUE_SECONDS:
            segments += split_at_pauses(start, end, result.text, speech(start, end))
        elif not words:
            segments.append(Segment(round(start, 3), round(end, 3), result.text))
        for group in split_words(words):
            seg_start = max(start, min(group[0].start, end))
            seg_end = min(end, max(group[-1].end, seg_start))
            text = " ".join(w.word for w in group)
            segments.append(Segment(round(seg_start, 3), round(seg_end, 3), text, group))
        share_tokens(result, segments[first:])
        for seg in segments[first:]:
            seg.flags = list(result.flags)
            if speech is not None:
                seg.no_speech = round(1.0 - speech_share(speech(seg.start, seg.end), seg.start, seg.end), 3)
    text = " ".join(seg.text for seg in segments if seg.text)
    return Transcript(text=text, duration=duration, segments=segments,
                      has_word_times=token_timestamps, language=language)
