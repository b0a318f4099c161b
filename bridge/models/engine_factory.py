"""The one factory through which the bridge gets an engine: ``ENGINE_ADAPTER`` -> adapter.

It lives on the bridge's side of the port: it reads the bridge's settings and catalog entry and
hands the adapter plain values and an ``EngineModel``, so adapters never see either."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from adapters.keywords import KeywordsEngine
from adapters.managed_websocket import SERVER_BINARY, EngineSupervisor, ManagedWebSocketEngine, find_binary
from adapters.subprocess_cli import CLI_BINARY, SubprocessEngine
from adapters.websocket import ConnectionPool, WebSocketEngine
from bridge.config import AdapterName, BridgeSettings
from bridge.models.catalog import ModelSpec
from bridge.ports import ModelEngine

ADAPTERS: tuple[str, ...] = get_args(AdapterName)


def create_engine(name: str, entry: ModelSpec, model_dir: Path, settings: BridgeSettings) -> ModelEngine:
    """The adapter's engine; for a model that can use keywords, wrapped so that audio sent with
    keywords is decoded by the in-process keyword decoder (``adapters.keywords``)."""
    engine = _adapter_engine(name, entry, model_dir, settings)
    if engine.spec.keywords and settings.keywords_enabled:
        return KeywordsEngine(engine, settings.sherpa_num_threads, settings.keywords_score)
    return engine


def _adapter_engine(name: str, entry: ModelSpec, model_dir: Path, settings: BridgeSettings) -> ModelEngine:
    s = settings
    spec = entry.engine_model(model_dir)
    if name == "managed-websocket":
        pool = ConnectionPool("ws://127.0.0.1:0", s.engine_connections, s.engine_request_timeout)
        supervisor = EngineSupervisor(
            spec,
            binary=find_binary(SERVER_BINARY, s.engine_binary_dir),
            provider=s.sherpa_provider,
            num_threads=s.sherpa_num_threads,
            num_work_threads=s.sherpa_num_work_threads,
            max_batch_size=s.sherpa_max_batch_size,
            max_utterance_seconds=spec.max_piece_seconds + 5,
            ready_timeout=s.engine_ready_timeout,
            max_restarts=s.engine_max_restarts,
            restart_window=s.engine_restart_window,
            pool=pool,
        )
        return ManagedWebSocketEngine(spec, supervisor)
    if name == "websocket":
        return WebSocketEngine(spec, s.engine_url, s.engine_connections, s.engine_request_timeout,
                               provider=s.sherpa_provider)
    if name == "subprocess":
        return SubprocessEngine(
            spec,
            binary=find_binary(CLI_BINARY, s.engine_binary_dir),
            provider=s.sherpa_provider,
            num_threads=s.sherpa_num_threads,
            concurrency=s.engine_connections,
            timeout=s.engine_request_timeout,
        )
    raise ValueError(f"unknown ENGINE_ADAPTER {name!r}; choose one of {', '.join(ADAPTERS)}")
