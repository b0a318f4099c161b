"""Which model is loaded, and switching it.

One model is loaded at a time. A switch is serialized; the old engine keeps serving until the new
one has answered a real round trip, then new requests go to the new one while requests that hold
a lease on the old one finish there before it is closed. A failed switch leaves the old one
serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from bridge.config import BridgeSettings
from bridge.metrics import BridgeMetrics
from bridge.models.catalog import Catalog, ModelSpec
from bridge.models.model_store import ModelStore
from bridge.models.speed_check import SpeedCheck, run_speed_check
from bridge.ports import EngineHealth, EngineModel, EngineUnavailable, ModelEngine

log = logging.getLogger("bridge.models")

EngineFactory = Callable[[str, ModelSpec, Path, BridgeSettings], ModelEngine]


class ModelNotDownloaded(RuntimeError):
    pass


@dataclass
class SwitchResult:
    model: str
    previous: str | None
    seconds: float
    switched: bool


class EngineManager:
    def __init__(self, settings: BridgeSettings, catalog: Catalog, store: ModelStore,
                 factory: EngineFactory, metrics: BridgeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.catalog = catalog
        self.store = store
        self.factory = factory
        self.engine: ModelEngine | None = None
        self._leases: dict[int, int] = {}
        self._drained: dict[int, asyncio.Event] = {}
        self._switch_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._retiring_engines: list[ModelEngine] = []
        self.switching_to: str | None = None
        self._speed: dict[int, SpeedCheck] = {}  # by id(engine)
        self.restarts_retired = 0  # engine restarts of the engines already closed (metrics)

    @property
    def model(self) -> EngineModel | None:
        return self.engine.spec if self.engine else None

    @property
    def speed(self) -> SpeedCheck | None:
        """The loaded engine's speed check (``bridge.models.speed_check``), if it ran."""
        return self._speed.get(id(self.engine)) if self.engine else None

    async def _start_engine(self, spec: ModelSpec) -> ModelEngine:
        if not self.store.is_ready(spec):
            if spec.source == "pypi":
                await asyncio.to_thread(self.store.prepare, spec)
            else:
                raise ModelNotDownloaded(
                    f"model {spec.id} is not in MODELS_DIR ({self.store.root}); "
                    f"run: python -m bridge models download {spec.id}"
                )
        started = time.monotonic()
        engine = self.factory(self.settings.engine_adapter, spec, self.store.path_for(spec.id), self.settings)
        try:
            await engine.start()
            if self.settings.speed_check:
                self._speed[id(engine)] = await run_speed_check(engine, self.settings.speed_warn_rtf)
        except BaseException:
            self._speed.pop(id(engine), None)
            await engine.close()
            raise
        if self.metrics is not None:
            self.metrics.model_load_seconds.labels(spec.id).observe(time.monotonic() - started)
        return engine

    async def load_initial(self, model_id: str) -> float:
        started = time.monotonic()
        self.engine = await self._start_engine(self.catalog.get(model_id))
        return time.monotonic() - started

    async def switch(self, model_id: str) -> SwitchResult:
        spec = self.catalog.get(model_id)  # UnknownModelError -> 404
        async with self._switch_lock:
            started = time.monotonic()
            previous = self.engine
            if previous is not None and previous.spec.id == spec.id and previous.health().ready:
                return SwitchResult(spec.id, spec.id, 0.0, switched=False)
            self.switching_to = spec.id
            try:
                new = await self._start_engine(spec)  # old engine keeps serving meanwhile
            finally:
                self.switching_to = None
            self.engine = new
            elapsed = time.monotonic() - started
            if self.metrics is not None:
                self.metrics.model_switch_seconds.labels(spec.id).observe(elapsed)
            log.info("switched model %s -> %s in %.2f s",
                     previous.spec.id if previous else None, spec.id, elapsed)
            if previous is not None:
                self._retiring_engines.append(previous)
                task = asyncio.create_task(self._retire(previous))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            return SwitchResult(spec.id, previous.spec.id if previous else None, elapsed, switched=True)

    async def _retire(self, engine: ModelEngine) -> None:
        key = id(engine)
        if self._leases.get(key, 0) > 0:
            event = self._drained.setdefault(key, asyncio.Event())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), self.settings.engine_request_timeout)
        self.restarts_retired += engine.health().restarts
        await engine.close()
        self._retiring_engines.remove(engine)
        self._drained.pop(key, None)
        self._speed.pop(key, None)
        log.info("closed the engine of %s", engine.spec.id)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[ModelEngine]:
        """The engine a request uses from start to end, even if a switch happens meanwhile."""
        engine = self.engine
        if engine is None:
            raise EngineUnavailable("no model loaded yet", retry_after=5)
        key = id(engine)
        self._leases[key] = self._leases.get(key, 0) + 1
        try:
            yield engine
        finally:
            self._leases[key] -= 1
            if self._leases[key] == 0:
                del self._leases[key]
                if key in self._drained:
                    self._drained[key].set()

    def health(self) -> EngineHealth:
        if self.engine is None:
            return EngineHealth(ready=False, provider=self.settings.sherpa_provider, detail="loading")
        return self.engine.health()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        engines = ([self.engine] if self.engine else []) + list(self._retiring_engines)
        self.engine = None
        for engine in engines:
            await engine.close()
