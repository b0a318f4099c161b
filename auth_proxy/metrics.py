"""The proxy's Prometheus metrics (prometheus-client), served on AUTH_METRICS_PORT: a port of its own
that compose does not publish, so they never leave through the API port. Keys appear by name only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.access import AccessRecord

ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/models", "/v1/models/switch",
          "/v1/models/{model_id}", "/v1/usage", "/health")

NO_KEY = "-"  # the key label of requests without a valid key


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("stt_proxy_requests", "Requests answered, by route, status and key name",
                                ["route", "status", "key"], registry=r)
        self.latency = Histogram("stt_proxy_request_duration_seconds",
                                 "Time from request to the end of the response, by route", ["route"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
                                 registry=r)
        self.bytes_in = Counter("stt_proxy_request_bytes", "Request body bytes received, by key name", ["key"],
                                registry=r)
        self.audio_seconds = Counter("stt_proxy_audio_seconds", "Seconds of audio transcribed, by key name",
                                     ["key"], registry=r)
        self.usage_write_seconds = Histogram("stt_proxy_usage_write_seconds", "Time to record one request's usage",
                                             buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
                                             registry=r)
        self.usage_write_errors = Counter("stt_proxy_usage_write_errors", "Usage records that could not be written",
                                          registry=r)
        self.refused = Counter("stt_proxy_limit_refusals", "Requests refused by a limit, by key name and limit "
                               "(rpm, audio_quota, in_flight)", ["key", "limit"], registry=r)
        self.bridge_errors = Counter("stt_proxy_bridge_errors", "Failures talking to the bridge, by kind "
                                     "(unreachable, stream_broken)", ["kind"], registry=r)
        self.in_flight = Gauge("stt_proxy_requests_in_flight", "Requests being forwarded to the bridge", registry=r)
        self.limits_local = Gauge("stt_proxy_rate_limits_local", "1 while the shared rate-limit storage (Redis) is "
                                  "unreachable and limits are counted in this proxy only", registry=r)

    def observe_request(self, record: AccessRecord) -> None:
        key = record.key or NO_KEY
        self.requests.labels(record.route, str(record.status), key).inc()
        self.latency.labels(record.route).observe(record.seconds)
        if record.bytes_in:
            self.bytes_in.labels(key).inc(record.bytes_in)
        if record.audio_seconds:
            self.audio_seconds.labels(key).inc(record.audio_seconds)
