"""What the proxy holds for its lifetime, built once in the app's lifespan: settings, keys, usage
store and its writer thread, HTTP client, limiter, metrics, and the bridges."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx

from auth_proxy.bridges import BridgePool
from auth_proxy.config import ProxySettings
from auth_proxy.keys import KeyStore
from auth_proxy.limiter import Limiter
from auth_proxy.metering import UsageWriter
from auth_proxy.metrics import ProxyMetrics
from auth_proxy.usage_store import UsageStore


@dataclass
class ProxyState:
    settings: ProxySettings
    keys: KeyStore
    usage: UsageStore
    writer: UsageWriter  # every read and write of ``usage`` goes through it
    client: httpx.AsyncClient
    limiter: Limiter
    metrics: ProxyMetrics
    pool: BridgePool | None = None  # several bridges (BRIDGE_URLS); None: the one BRIDGE_URL
    in_flight: int = 0
    realtime_sessions: dict[str, int] = field(default_factory=dict)  # open live sessions by key id
    export_task: asyncio.Task[None] | None = None
    retry_task: asyncio.Task[None] | None = None
