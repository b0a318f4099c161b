"""The usage store goes away under the proxy while 6 clients send uploads (PostgreSQL stopped, then
started again): requests are refused with a clear 503 rather than served unmetered, requests being
served across the outage are metered once the store is back, and the service resumes by itself."""

from __future__ import annotations

import time

import pytest

from tests.conftest import BridgeProcess, bridge_env, start_instant_engine
from tests.reliability import record
from tests.test_faults import Load, check_fail_closed, mp3_clips, served_count, served_ids
from tests.test_proxy import ProxyProcess, add_key
from tests.test_usage_store import PostgresServer


@pytest.fixture(scope="module")
def slow_bridge(models_dir, catalog_file, tmp_path_factory):
    """A bridge in front of a stand-in engine that takes 0.2 s per second of audio."""
    work = tmp_path_factory.mktemp("outage")
    engine, url = start_instant_engine("--delay", "0.2")
    bridge = BridgeProcess(bridge_env(models_dir, catalog_file, ENGINE_ADAPTER="websocket", SPEED_CHECK="false",
                                      ENGINE_URL=url), work / "bridge.log")
    try:
        bridge.wait_ready()
        yield bridge
    finally:
        bridge.stop()
        engine.terminate()
        engine.wait(10)


def test_postgres_outage_under_load_fails_closed_and_loses_nothing(slow_bridge, beckett, tmp_path):
    pg = PostgresServer()
    key = add_key(tmp_path / "api-keys.json", "metered")
    proxy = ProxyProcess(slow_bridge.url, tmp_path, USAGE_DB=pg.url)
    load = Load(proxy.url, key, mp3_clips(beckett, tmp_path), clients=6)
    try:
        load.wait_for("6 requests served before the outage", lambda done: served_count(done) >= 6)
        down = time.monotonic()
        pg.stop()
        stopped = time.monotonic()
        load.wait_for("3 requests refused while PostgreSQL was down",
                      lambda done: sum(o.status == 503 and o.started > stopped + 0.5 for o in done) >= 3)
        starting = time.monotonic()  # the server takes connections before pg_ctl returns
        pg.start()
        up = time.monotonic()
        load.wait_for("a request served after PostgreSQL started again (the proxy reconnects by itself)",
                      lambda done: served_count(done, after=up) >= 1, timeout=60)
        back = min(o.started for o in load.outcomes if o.started > up and o.status == 200)
        load.wait_for("6 requests served after the store was back", lambda done: served_count(done, after=back) >= 6)
        outcomes = load.stop()
        bridge_log = slow_bridge.log()
        served = served_ids(pg.url, {o.request_id for o in outcomes if o.status == 200})
    finally:
        load.stop()
        proxy.stop()
        pg.remove()
    assert not load.errors, load.errors[:3]
    refused, spanning = check_fail_closed(outcomes, bridge_log, served, lost=down, down=(stopped + 0.5, starting),
                                          back=back + 0.5, what=f"PostgreSQL outage (back {back - up:.1f} s after)")
    record("PostgreSQL stopped and started under load", "faults",
           "503 usage_unavailable with Retry-After while down, no refused request reached the bridge; requests "
           "served across the outage metered once the store was back; reconnected by itself",
           clients=6, requests=len(outcomes), refused_503=len(refused), served_across_the_stop=len(spanning),
           back_after_start_seconds=round(back - up, 1), metered=len(served))
