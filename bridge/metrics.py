"""The bridge's Prometheus metrics (prometheus-client), served on BRIDGE_METRICS_PORT, not the API port.

Counters and histograms are updated where things happen (the access middleware, the transcription
route, model loads and switches); what the bridge already knows at any moment (engine ready and
restarts, pieces waiting and running, the speed check) is read when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.access import AccessRecord

ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/models", "/v1/models/switch",
          "/v1/models/{model_id}", "/health")

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
LAG_BUCKETS = (0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30)
RTF_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stt_bridge_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("stt_bridge_request_duration_seconds",
                                 "Time from request to the end of the response, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.audio_seconds = Counter("stt_bridge_audio_seconds", "Seconds of audio transcribed, by model",
                                     ["model"], registry=r)
        self.real_time_factor = Histogram(
            "stt_bridge_real_time_factor", "Processing time over audio duration per transcription, by model",
            ["model"], buckets=RTF_BUCKETS, registry=r)
        self.decode_seconds = Histogram("stt_bridge_decode_seconds", "Time to decode an upload to 16 kHz PCM",
                                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                        registry=r)
        self.model_load_seconds = Histogram("stt_bridge_model_load_seconds",
                                            "Time to start an engine with a model until it answered", ["model"],
                                            buckets=LOAD_BUCKETS, registry=r)
        self.model_switch_seconds = Histogram("stt_bridge_model_switch_seconds",
                                              "Time of a model switch, by the model switched to", ["model"],
                                              buckets=LOAD_BUCKETS, registry=r)

        self.live_passes = Counter("stt_bridge_live_passes", "Live-text passes over open turns, by outcome: run, "
                                   "skipped_busy (the engine had work waiting), skipped_in_flight (the session's "
                                   "pass still ran), skipped_long (the turn's open part is past 30 s)",
                                   ["outcome"], registry=r)
        self.live_pass_audio = Counter("stt_bridge_live_pass_audio_seconds", "Live text: seconds of audio the "
                                       "passes sent to the engine (what live text costs it beside the turns)",
                                       registry=r)
        self.live_segments = Counter("stt_bridge_live_segments", "Live text: segments of open turns made final "
                                     "before the commit, by how they were cut: pause (a pass up to a pause), "
                                     "token_times (after agreed words, by the engine's token times)",
                                     ["by"], registry=r)
        self.live_lag = Histogram("stt_bridge_live_text_lag_seconds", "Live text: from the arrival of the audio "
                                  "that settled a delta's words to the delta", buckets=LAG_BUCKETS, registry=r)

    def observe_request(self, record: AccessRecord) -> None:
        self.requests.labels(record.route, str(record.status)).inc()
        self.latency.labels(record.route).observe(record.seconds)

    def observe_transcription(self, model: str, audio_seconds: float, processing_seconds: float) -> None:
        self.audio_seconds.labels(model).inc(audio_seconds)
        if audio_seconds > 0:
            self.real_time_factor.labels(model).observe(processing_seconds / audio_seconds)

    def watch(self, state: Callable[[], Any]) -> None:
        """Report what ``state()`` (the ``BridgeState``, which holds these metrics: not imported here,
        no import circle) knows at each scrape (None before the lifespan built it)."""
        self.registry.register(_StateCollector(state))


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], Any]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        if state is None:
            return
        health = state.engines.health()
        model = state.engines.model
        ready = GaugeMetricFamily("stt_bridge_engine_ready", "1 when the engine answers, by loaded model",
                                  labels=["model"])
        ready.add_metric([model.id if model else ""], 1.0 if health.ready else 0.0)
        yield ready
        restarts = CounterMetricFamily("stt_bridge_engine_restarts", "Engine child processes restarted after "
                                       "dying, all models together")
        restarts.add_metric([], state.engines.restarts_retired + health.restarts)
        yield restarts
        yield GaugeMetricFamily("stt_bridge_requests_in_flight", "Transcription requests being handled",
                                value=state.in_flight)
        yield GaugeMetricFamily("stt_bridge_live_text_sessions", "Live sessions getting live text now",
                                value=state.live_sessions)
        yield GaugeMetricFamily("stt_bridge_pieces_waiting", "Audio pieces queued for the engine",
                                value=state.scheduler.waiting)
        yield GaugeMetricFamily("stt_bridge_pieces_running", "Audio pieces on the engine's connections now",
                                value=state.scheduler.busy)
        replaced = CounterMetricFamily("stt_bridge_decoder_workers_replaced",
                                       "Decoder worker processes replaced after dying or hanging")
        replaced.add_metric([], state.decoders.replaced if state.decoders else 0)
        yield replaced
        guard = state.guard
        if guard is not None:
            failed = CounterMetricFamily("stt_bridge_piece_checks_failed", "Pieces whose text failed a check "
                                         "(empty, too_long, repetitive), retries included", labels=["reason"])
            for reason in ("empty", "too_long", "repetitive"):
                failed.add_metric([reason], guard.failed[reason])
            yield failed
            for name, text, value in (
                    ("stt_bridge_pieces_retried", "Pieces transcribed again in halves", guard.retried),
                    ("stt_bridge_pieces_retry_kept", "Retried pieces whose halves were kept", guard.improved),
                    ("stt_bridge_pieces_unreliable", "Pieces that still fail a check, kept with flags",
                     guard.unreliable)):
                family = CounterMetricFamily(name, text)
                family.add_metric([], value)
                yield family
        speed = state.engines.speed
        if speed is not None and model is not None:
            figure = GaugeMetricFamily("stt_bridge_speed_check_real_time_factor",
                                       "Real-time factor of the start-up speed check, by model", labels=["model"])
            figure.add_metric([model.id], speed.real_time_factor)
            yield figure
