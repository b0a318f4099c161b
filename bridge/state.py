"""Everything a request handler needs, built once in the app's lifespan and passed in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request

from bridge.config import BridgeSettings
from bridge.decoding.pyav_decoder import DecoderPool
from bridge.diarization import Diarizer
from bridge.guard import PieceGuard
from bridge.metrics import BridgeMetrics
from bridge.models.catalog import Catalog
from bridge.models.engine_manager import EngineManager
from bridge.models.model_store import ModelStore
from bridge.scheduler import FairScheduler
from bridge.vad import SpeechDetector


@dataclass
class BridgeState:
    settings: BridgeSettings
    catalog: Catalog
    store: ModelStore
    engines: EngineManager
    scheduler: FairScheduler
    metrics: BridgeMetrics
    detector: SpeechDetector | None = None
    # Live turns are cut with Silero at 16 kHz whatever VAD_SAMPLE_RATE says: a turn is short, so its
    # scan costs little, and on G.711 phone audio the 8 kHz scan's cuts cost words (tests/test_openai_fields.py).
    live_detector: SpeechDetector | None = None
    decoders: DecoderPool | None = None  # None: AUDIO_DECODER=ffmpeg, a process per request
    guard: PieceGuard | None = None  # None: GUARD_PIECES=false
    started_at: float = field(default_factory=time.monotonic)
    ready_after: float | None = None  # seconds from process start to first ready
    in_flight: int = 0
    realtime_sessions: int = 0
    live_sessions: int = 0  # realtime sessions with live text (REALTIME_LIVE_SESSIONS)
    live_passes: int = 0  # live-text passes on the engine now (bridge.live_text)
    diarizer: Diarizer | None = None  # made at the first request for speakers (bridge.speakers)


def get_state(request: Request) -> BridgeState:
    state: BridgeState = request.app.state.bridge
    return state
