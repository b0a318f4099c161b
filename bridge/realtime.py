"""Live dictation: one OpenAI realtime transcription session (``/v1/realtime?intent=transcription``).

The client streams 24 kHz pcm16 (or 8 kHz G.711 mu-law/A-law) in ``input_audio_buffer.append``
events. The audio is decoded and resampled to 16 kHz as it comes (FFmpeg's decoders and resampler
through PyAV, stateful across chunks) and kept in a buffer
that never holds more than ``REALTIME_MAX_BUFFER_SECONDS`` of uncommitted audio. With server VAD
(the default) a Silero detector of the session's own follows the audio: ``speech_started`` when
speech begins (its start moved back by the prefix padding), and when it has been silent for
``silence_duration_ms``, ``speech_stopped`` and ``committed``: that turn goes to the engine. With
``turn_detection: null`` the client commits by hand. Turns are transcribed one after another, each
like an upload (long turns cut at pauses, pieces through the fair scheduler) with a ``delta`` per
piece and a ``completed`` with the turn's usage: the audio consumed since the turn before, so the
turns of a session add up to the audio it sent (what followed the last turn aside). With
``include: ["item.input_audio_transcription.logprobs"]`` both carry the tokens' log-probabilities.

The transport (the WebSocket route) hands in client events with ``handle`` and sends what ``emit``
gives it. The wire contract is in ``../shared/notes/REALTIME.md``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bridge.api_types import valid_keywords, valid_languages
from bridge.decoding.stream import AudioStream
from bridge.languages import languages_heard
from bridge.live_text import (
    DELAYS,
    LIVE_MODELS,
    MAX_SEGMENT_SECONDS,
    PAUSE_MS,
    LiveText,
    LiveTurn,
    continuation,
    default_delay,
)
from bridge.ports import SAMPLE_RATE, EngineRejected, EngineUnavailable
from bridge.request_checks import check_language, check_languages, check_model
from bridge.state import BridgeState
from bridge.tokens import logprob_entries
from bridge.transcription import DeltaText, Prefetch, cut_pieces, iter_pieces, piece_deltas
from common.errors import APIError

log = logging.getLogger("bridge.realtime")

INPUT_RATE = 24000  # pcm16 as OpenAI defines it for realtime sessions
G711_RATE = 8000
# Input formats: ours -> (GA type, beta name, FFmpeg decoder or None for raw pcm16, sample rate).
INPUT_FORMATS = {
    "pcm16": ("audio/pcm", "pcm16", None, INPUT_RATE),
    "pcmu": ("audio/pcmu", "g711_ulaw", "pcm_mulaw", G711_RATE),
    "pcma": ("audio/pcma", "g711_alaw", "pcm_alaw", G711_RATE),
}
LOGPROBS_INCLUDE = "item.input_audio_transcription.logprobs"
MIN_COMMIT_SECONDS = 0.1
# Speech this long starts a turn. A quick one-word answer ("Yes.", "No.") has 0.15-0.3 s of voice;
# at 0.25 s (Silero's usual minimum) such answers never became turns and were dropped with the
# silence around them. Noise bursts and clicks still start none (tests/test_realtime.py).
TURN_MIN_SPEECH_SECONDS = 0.1
TRANSCRIPTION_SESSION = "realtime.transcription_session"
TRANSCRIPTION_PARAM = "session.audio.input.transcription"

Emit = Callable[[dict[str, Any]], Awaitable[None]]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeError(Exception):
    """An ``error`` event for the client; the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.type = code, message, param, type


@dataclass
class TurnDetection:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def as_dict(self) -> dict[str, Any]:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms}


