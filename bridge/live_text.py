"""Live text: the words of a turn while the person is still talking (``gpt-live-transcribe``).

An offline model hears the open turn again at a steady pace (``delay``); a word goes out in a
``delta`` once two passes in a row agree on it and on every word before it (LocalAgreement-2,
Macháček et al. 2023, whisper_streaming). Deltas only append: a word once sent is never taken back.

What is final is never heard again. A segment of the turn closes, and the passes that follow start
at its end (the *anchor*), in one of two ways:

- by the engine's token times (parakeet): once two passes agree on words, the segment ends after
  the last agreed word that ends a sentence, or after the last agreed word once a pass covers
  ``TOKEN_CUT_SECONDS`` without one; those agreed words are its final text, with no pass of its own;
- by a pause of ``PAUSE_MS`` after at least ``MIN_SEGMENT_SECONDS`` of the turn (every model; the
  only way for models without token times, such as Moonshine): one pass over the audio up to the
  pause gives that segment's final text.

A pass covers at most ``MAX_PASS_SECONDS`` past the anchor (beyond that, passes stop until the
commit). At the commit the rest of the turn is transcribed like any turn, and ``completed``
carries the segments' final texts joined: the whole turn.

Cost: at most one pass per session in flight; a pass that comes due while the session's pass
still runs, while its committed turns wait, or while the engine has work waiting or no connection
free beside uploads and committed turns (and the one kept for newcomers) is skipped, not queued;
``REALTIME_LIVE_SESSIONS`` sessions of a bridge get live text at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from bridge.ports import SAMPLE_RATE, EngineResult
from bridge.state import BridgeState
from bridge.transcript import SENTENCE_ENDS, WORD_START_MARKS, scored_tokens, words_from_tokens

log = logging.getLogger("bridge.live_text")

# Seconds between passes for OpenAI's ``delay`` values (bench/README.md, "Live text").
DELAYS = {"minimal": 0.25, "low": 0.5, "medium": 1.0, "high": 2.0, "xhigh": 4.0}
LIVE_MODELS = ("gpt-live-transcribe", "gpt-realtime-whisper")  # live text without asking
PAUSE_MS = 300  # a pause this long may close a segment
MIN_SEGMENT_SECONDS = 2.0  # ... once the segment holds this much: short pieces lose context
MAX_SEGMENT_SECONDS = 15.0  # speech this long without a pause is closed anyway (Silero's cut)
MAX_PASS_SECONDS = 30.0  # no pass over more than this: the commit handles the rest
MIN_NEW_SECONDS = 0.2  # a pass needs this much audio it has not heard yet
TOKEN_CUT_SECONDS = 8.0  # with token times and no agreed sentence end, a pass this long cuts at its last agreed word

Delta = Callable[[str, str], Awaitable[None]]  # (item, text)


class PauseDetector(Protocol):
    def feed(self, samples: np.ndarray) -> list[tuple[str, int, int]]: ...


def _plain(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def default_delay(provider: str) -> str:
    """The pace when a session names none. On CUDA ``minimal``: with an engine that answers at once
    the words lag 0.17 s behind the audio (0.56 s at ``low``). On CPU ``medium``: with Moonshine on
    2 cores the words lag 1.8 s (p50) for 3.8x the engine time of text at each commit; ``low`` gives
    1.0 s for 6.1x (bench/README.md, "Live text")."""
    return "minimal" if provider == "cuda" else "medium"


def agreed(previous: list[str], current: list[str]) -> list[str]:
    """The words of ``current`` that ``previous`` agrees on, and on every word before them (case
    and punctuation aside: a word may gain a comma when the next one is heard)."""
    n = 0
    for a, b in zip(previous, current, strict=False):
        if _plain(a) != _plain(b):
            break
        n += 1
    return current[:n]


def continuation(sent: list[str], words: list[str]) -> tuple[list[str], list[str]]:
    """Where the words already ``sent`` end in ``words`` (a newer reading of the same audio):
    (the words after that point, still to send; the sent words that run past the end of ``words``,
    which belong to the audio after it). Words that differ are paired in order."""
    if not sent:
        return list(words), []
    matcher = difflib.SequenceMatcher(None, [_plain(w) for w in sent], [_plain(w) for w in words], autojunk=False)
    end_sent = end_words = 0
    for block in matcher.get_matching_blocks():
        if block.size:
            end_sent, end_words = block.a + block.size, block.b + block.size
    paired = min(len(sent) - end_sent, len(words) - end_words)  # misheard words, one for one
    end_sent, end_words = end_sent + paired, end_words + paired
    return list(words[end_words:]), list(sent[end_sent:])


@dataclass(frozen=True)
class Cut:
    """Where a pass's agreed words end, by the engine's token times."""

    words: int  # how many of the pass's words lie before it
    tokens: int  # how many of its tokens
    seconds: float  # from the pass's start


def stable_cut(result: EngineResult, agreed_words: int, min_seconds: float) -> Cut | None:
    """Where the next pass may start in the audio of ``result``, whose first ``agreed_words`` words
    two passes agree on: after the last of them that ends a sentence, or else, when the pass covers
    ``TOKEN_CUT_SECONDS``, after the last of them; never before ``min_seconds`` and never after the
    pass's last word (the audio past it is still being read). The cut lies halfway between the
    word's end and the next word's start. None without token times for every word."""
    words = words_from_tokens(result, 0.0)
    texts = result.text.split()
    if not words or [w.word for w in words] != texts:
        return None
    firsts = [i for i, token in enumerate(result.tokens) if i == 0 or token.startswith(WORD_START_MARKS)]
    cuts = [Cut(j + 1, firsts[j + 1], (min(words[j].end, words[j + 1].start) + words[j + 1].start) / 2)
            for j in range(min(agreed_words, len(words) - 1))]
    cuts = [cut for cut in cuts if cut.seconds >= min_seconds]
    sentence_ends = [cut for cut in cuts if texts[cut.words - 1].endswith(SENTENCE_ENDS)]
    if sentence_ends:
        return sentence_ends[-1]
    long_pass = words[-1].end >= TOKEN_CUT_SECONDS
    return cuts[-1] if cuts and long_pass else None


@dataclass
class LiveTurn:
    """What live text knows about the open turn."""

    item: str
    anchor: int  # session time line: where the audio that is not final yet begins
    finals: list[str] = field(default_factory=list)  # the closed segments' final texts
    scored: list[tuple[str, float]] = field(default_factory=list)  # their tokens' log-probabilities
    sent: list[str] = field(default_factory=list)  # every word sent in a delta
    sent_after_anchor: list[str] = field(default_factory=list)  # the sent words past the anchor
    previous: list[str] = field(default_factory=list)  # the last pass's words past the anchor
    previous_at: float = 0.0  # when the audio of the last pass had arrived (monotonic)

    def close_segment(self, text: str, scored: list[tuple[str, float]], end: int) -> list[str]:
        """The final text of the audio up to ``end``: the words of it not yet sent."""
        new, beyond = continuation(self.sent_after_anchor, text.split())
        if text:
            self.finals.append(text)
        self.scored += scored
        self.anchor, self.sent_after_anchor, self.previous = end, beyond, []
        return new

    def settle(self, words: list[str], heard_at: float) -> tuple[list[str], int]:
        """A pass's words past the anchor: (those two passes now agree on and not sent yet, how many
        of ``words`` two passes agree on)."""
        settled = agreed(self.previous, words)
        new, _ = continuation(self.sent_after_anchor, settled)
        self.previous, self.previous_at = words, heard_at
        return new, len(settled)

    def cut(self, result: EngineResult, cut: Cut) -> list[str]:
        """Close a segment at a cut by token times: its final text is the pass's words before the cut
        (agreed, so sent); the pass's later words stay the reading the next pass is compared with.
        The words of it not yet sent (none, unless a misheard word was paired)."""
        words = result.text.split()
        scored = scored_tokens(result)[:cut.tokens]
        new = self.close_segment(" ".join(words[:cut.words]), scored, self.anchor + round(cut.seconds * SAMPLE_RATE))
        self.previous = words[cut.words:]
        return new

    def record(self, words: list[str], *, past_anchor: bool) -> str:
        """Mark ``words`` sent (``past_anchor``: they lie in the audio after the anchor, not in a
        segment just closed); the delta's text (a space before it when words came before)."""
        self.sent += words
        if past_anchor:
            self.sent_after_anchor += words
        return (" " if len(self.sent) > len(words) else "") + " ".join(words)

    def transcript(self, tail: str) -> str:
        return " ".join(part for part in (*self.finals, tail) if part)


