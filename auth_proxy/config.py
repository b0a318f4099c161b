"""Proxy settings, read once from the environment (pydantic-settings); a bad value names its variable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from auth_proxy.limiter import SHARED_SCHEMES
from common.settings import SettingsError, apart_from_port, format_validation_error, split_comma_list


class ProxySettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    auth_host: str = "0.0.0.0"
    auth_port: int = Field(20300, ge=1, le=65535)
    bridge_url: str = "http://127.0.0.1:8000"
    # Several bridges (comma-separated URLs; a DNS name stands for all its addresses, as a Kubernetes
    # headless Service gives): requests are routed by model and load (auth_proxy/bridges.py).
    bridge_urls: Annotated[list[str], NoDecode] = []
    bridge_poll_seconds: float = Field(2.0, gt=0, le=60)  # how often each bridge's /health is read
    # The local stack's key file (scripts/run-local.sh serves it too). The repository's ./api-keys.json
    # is an example, mounted as the key file by compose (API_KEYS_FILE=/config/api-keys.json there).
    api_keys_file: Path = Path("./data/api-keys.json")
    usage_db: str = "./data/usage.db"  # SQLite path, or a postgresql:// URL shared by replicas
    usage_json: Path | None = Path("./data/usage.json")  # human-readable summary export; empty: none
    cors_origins: Annotated[list[str], NoDecode] = []
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_in_flight: int = Field(64, ge=1)  # requests forwarded at once; beyond: 503 + Retry-After
    bridge_timeout: float = Field(900.0, gt=0)  # a 600 s file on a slow CPU takes a while
    default_rpm: int = Field(0, ge=0)  # per key, when the key sets none; 0 = unlimited
    default_audio_seconds_per_day: float = Field(0, ge=0)
    realtime_sessions_per_key: int = Field(4, ge=0)  # live dictation sessions open at once per key
    # Wrong keys from one address in a minute before it is refused outright (429); 0 = no limit.
    auth_failures_per_minute: int = Field(30, ge=0)
    # Where requests-per-minute counters live: memory:// (this proxy) or redis://host:6379/0, shared by
    # every proxy replica. Redis unreachable: counted in memory meanwhile (auth_proxy/limiter.py).
    rate_limit_storage: str = "memory://"
    body_read_timeout: float = Field(30.0, gt=0)  # seconds an upload may send nothing (408 after)
    header_read_timeout: float = Field(10.0, ge=0)  # seconds to send a request's head (closed after); 0 = none
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line
    # Prometheus metrics at http://AUTH_METRICS_HOST:AUTH_METRICS_PORT/metrics, never on the API port
    # (compose does not publish this one); 0 = off. The host defaults to AUTH_HOST.
    auth_metrics_port: int = Field(20301, ge=0, le=65535)
    auth_metrics_host: str = ""

    _split = field_validator("cors_origins", "bridge_urls", mode="before")(split_comma_list)

    _metrics_apart = field_validator("auth_metrics_port")(apart_from_port("auth_port"))

    @field_validator("cors_origins")
    @classmethod
    def _explicit_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*":
                raise ValueError("list origins explicitly; '*' is not allowed")
            if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        return value

    @field_validator("usage_json", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("rate_limit_storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        value = value.strip() or "memory://"
        if value != "memory://" and not value.startswith(SHARED_SCHEMES):
            raise ValueError("must be memory:// or a redis:// URL")
        return value

    @field_validator("bridge_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("bridge_urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        return [cls._http_url(url) for url in value]


def load_proxy_settings(**overrides: object) -> ProxySettings:
    try:
        return ProxySettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from exc