@dataclass
class SessionConfig:
    model: str = ""
    language: str = ""
    prompt: str = ""
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    input_format: str = "pcm16"  # a key of INPUT_FORMATS
    logprobs: bool = False  # include: item.input_audio_transcription.logprobs
    keywords: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    delay: str | None = None  # a key of bridge.live_text.DELAYS: live text at that pace
    default_delay: str = "medium"  # the pace of live text asked for by the model's name alone (provider)

    @property
    def live(self) -> bool:
        """Live text: asked for by the model's name, or by a ``delay`` (any model, any turn detection)."""
        return self.model in LIVE_MODELS or self.delay is not None

    def as_session(self, session_id: str, beta: bool) -> dict[str, Any]:
        transcription: dict[str, Any] = {"model": self.model, "language": self.language, "prompt": self.prompt}
        if self.keywords:
            transcription["keywords"] = self.keywords
        if self.languages:
            transcription["languages"] = self.languages
        if self.live:
            transcription["delay"] = self.delay or self.default_delay
        detection = self.turn_detection.as_dict() if self.turn_detection else None
        ga_type, beta_name, _, rate = INPUT_FORMATS[self.input_format]
        include = [LOGPROBS_INCLUDE] if self.logprobs else None
        if beta:
            return {"id": session_id, "object": TRANSCRIPTION_SESSION, "input_audio_format": beta_name,
                    "input_audio_transcription": transcription, "turn_detection": detection,
                    "input_audio_noise_reduction": None, "include": include}
        return {"type": "transcription", "id": session_id, "object": TRANSCRIPTION_SESSION, "include": include,
                "audio": {"input": {"format": {"type": ga_type, "rate": rate},
                                    "transcription": transcription, "noise_reduction": None,
                                    "turn_detection": detection}}}


def input_format(value: Any) -> str:
    """The session's input format from a GA ``{"type", "rate"}`` object or a beta name."""
    if isinstance(value, dict):
        kind, rate = value.get("type"), value.get("rate")
        for name, (ga_type, _, _, native) in INPUT_FORMATS.items():
            if kind == ga_type and rate in (None, native):
                return name
    else:
        for name, (_, beta_name, _, _) in INPUT_FORMATS.items():
            if value == beta_name:
                return name
    raise RealtimeError("unsupported_format", f"input audio format {value!r} is not supported: send audio/pcm "
                        "(pcm16) at 24000 Hz, or audio/pcmu / audio/pcma (g711_ulaw / g711_alaw) at 8000 Hz",
                        "session.audio.input.format")


class Resampler:
    """The session's input bytes in, 16 kHz float32 out, across chunks: 24 kHz pcm16 (an odd byte
    waits for its pair) or 8 kHz G.711, decoded by FFmpeg's own decoders."""

    def __init__(self, fmt: str = "pcm16") -> None:
        import av

        self._av = av
        _, _, codec, self.rate = INPUT_FORMATS[fmt]
        self._decoder: Any = None
        if codec is not None:
            decoder = av.CodecContext.create(codec, "r")
            assert isinstance(decoder, av.AudioCodecContext)
            decoder.sample_rate = self.rate
            decoder.layout = "mono"  # type: ignore[assignment]
            self._decoder = decoder
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._odd = b""

    def _frames(self, data: bytes) -> list[Any]:
        if self._decoder is not None:  # one byte per sample
            return list(self._decoder.decode(self._av.Packet(data))) if data else []
        data = self._odd + data
        cut = len(data) - len(data) % 2
        self._odd = data[cut:]
        if not cut:
            return []
        samples = np.frombuffer(data[:cut], dtype="<i2").reshape(1, -1)
        frame = self._av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.rate
        return [frame]

    def feed(self, data: bytes) -> np.ndarray:
        out = [f.to_ndarray().reshape(-1) for frame in self._frames(data) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, dtype=np.float32)


class TurnDetector:
    """Silero through sherpa-onnx, fed one window at a time, for one session."""

    def __init__(self, model: str, config: TurnDetection, max_speech: float) -> None:
        import sherpa_onnx

        cfg = sherpa_onnx.VadModelConfig()
        cfg.silero_vad.model = model
        cfg.silero_vad.threshold = config.threshold
        cfg.silero_vad.min_silence_duration = config.silence_duration_ms / 1000
        cfg.silero_vad.min_speech_duration = TURN_MIN_SPEECH_SECONDS
        cfg.silero_vad.max_speech_duration = max_speech
        cfg.sample_rate = SAMPLE_RATE
        cfg.num_threads = 1
        self.window = int(cfg.silero_vad.window_size)
        self.vad = sherpa_onnx.VoiceActivityDetector(cfg, buffer_size_in_seconds=max_speech + 5)
        self._carry = np.zeros(0, dtype=np.float32)
        self._speaking = False

    def feed(self, samples: np.ndarray) -> list[tuple[str, int, int]]:
        """Events in order: ("started", start sample, 0) when speech begins and ("stopped", start,
        end) for each segment the silence closed (sample counts since this detector began)."""
        data = np.concatenate([self._carry, samples]) if len(self._carry) else samples
        events: list[tuple[str, int, int]] = []
        full = len(data) - len(data) % self.window
        for offset in range(0, full, self.window):
            self.vad.accept_waveform(data[offset:offset + self.window])
            speaking = self.vad.is_speech_detected()
            if speaking and not self._speaking:
                events.append(("started", self._current_start(), 0))
            self._speaking = speaking
            while not self.vad.empty():
                seg = self.vad.front
                start = int(seg.start)
                events.append(("stopped", start, start + len(seg.samples)))
                self.vad.pop()
        self._carry = data[full:].copy()
        return events

    def _current_start(self) -> int:
        try:
            return int(self.vad.current_segment.start)
        except (AttributeError, RuntimeError):
            return 0