class LiveText:
    """Live text for one session: the pause detector, the open turn and its one pass in flight.

    The session feeds it each appended chunk (``heard``), asks it for a pass (``tick``) and takes the
    open turn at the commit (``take``). ``audio(start, end)`` gives the session's samples on its time
    line; ``delta(item, text)`` sends one delta. ``detector`` counts samples from ``origin``."""

    def __init__(self, state: BridgeState, interval: float, keywords: tuple[str, ...],
                 audio: Callable[[int, int], np.ndarray], delta: Delta, detector: PauseDetector | None,
                 origin: int) -> None:
        self.state = state
        self.interval = interval
        self.keywords = keywords
        self.audio = audio
        self.delta = delta
        self.detector = detector  # Silero with PAUSE_MS (bridge.realtime.TurnDetector), None without a VAD
        self.origin = origin  # the time line's position where the detector began counting
        self.key = state.scheduler.new_request()
        self.turn: LiveTurn | None = None
        self.task: asyncio.Task[None] | None = None
        self.speaking = False
        self.voice_end = -1  # end of the last speech the detector closed (time line)
        self.pause_at: int | None = None  # a pause that may close a segment
        self.next_tick = 0.0

    # ------------------------------------------------------------------ fed by the session

    def heard(self, samples: np.ndarray, received: int) -> None:
        """Follow the speech and its pauses in each appended chunk (``received``: the time line's end)."""
        if self.detector is None:
            self.speaking = True
            return
        for kind, _start, end in self.detector.feed(samples):
            if kind == "started":
                self.speaking = True
                continue
            self.speaking = False
            self.voice_end = self.origin + end
            self.pause_at = min(received, self.voice_end + PAUSE_MS * SAMPLE_RATE // 1000 // 2)  # its middle

    def tick(self, item: str | None, start: int, received: int, busy: bool) -> None:
        """Start a pass when one is due: the open turn's audio (from ``start`` on the time line) so
        far. ``busy``: the session's committed turns wait for the engine."""
        now = time.monotonic()
        if now < self.next_tick:
            return
        turn = self.turn
        anchor = turn.anchor if turn else start
        if not (self.speaking or self.voice_end > anchor) or received - anchor < MIN_NEW_SECONDS * SAMPLE_RATE:
            return  # nothing heard yet that a pass could use
        self.next_tick = now + self.interval
        metrics = self.state.metrics
        if self.task is not None and not self.task.done():
            metrics.live_passes.labels("skipped_in_flight").inc()
        elif busy or not self._engine_has_room():
            metrics.live_passes.labels("skipped_busy").inc()
        elif received - anchor > MAX_PASS_SECONDS * SAMPLE_RATE:
            metrics.live_passes.labels("skipped_long").inc()
        else:
            if turn is None:
                turn = self.turn = LiveTurn(item or f"item_{uuid.uuid4().hex[:20]}", start)
            metrics.live_passes.labels("run").inc()
            self.task = asyncio.create_task(self._pass(turn, self._closing(turn), received, now))

    def _engine_has_room(self) -> bool:
        """Nothing waits for the engine, and the work on it other than live passes (uploads,
        committed turns) leaves a connection free beside the one kept for newcomers: a pass then
        runs on cores no piece is using."""
        scheduler = self.state.scheduler
        others = scheduler.busy - self.state.live_passes
        return not scheduler.waiting and others < scheduler.connections - 1

    def _closing(self, turn: LiveTurn) -> int | None:
        """The pause that closes the turn's segment now, if there is one and the segment is long enough."""
        pause, self.pause_at = self.pause_at, None
        if pause is not None and pause - turn.anchor >= MIN_SEGMENT_SECONDS * SAMPLE_RATE:
            return pause
        return None

    async def take(self) -> LiveTurn | None:
        """The open turn at its commit; the pass in flight, if any, is dropped."""
        await self.stop()
        turn, self.turn = self.turn, None
        self.pause_at, self.next_tick = None, 0.0
        return turn

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            self.state.scheduler.cancel(self.key)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    # ------------------------------------------------------------------ one pass

    async def _pass(self, turn: LiveTurn, closing: int | None, received: int, heard_at: float) -> None:
        """One pass over the turn's audio past the anchor: up to the pause that closes a segment
        (its final text), or up to what has arrived (two such passes settle words)."""
        end = received if closing is None else closing
        self.state.live_passes += 1
        try:
            async with self.state.engines.lease() as engine:
                token_times = engine.spec.token_timestamps
                result = await self.state.scheduler.submit(self.key, engine, self.audio(turn.anchor, end),
                                                           self.keywords)
        except Exception as exc:  # noqa: BLE001 - a pass is a preview: the commit reports engine trouble
            log.info("live pass not run: %s", exc)
            return
        finally:
            self.state.live_passes -= 1
        self.state.metrics.live_pass_audio.inc((end - turn.anchor) / SAMPLE_RATE)
        log.debug("live pass %s %.2f-%.2f s: %r", "closing" if closing is not None else "open",
                  turn.anchor / SAMPLE_RATE, end / SAMPLE_RATE, result.text)
        if turn is not self.turn:
            return  # committed meanwhile
        if closing is not None:
            self.state.metrics.live_segments.labels("pause").inc()
            new = turn.close_segment(result.text, scored_tokens(result), end)
            await self._send(turn, new, heard_at, past_anchor=False)
            return
        lag_from = turn.previous_at or heard_at
        new, settled = turn.settle(result.text.split(), heard_at)
        await self._send(turn, new, lag_from, past_anchor=True)
        cut = stable_cut(result, settled, MIN_SEGMENT_SECONDS) if token_times else None
        if cut is not None:
            log.debug("live segment cut by token times at %.2f s", turn.anchor / SAMPLE_RATE + cut.seconds)
            self.state.metrics.live_segments.labels("token_times").inc()
            await self._send(turn, turn.cut(result, cut), lag_from, past_anchor=False)

    async def _send(self, turn: LiveTurn, words: list[str], lag_from: float, *, past_anchor: bool) -> None:
        """One delta with ``words``, if any (the lag measured from ``lag_from``)."""
        if not words:
            return
        self.state.metrics.live_lag.observe(time.monotonic() - lag_from)
        text = turn.record(words, past_anchor=past_anchor)
        await asyncio.shield(self.delta(turn.item, text))  # never cut off halfway
