"""The usage store goes away under the proxy (PostgreSQL stopped, then started again): requests are
refused with a clear 503 rather than served unmetered, a request already being served is metered
once the store is back, and the service resumes by itself."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest

from tests.conftest import BridgeProcess, bridge_env, start_instant_engine
from tests.reliability import record
from tests.test_proxy import ProxyProcess, add_key
from tests.test_usage_store import PostgresServer


@pytest.fixture(scope="module")
def slow_bridge(models_dir, catalog_file, tmp_path_factory):
    """A bridge in front of a stand-in engine that takes 0.4 s per second of audio."""
    work = tmp_path_factory.mktemp("outage")
    engine, url = start_instant_engine("--delay", "0.4")
    bridge = BridgeProcess(bridge_env(models_dir, catalog_file, ENGINE_ADAPTER="websocket", SPEED_CHECK="false",
                                      ENGINE_URL=url), work / "bridge.log")
    try:
        bridge.wait_ready()
        yield bridge
    finally:
        bridge.stop()
        engine.terminate()
        engine.wait(10)


def test_postgres_outage_fails_closed_and_loses_nothing(slow_bridge, beckett, tmp_path):
    pg = PostgresServer()
    key = add_key(tmp_path / "api-keys.json", "metered")
    proxy = ProxyProcess(slow_bridge.url, tmp_path, USAGE_DB=pg.url)
    auth = {"Authorization": f"Bearer {key}"}

    def post(request_id: str) -> httpx.Response:
        with beckett.open("rb") as fh:
            return httpx.post(proxy.url + "/v1/audio/transcriptions", files={"file": fh}, timeout=60,
                              headers={**auth, "x-request-id": request_id})

    try:
        assert post("before-outage").status_code == 200
        # A request being served when the store goes away (the stand-in takes ~4 s for 10 s of audio).
        during: dict[str, httpx.Response] = {}
        worker = threading.Thread(target=lambda: during.setdefault("r", post("during-outage")))
        worker.start()
        time.sleep(1.0)
        pg.stop()
        worker.join()
        assert during["r"].status_code == 200  # it was metered before it was served
        # While the store is down: refused with a reason, never forwarded (served unmetered).
        refused_id = f"refused-{uuid.uuid4().hex[:8]}"
        r = post(refused_id)
        assert r.status_code == 503 and r.json()["error"]["code"] == "usage_unavailable"
        assert int(r.headers["retry-after"]) > 0
        assert refused_id not in slow_bridge.log()
        pg.start()
        deadline = time.monotonic() + 30
        while (r := post("after-outage")).status_code != 200:  # back by itself
            assert time.monotonic() < deadline, r.text
            time.sleep(0.5)
        # Every request served is in the store with its audio, the one served during the outage too.
        deadline = time.monotonic() + 15
        while True:
            usage = httpx.get(proxy.url + "/v1/usage", headers=auth).json()
            served = {rec["request_id"]: rec for rec in usage["records"] if rec["status"] == 200}
            if {"before-outage", "during-outage", "after-outage"} <= set(served) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {"before-outage", "during-outage", "after-outage"} <= set(served), usage["records"]
        assert served["during-outage"]["audio_seconds"] == pytest.approx(9.96, abs=0.05)
        assert not any(rec["request_id"] == refused_id for rec in usage["records"])
        record("PostgreSQL stopped and started under the proxy", "faults",
               "503 usage_unavailable with Retry-After while down, the refused request never reached the bridge; "
               "the request being served across the outage was metered once the store was back; reconnected "
               "by itself", during_outage_audio_seconds=served["during-outage"]["audio_seconds"])
    finally:
        proxy.stop()
        pg.remove()