@dataclass
class Turn:
    """A committed turn on its way to the engine."""

    item: str
    samples: np.ndarray  # with live text: only what was not settled before the commit
    charged: float  # seconds of the session's audio this turn is charged for
    live: LiveTurn | None = None  # what live text settled and sent of it


class RealtimeSession:
    def __init__(self, state: BridgeState, emit: Emit, *, beta: bool = False) -> None:
        self.state = state
        self.settings = state.settings
        self.emit = emit
        self.beta = beta
        self.id = new_id("sess")
        self.config = SessionConfig(default_delay=default_delay(self.settings.sherpa_provider))
        self.resampler = Resampler()
        self.detector: TurnDetector | None = None
        self.detector_origin = 0  # where on the time line the detector began counting
        self.received = 0  # 16 kHz samples appended so far (the session's time line)
        self.buffer = np.zeros(0, dtype=np.float32)
        self.buffer_start = 0  # time-line position of buffer[0]
        self.consumed = 0  # end of what earlier turns were charged for
        self.speech_item: str | None = None  # the turn the VAD has opened
        self.previous_item: str | None = None
        self.live: LiveText | None = None  # live text (gpt-live-transcribe, or a delay asked for)
        self.turns: asyncio.Queue[Turn | None] = asyncio.Queue()
        self.worker = asyncio.create_task(self._transcribe_turns())
        self.audio_seconds = 0.0
        self.completed = 0
        self.started = time.monotonic()
        self._reset_detector()

    # ------------------------------------------------------------------ client events

    async def start(self) -> None:
        kind = "transcription_session.created" if self.beta else "session.created"
        await self.send(kind, session=self.config.as_session(self.id, self.beta))

    async def handle(self, event: Any) -> None:
        event_id = event.get("event_id") if isinstance(event, dict) else None
        try:
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise RealtimeError("invalid_event", "an event is a JSON object with a string \"type\"")
            kind = event["type"]
            if kind in ("session.update", "transcription_session.update"):
                await self._update(event.get("session"), beta=kind.startswith("transcription_session"))
            elif kind == "input_audio_buffer.append":
                await self._append(event.get("audio"))
            elif kind == "input_audio_buffer.commit":
                await self._commit_by_client()
            elif kind == "input_audio_buffer.clear":
                await self._clear()
                await self.send("input_audio_buffer.cleared")
            else:
                raise RealtimeError("unknown_event", f"unknown or unsupported event type {kind!r}", "type")
        except RealtimeError as exc:
            await self.error(exc, event_id)

    async def error(self, exc: RealtimeError, event_id: Any = None) -> None:
        await self.send("error", error={"type": exc.type, "code": exc.code, "message": exc.message,
                                        "param": exc.param, "event_id": event_id})

    async def send(self, kind: str, **fields: Any) -> None:
        await self.emit({"type": kind, "event_id": new_id("event"), **fields})

    async def _update(self, session: Any, *, beta: bool) -> None:
        if not isinstance(session, dict):
            raise RealtimeError("invalid_value", "session must be an object", "session")
        if beta:
            fmt = session.get("input_audio_format")
            transcription = session.get("input_audio_transcription")
            has_detection, detection = "turn_detection" in session, session.get("turn_detection")
        else:
            audio_in = (session.get("audio") or {}).get("input") or {}
            fmt = audio_in.get("format")
            transcription = audio_in.get("transcription")
            has_detection, detection = "turn_detection" in audio_in, audio_in.get("turn_detection")
        config = dataclasses.replace(self.config)
        if fmt is not None:
            config.input_format = input_format(fmt)
        if "include" in session:
            config.logprobs = self._include(session.get("include"))
        if isinstance(transcription, dict):
            self._transcription(config, transcription)
        if has_detection:
            config.turn_detection = self._turn_detection(detection)
        changed = config.turn_detection != self.config.turn_detection
        if config.input_format != self.config.input_format:
            self.resampler = Resampler(config.input_format)
        self.config = config
        if changed:
            self._reset_detector()
        kind = "transcription_session.updated" if beta else "session.updated"
        await self.send(kind, session=self.config.as_session(self.id, beta))
        await self._follow_live_setting()

    def _transcription(self, config: SessionConfig, transcription: dict[str, Any]) -> None:
        """``audio.input.transcription``: model, language, prompt, keywords, languages, delay (all
        replaced by an update that holds the object)."""
        config.model = str(transcription.get("model") or "")
        config.language = str(transcription.get("language") or "")
        config.prompt = str(transcription.get("prompt") or "")
        try:
            config.keywords = valid_keywords(self._strings(transcription, "keywords"))
            config.languages = valid_languages(self._strings(transcription, "languages"))
        except APIError as exc:
            raise RealtimeError(exc.code or "invalid_value", exc.message,
                                f"{TRANSCRIPTION_PARAM}.{(exc.param or '').replace('[]', '')}") from None
        delay = transcription.get("delay")
        if delay is not None and delay not in DELAYS:
            raise RealtimeError("invalid_value", f"delay must be one of {', '.join(DELAYS)} (or null)",
                                f"{TRANSCRIPTION_PARAM}.delay")
        config.delay = delay
        self._check_model(config)

    @staticmethod
    def _strings(transcription: dict[str, Any], name: str) -> list[str]:
        values = transcription.get(name) or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise RealtimeError("invalid_value", f"{name} must be a list of strings", f"{TRANSCRIPTION_PARAM}.{name}")
        return values

    def _check_model(self, config: SessionConfig) -> None:
        """The session's model, language and languages, checked as an upload's are
        (``bridge.request_checks``); speakers are for uploads only."""
        loaded = self.state.engines.model
        if loaded is None:
            return
        if config.model in self.settings.diarize_aliases:
            raise RealtimeError("model_not_loaded", f"model {config.model!r} finds speakers in uploads only; live "
                                f"sessions use the loaded model {loaded.id!r} (or one of its aliases)",
                                f"{TRANSCRIPTION_PARAM}.model")
        try:
            check_model(config.model, loaded, self.state)
            check_language(config.language or None, loaded)
            check_languages(config.languages, loaded, self.state)
        except APIError as exc:
            raise RealtimeError(exc.code or "invalid_value", exc.message,
                                f"{TRANSCRIPTION_PARAM}.{(exc.param or 'model').replace('[]', '')}") from None

    async def _follow_live_setting(self) -> None:
        """Start or end live text as the session's settings now ask; a full bridge says so and
        gives the turns' text at their commit."""
        if not self.config.live:
            await self._end_live()
            return
        interval = DELAYS[self.config.delay or self.config.default_delay]
        if self.live is not None:
            self.live.interval, self.live.keywords = interval, self._keywords()
            return
        if self.state.live_sessions >= self.settings.realtime_live_sessions:
            await self.error(RealtimeError("live_text_unavailable", "live text is not available: "
                                           f"{self.settings.realtime_live_sessions} sessions have it already "
                                           "(REALTIME_LIVE_SESSIONS); each turn's text comes at its commit",
                                           f"{TRANSCRIPTION_PARAM}.model", type="server_error"))
            return
        self.state.live_sessions += 1
        detector = self.state.detector
        pauses = (TurnDetector(str(detector.model), TurnDetection(0.5, 0, PAUSE_MS), MAX_SEGMENT_SECONDS)
                  if detector is not None else None)
        self.live = LiveText(self.state, interval, self._keywords(), self._samples, self._delta, pauses,
                             self.received)

    async def _end_live(self) -> None:
        live, self.live = self.live, None
        if live is not None:
            await live.stop()
            self.state.live_sessions -= 1

    def _keywords(self) -> tuple[str, ...]:
        loaded = self.state.engines.model
        return tuple(self.config.keywords) if loaded is not None and loaded.keywords else ()

    def _samples(self, start: int, end: int) -> np.ndarray:
        """The buffered audio between two time-line positions (a copy: the buffer moves on)."""
        return self.buffer[max(0, start - self.buffer_start):max(0, end - self.buffer_start)].copy()

    async def _delta(self, item: str, text: str, **extra: Any) -> None:
        """One ``delta`` event: ``text`` appended to the turn's text so far."""
        await self.send("conversation.item.input_audio_transcription.delta", item_id=item, content_index=0,
                        delta=text, **extra)

    def _include(self, value: Any) -> bool:
        if value is None:
            return False
        if not isinstance(value, list) or any(v != LOGPROBS_INCLUDE for v in value):
            raise RealtimeError("invalid_value", f"include may hold only {LOGPROBS_INCLUDE!r}", "session.include")
        loaded = self.state.engines.model
        if value and loaded is not None and not loaded.token_logprobs:
            raise RealtimeError("unsupported_include", f"model {loaded.id} gives no token log-probabilities",
                                "session.include")
        return bool(value)

    @staticmethod
    def _turn_detection(value: Any) -> TurnDetection | None:
        if value is None:
            return None
        if not isinstance(value, dict) or value.get("type", "server_vad") not in ("server_vad", "semantic_vad"):
            raise RealtimeError("invalid_value", "turn_detection must be null or {\"type\": \"server_vad\", ...}",
                                "turn_detection")
        try:
            detection = TurnDetection(float(value.get("threshold", 0.5)), int(value.get("prefix_padding_ms", 300)),
                                      int(value.get("silence_duration_ms", 500)))
        except (TypeError, ValueError):
            raise RealtimeError("invalid_value", "turn_detection values must be numbers", "turn_detection") from None
        if not (0 < detection.threshold < 1 and 0 <= detection.prefix_padding_ms <= 2000
                and 100 <= detection.silence_duration_ms <= 10000):
            raise RealtimeError("invalid_value", "turn_detection: threshold in (0, 1), prefix_padding_ms in "
                                "[0, 2000], silence_duration_ms in [100, 10000]", "turn_detection")
        return detection

    def _reset_detector(self) -> None:
        detection = self.config.turn_detection
        detector = self.state.detector
        self.detector = None
        if detection is not None and detector is not None:
            self.detector = TurnDetector(str(detector.model), detection, self.settings.realtime_max_buffer_seconds)
            self.detector_origin = self.received  # the detector counts samples from here

    async def _append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise RealtimeError("invalid_value", "audio must be a base64 string of the session's input format",
                                "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("invalid_value", "audio is not valid base64", "audio") from None
        samples = self.resampler.feed(pcm)
        if not len(samples):
            return
        self.buffer = np.concatenate([self.buffer, samples])
        self.received += len(samples)
        if self.live is not None:
            self.live.heard(samples, self.received)
        if self.detector is not None:
            for kind, start, end in self.detector.feed(samples):
                if kind == "started":
                    await self._speech_started(self.detector_origin + start)
                else:
                    await self._speech_stopped(self.detector_origin + end)
            if self.speech_item is None:
                self._keep_tail(self._padding())
        limit = int(self.settings.realtime_max_buffer_seconds * SAMPLE_RATE)
        if len(self.buffer) > limit:  # a turn this long is committed as it stands
            await self._commit(self.received, self.speech_item)
        elif self.live is not None and (self.detector is None or self.speech_item is not None):
            self.live.tick(self.speech_item, self.buffer_start, self.received, busy=not self.turns.empty())

    def _padding(self) -> int:
        detection = self.config.turn_detection
        return int((detection.prefix_padding_ms if detection else 0) * SAMPLE_RATE / 1000)

    def _keep_tail(self, samples: int) -> None:
        """Outside a turn only the prefix padding is kept."""
        drop = len(self.buffer) - samples
        if drop > 0:
            self.buffer = self.buffer[drop:]
            self.buffer_start += drop

    async def _speech_started(self, position: int) -> None:
        if self.speech_item is not None:
            return
        self.speech_item = new_id("item")
        start = max(self.buffer_start, position - self._padding())
        self._keep_tail(self.received - start)
        await self.send("input_audio_buffer.speech_started", audio_start_ms=int(start * 1000 / SAMPLE_RATE),
                        item_id=self.speech_item)

    async def _speech_stopped(self, position: int) -> None:
        item = self.speech_item or new_id("item")
        if self.speech_item is None:
            await self._speech_started(position)
        end = min(self.received, position + SAMPLE_RATE // 10)  # a little tail, as for uploads
        await self.send("input_audio_buffer.speech_stopped", audio_end_ms=int(end * 1000 / SAMPLE_RATE),
                        item_id=item)
        await self._commit(end, item)

    async def _commit_by_client(self) -> None:
        if len(self.buffer) < MIN_COMMIT_SECONDS * SAMPLE_RATE:
            raise RealtimeError("input_audio_buffer_commit_empty", "buffer too small: at least 100 ms of audio "
                                f"must be appended before a commit ({len(self.buffer) / SAMPLE_RATE * 1000:.0f} ms "
                                "buffered)")
        await self._commit(self.received, self.speech_item)
        self._reset_detector()

    async def _commit(self, end: int, item: str | None) -> None:
        live = await self.live.take() if self.live is not None else None
        item = live.item if live is not None else item or new_id("item")
        cut = max(0, end - self.buffer_start)
        first = max(0, live.anchor - self.buffer_start) if live is not None else 0  # live text settled before
        samples, self.buffer = self.buffer[first:cut].copy(), self.buffer[cut:]
        self.buffer_start += cut
        charged = max(0, end - self.consumed) / SAMPLE_RATE
        self.consumed = max(self.consumed, end)
        self.speech_item = None
        await self.send("input_audio_buffer.committed", item_id=item, previous_item_id=self.previous_item)
        self.previous_item = item
        self.turns.put_nowait(Turn(item, samples, charged, live))

    async def _clear(self) -> None:
        if self.live is not None:
            await self.live.take()  # its deltas stand; the turn gets no completed
        self.buffer = np.zeros(0, dtype=np.float32)
        self.buffer_start = self.received
        self.consumed = self.received  # cleared audio is not charged
        self.speech_item = None
        self._reset_detector()

    # ------------------------------------------------------------------ turns

    async def _transcribe_turns(self) -> None:
        while True:
            turn = await self.turns.get()
            if turn is None:
                return
            await self._complete(turn)

    async def _complete(self, turn: Turn) -> None:
        """A committed turn's text: its ``delta`` events (the rest of what live text sent, or a
        delta per piece), then ``completed`` with the whole turn, or ``failed``."""
        try:
            text, scored = await self._transcribe(turn.item, turn.samples, deltas=turn.live is None)
        except (EngineUnavailable, EngineRejected) as exc:
            await self.send("conversation.item.input_audio_transcription.failed", item_id=turn.item, content_index=0,
                            error={"type": "server_error", "code": "engine_unavailable"
                                   if isinstance(exc, EngineUnavailable) else "engine_error", "message": str(exc)})
            return
        if turn.live is not None:
            log.debug("turn %s: tail %r after %r (sent past the anchor: %r)", turn.item, text, turn.live.finals,
                      turn.live.sent_after_anchor)
            rest, _ = continuation(turn.live.sent_after_anchor, text.split())
            if rest:
                await self._delta(turn.item, turn.live.record(rest, past_anchor=False))
            text, scored = turn.live.transcript(text), turn.live.scored + scored
        self.audio_seconds += turn.charged
        self.completed += 1
        extra: dict[str, Any] = {"logprobs": logprob_entries(scored)} if self.config.logprobs else {}
        loaded = self.state.engines.model
        if loaded is not None:
            extra["languages"] = await languages_heard(text, loaded.languages)
        await self.send("conversation.item.input_audio_transcription.completed", item_id=turn.item, content_index=0,
                        transcript=text, usage={"type": "duration", "seconds": round(turn.charged, 3)}, **extra)

    async def _transcribe(self, item: str, samples: np.ndarray, *,
                          deltas: bool = True) -> tuple[str, list[tuple[str, float]]]:
        """The turn's text (with ``deltas``, a ``delta`` per piece) and its tokens' log-probabilities."""
        state = self.state
        sent = DeltaText()
        if not len(samples):
            return "", []
        async with state.engines.lease() as engine:
            audio = AudioStream.from_samples(samples)
            plan = cut_pieces(audio, engine.spec.max_piece_seconds, state.live_detector,
                              state.settings.piece_target_seconds, state.settings.stream_first_piece_seconds or None,
                              vad_threads=1)
            pieces = Prefetch(iter_pieces(state.scheduler, engine, audio, plan, state.guard,
                                          keywords=self._keywords()))
            try:
                async for delta, scored in piece_deltas(pieces, sent, self.config.logprobs):
                    if deltas:
                        await self._delta(item, delta, **({"logprobs": logprob_entries(scored)}
                                                           if self.config.logprobs else {}))
            finally:
                await pieces.aclose()
        return sent.text, sent.scored

    async def finish(self, *, wait: bool) -> None:
        """End the session: with ``wait``, the turns already committed are transcribed first."""
        await self._end_live()
        if wait:
            self.turns.put_nowait(None)
            with contextlib.suppress(Exception):
                await self.worker
        else:
            self.worker.cancel()
            with contextlib.suppress(BaseException):
                await self.worker
