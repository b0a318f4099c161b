"""Several bridges behind one proxy (``BRIDGE_URLS``): which ones there are, what each has loaded and
how busy it is, and which one a request goes to.

Each entry of ``BRIDGE_URLS`` is a bridge's URL; an entry whose host is a DNS name stands for every
address the name resolves to (a Kubernetes headless Service, or a compose service scaled up), and
is resolved again at each poll, so bridges that come and go are followed. Every
``BRIDGE_POLL_SECONDS`` the proxy reads each bridge's ``/health`` (ready, loaded model, requests in
flight) and, when its model changed, its ``/v1/models`` (catalog and aliases).

A request goes to the ready bridge serving its model (any ready bridge for no model or an alias)
with the fewest requests in flight: this proxy's own, counted live, plus those from elsewhere as
the last poll saw them; ties go round. Placement, restarts and scaling are Kubernetes' or
compose's: the proxy only chooses among the bridges it is given (as vLLM's production-stack
router does).

Without ``BRIDGE_URLS`` there is one bridge, ``BRIDGE_URL``, and requests stream straight to it as
before (see auth_proxy.forwarded_request).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from common.errors import APIError

log = logging.getLogger("auth_proxy.bridges")
T = TypeVar("T")


@dataclass
class Bridge:
    url: str
    client: httpx.AsyncClient
    ready: bool = False
    model: str | None = None
    switching_to: str | None = None
    aliases: list[str] = field(default_factory=list)
    catalog: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0  # requests this proxy has forwarded there, now
    others: int = 0  # requests in flight there from elsewhere, as the last poll saw them
    detail: str = "not polled yet"
    gone: bool = False  # no longer among the addresses; closed once idle

    @property
    def load(self) -> int:
        return self.in_flight + self.others

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "ready": self.ready, "model": self.model, "in_flight": self.load,
                "detail": self.detail}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def resolve(target: str) -> list[str]:
    """The bridge URLs one ``BRIDGE_URLS`` entry stands for: itself for an IP address, one URL per
    address for a DNS name."""
    url = httpx.URL(target)
    if _is_ip(url.host):
        return [target]
    port = url.port or (443 if url.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
    addresses = sorted({str(info[4][0]) for info in infos})
    return [str(url.copy_with(host=address)).rstrip("/") for address in addresses]


class BridgePool:
    def __init__(self, targets: list[str], *, poll_seconds: float, make_client: Any) -> None:
        self.targets = targets
        self.poll_seconds = poll_seconds
        self._make_client = make_client
        self.bridges: dict[str, Bridge] = {}
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._resolved: dict[str, list[str]] = {}

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(b.client.aclose() for b in self.bridges.values()), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - polling goes on whatever one round met
                log.exception("polling the bridges failed")

    async def refresh(self) -> None:
        urls: list[str] = []
        for target in self.targets:
            try:
                self._resolved[target] = await resolve(target)
            except OSError as exc:  # DNS down or the name gone: keep what it resolved to before
                log.warning("cannot resolve %s (%s); keeping its last addresses %s", target, exc,
                            self._resolved.get(target, []))
            urls += self._resolved.get(target, [])
        for url in urls:
            if url not in self.bridges:
                self.bridges[url] = Bridge(url, self._make_client(url))
                log.info("bridge %s added", url)
            self.bridges[url].gone = False
        for url, bridge in list(self.bridges.items()):
            if url not in urls:
                bridge.gone, bridge.ready = True, False
                if bridge.in_flight == 0:
                    del self.bridges[url]
                    await bridge.client.aclose()
                    log.info("bridge %s removed (no longer among the addresses)", url)
        await asyncio.gather(*(self.poll(b) for b in list(self.bridges.values()) if not b.gone))

    async def poll(self, bridge: Bridge) -> None:
        was = (bridge.ready, bridge.model)
        try:
            r = await bridge.client.get("/health", timeout=min(5.0, self.poll_seconds + 1))
            health = r.json()
            bridge.ready = r.status_code == 200
            bridge.others = max(0, int(health.get("requests_in_flight", 0)) - bridge.in_flight)
            bridge.switching_to = health.get("switching_to")
            bridge.detail = str(health.get("detail") or health.get("status", ""))
            model = health.get("model")
            if model != bridge.model or not bridge.catalog:
                models = (await bridge.client.get("/v1/models", timeout=5.0)).json()
                bridge.catalog = list(models.get("data", []))
                bridge.aliases = list(models.get("aliases", []))
            bridge.model = model
        except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
            bridge.ready = False
            bridge.detail = f"unreachable: {exc.__class__.__name__}"
        if (bridge.ready, bridge.model) != was:
            log.info("bridge %s: %s, model %s", bridge.url, "ready" if bridge.ready else
                     f"not ready ({bridge.detail})", bridge.model)

    def failed(self, bridge: Bridge, exc: Exception) -> None:
        """A request could not reach ``bridge``: out of the choice until a poll finds it ready."""
        bridge.ready = False
        bridge.detail = f"unreachable: {exc.__class__.__name__}"
        log.warning("bridge %s unreachable (%r): trying another", bridge.url, exc)

    def ready(self) -> list[Bridge]:
        return [b for b in self.bridges.values() if b.ready and not b.gone]

    def loaded_models(self) -> list[str]:
        return sorted({b.model for b in self.ready() if b.model})

    def serving(self, model: str) -> list[Bridge]:
        ready = self.ready()
        if not model or any(model in b.aliases for b in ready):
            return ready
        return [b for b in ready if b.model == model]

    def choose(self, model: str, exclude: set[str] | frozenset[str] = frozenset()) -> Bridge:
        """The least busy ready bridge serving ``model`` (not in ``exclude``); APIError if none."""
        pool = [b for b in self.serving(model) if b.url not in exclude]
        if not pool:
            raise self.none_for(model)
        turn = next(self._turn)
        order = {b.url: (i - turn) % len(pool) for i, b in enumerate(pool)}
        return min(pool, key=lambda b: (b.load, order[b.url]))

    async def reach(self, model: str, attempt: Callable[[Bridge], Awaitable[T]],
                    unreachable: tuple[type[Exception], ...]) -> tuple[Bridge, T]:
        """``attempt`` on the least busy ready bridge serving ``model``; when it raises one of
        ``unreachable`` (the bridge was never reached), that bridge is marked down and the next is
        tried. APIError when none is left."""
        tried: set[str] = set()
        while True:
            bridge = self.choose(model, tried)
            try:
                return bridge, await attempt(bridge)
            except unreachable as exc:
                self.failed(bridge, exc)
                tried.add(bridge.url)

    def none_for(self, model: str) -> APIError:
        if not self.ready():
            return APIError(503, "no transcription bridge is ready; retry shortly", code="bridge_unavailable",
                            type="server_error", retry_after=5)
        loaded = ", ".join(self.loaded_models()) or "none"
        coming = [b for b in self.bridges.values() if not b.gone and (b.model == model or b.switching_to == model)]
        if coming:
            return APIError(503, f"model {model!r} is loaded on no bridge that is ready now (the {len(coming)} "
                            "holding it are restarting, switching or unreachable); retry shortly", param="model",
                            code="model_unavailable", type="server_error", retry_after=5)
        cards = [card for b in self.ready() for card in b.catalog if card.get("id") == model]
        if cards:
            load = f"load it with POST /v1/models/switch {{\"model_id\": \"{model}\"}} (an admin key)"
            if not any(card.get("downloaded") for card in cards):  # a switch would answer 409 first
                load = f"download it on a bridge first (python -m bridge models download {model}), then {load}"
            return APIError(400, f"model {model!r} is not loaded on any bridge; loaded: {loaded}. "
                            f"{load[0].upper()}{load[1:]}", param="model", code="model_not_loaded",
                            should_retry=False)
        return APIError(404, f"model {model!r} does not exist; loaded: {loaded} (see GET /v1/models)",
                        param="model", code="model_not_found", should_retry=False)

    def models(self) -> dict[str, Any]:
        """GET /v1/models: the catalogs' union, each model with the bridges it is loaded on."""
        cards: dict[str, dict[str, Any]] = {}
        for bridge in self.ready():
            for card in bridge.catalog:
                entry = cards.setdefault(card["id"], {**card, "loaded": False, "loaded_on": []})
                if bridge.model == card["id"]:
                    entry["loaded"] = True
                    entry["loaded_on"].append(bridge.url)
        return {"object": "list", "data": list(cards.values()), "loaded": self.loaded_models(),
                "aliases": sorted({a for b in self.ready() for a in b.aliases}),
                "bridges": [b.describe() for b in self.bridges.values() if not b.gone]}

    def pick_for_switch(self, model: str) -> Bridge:
        """The bridge a switch to ``model`` loads it on: a ready one whose model at least one other
        ready bridge also serves (no model disappears), the least busy first."""
        ready = self.ready()
        if not ready:
            raise self.none_for(model)
        count = {m: sum(1 for b in ready if b.model == m) for m in {b.model for b in ready}}
        return min(ready, key=lambda b: (count[b.model] < 2, b.load, b.url))
