"""Bridge settings: read once from the environment through pydantic-settings.

Every setting is an environment variable of the same name in upper case. A bad value stops the
start with a message that names the variable (see ``load_settings``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import CommaList, SettingsError, apart_from_port, format_validation_error, split_comma_list

AdapterName = Literal["managed-websocket", "websocket", "subprocess"]  # ENGINE_ADAPTER (bridge.models.engine_factory)


class BridgeSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    # Serving
    bridge_host: str = "0.0.0.0"
    bridge_port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    header_read_timeout: float = Field(10.0, ge=0)  # seconds to send a request's head (closed after); 0 = none
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line
    # Prometheus metrics at http://BRIDGE_METRICS_HOST:BRIDGE_METRICS_PORT/metrics, never on the API
    # port; 0 = off. The host defaults to BRIDGE_HOST.
    bridge_metrics_port: int = Field(8001, ge=0, le=65535)
    bridge_metrics_host: str = ""
    # The engine child's own output: its per-connection lines and the noise of a clean stop are at
    # debug; warnings and errors show at the default.
    engine_log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Model and engine
    default_model: str = "moonshine-base-en"
    models_dir: Path = Path("./models")
    catalog_file: Path | None = None  # JSON list of extra catalog entries (tests, custom exports)
    engine_adapter: AdapterName = "managed-websocket"
    engine_url: str = ""  # for ENGINE_ADAPTER=websocket, e.g. ws://engine:6006
    engine_binary_dir: Path | None = None  # where sherpa-onnx binaries live; default: PATH
    sherpa_provider: Literal["cpu", "cuda"] = "cpu"
    # 0 = auto, resolved from the provider and the usable cores (see ``_resolve_auto_tuning``).
    sherpa_num_threads: int = Field(0, ge=0, le=256)  # threads per model run
    sherpa_max_utterance: float = Field(600.0, gt=0, le=24 * 3600)
    sherpa_max_batch_size: int = Field(8, ge=1, le=1024)  # 1 for models whose engine does not batch
    sherpa_num_work_threads: int = Field(0, ge=0, le=256)  # engine threads that run decodes
    engine_connections: int = Field(0, ge=0, le=256)  # WebSocket connections = pieces in flight
    engine_request_timeout: float = Field(300.0, gt=0)
    engine_ready_timeout: float = Field(120.0, gt=0)  # model load time allowed (parakeet on GPU)
    engine_max_restarts: int = Field(5, ge=0)  # crash-loop budget within engine_restart_window
    engine_restart_window: float = Field(300.0, gt=0)
    # Before ready, each loaded engine transcribes a fixed utterance twice (warm-up, then timed);
    # on CUDA a real-time factor above speed_warn_rtf is called out in the log and /health.
    speed_check: bool = True
    speed_warn_rtf: float = Field(0.05, gt=0)

    # Cutting long audio
    vad_model: Path | None = None  # Silero VAD ONNX; default: from the silero-vad package's data
    vad_threads: int = Field(0, ge=0, le=64)  # regions of a long file scanned side by side (one model run); 0 = 16
    vad_sample_rate: int = 8000  # what Silero runs at: 8000 or 16000 (8000: half the CPU, cuts in the same pauses)
    piece_target_seconds: float | None = Field(None, gt=1)  # merge speech up to this; default: model's safe length

    # Checking each piece's text, and transcribing failed pieces again in halves (bridge.guard).
    guard_pieces: bool = True
    guard_max_words_per_second: float = Field(5.0, gt=0)
    guard_max_compression_ratio: float = Field(2.4, gt=1)
    guard_min_words_per_speech_second: float = Field(0.3, ge=0)
    guard_min_piece_seconds: float = Field(3.0, ge=0.5)

    # Requests
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    # Decoding: "pyav" = FFmpeg's libraries in decoder workers started once (bridge.decoding.pyav_decoder);
    # "ffmpeg" = one ffmpeg process per request (bridge.decoding.ffmpeg). Same protections, same output.
    audio_decoder: Literal["pyav", "ffmpeg"] = "pyav"
    decoder_workers: int = Field(0, ge=0, le=64)  # 0 = auto: one per usable core
    decoder_memory_mb: int = Field(1024, ge=0)  # address-space cap of each decoder worker; 0 = none
    decode_timeout: float = Field(120.0, gt=0, validation_alias=AliasChoices("decode_timeout", "ffmpeg_timeout"))
    ffmpeg_binary: str = ""  # default: ffmpeg on PATH, else the imageio-ffmpeg wheel's
    # With stream=true the first piece closes at the first pause after this many seconds, and each
    # next one may be twice as long until the model's safe length: the first text comes early. 0 = off.
    stream_first_piece_seconds: float = Field(2.0, ge=0)
    max_concurrent_requests: int = Field(32, ge=1)  # beyond this: 503 with Retry-After
    # Names that mean "the loaded model": OpenAI's current name first, then the ones it shuts down on
    # 2027-02-26 (they keep working here).
    model_aliases: CommaList = ["gpt-transcribe", "gpt-live-transcribe", "whisper-1", "gpt-4o-transcribe",
                                 "gpt-4o-mini-transcribe"]
    # Keywords (``keywords[]``) on models that can use them (transducers: parakeet): how much each
    # keyword's tokens are boosted in the beam search (sherpa-onnx's hotwords score), and whether the
    # bridge may load its in-process keyword decoder at all (a second copy of the model, on the CPU).
    keywords_score: float = Field(1.5, gt=0, le=20)
    keywords_enabled: bool = True
    # Speaker diarization: these model names ask for it (on the loaded model); its two models (catalog
    # ids); the clustering threshold (cosine distance: lower splits speakers more readily); how
    # similar a speaker must be to a known speaker's reference to get their name (cosine).
    diarize_aliases: CommaList = ["gpt-4o-transcribe-diarize"]
    diarization_segmentation_model: str = "pyannote-segmentation-3.0"
    diarization_embedding_model: str = "3dspeaker-campplus-en-voxceleb"
    diarization_threshold: float = Field(0.5, gt=0, lt=2)
    # Recordings longer than this are diarized in windows of about this length (cut at pauses), their
    # speakers matched across windows by voice: memory stays that of one window.
    diarization_window_seconds: float = Field(600.0, ge=30)
    known_speaker_min_similarity: float = Field(0.5, ge=-1, le=1)
    switch_wait_timeout: float = Field(30.0, ge=0)

    # Live dictation (/v1/realtime): open sessions, their length, how long one may stay silent (no
    # event from the client), and the most uncommitted audio held (a longer turn is committed as
    # it stands).
    realtime_max_sessions: int = Field(32, ge=0)
    realtime_max_session_seconds: float = Field(3600.0, gt=0)
    realtime_idle_seconds: float = Field(60.0, gt=0)
    realtime_max_buffer_seconds: float = Field(120.0, ge=1, le=600)
    # Sessions that get live text (words while the person talks, bridge.live_text) at once: each
    # costs the engine a pass over its open turn every `delay`.
    realtime_live_sessions: int = Field(8, ge=0)

    _split = field_validator("model_aliases", "diarize_aliases", mode="before")(split_comma_list)

    _metrics_apart = field_validator("bridge_metrics_port")(apart_from_port("bridge_port"))

    @model_validator(mode="after")
    def _resolve_auto_tuning(self) -> BridgeSettings:
        """Fill the engine tuning left at 0.

        CPU: one thread per model run and one connection per usable core, plus one that the
        scheduler keeps for newcomers. Measured on 2 cores with Moonshine (bench/README.md): two
        one-thread pieces side by side finish 1.4-1.9x sooner than the same pieces one after
        another with two threads each, because a model run scales poorly over threads.
        Every connection needs a work thread of its own in the engine, or pieces queue there.
        CUDA: the settings the compose file always shipped (not yet measured on a GPU).
        """
        cuda = self.sherpa_provider == "cuda"
        if not self.sherpa_num_threads:
            self.sherpa_num_threads = 4 if cuda else 1
        if not self.engine_connections:
            self.engine_connections = 8 if cuda else usable_cores() + 1
        if not self.sherpa_num_work_threads:
            self.sherpa_num_work_threads = 3 if cuda else self.engine_connections
        if not self.decoder_workers:
            self.decoder_workers = usable_cores()
        if not self.vad_threads:
            # The regions go through the model together on one thread (bridge.vad): more regions
            # cost less CPU per second of audio, on a GPU host and beside a CPU engine alike.
            self.vad_threads = 16
        return self

    @field_validator("vad_sample_rate")
    @classmethod
    def _check_vad_rate(cls, value: int) -> int:
        if value not in (8000, 16000):
            raise ValueError("must be 8000 or 16000 (the rates Silero VAD runs at)")
        return value

    @field_validator("engine_url")
    @classmethod
    def _check_engine_url(cls, value: str) -> str:
        if value and not value.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return value


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, so a container's cpuset counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_settings(**overrides: object) -> BridgeSettings:
    try:
        settings = BridgeSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from exc
    if settings.engine_adapter == "websocket" and not settings.engine_url:
        raise SettingsError("invalid setting ENGINE_URL: required when ENGINE_ADAPTER=websocket")
    return settings
