"""Past one GPU, on loopback: three bridges (two serving one catalog id, one another) behind two
proxies that share a real Redis (requests-per-minute limits) and a real PostgreSQL (usage).

The bridges run in front of the stand-in engine (``bench.instant_engine --delay``: 0.1 s per
second of audio), since what is tested is the proxies' choice of bridge; the real engine behind a
bridge is tested everywhere else."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from auth_proxy import bridges
from auth_proxy.limiter import RETRY_SECONDS
from tests.conftest import COPY_ID, MOONSHINE, BridgeProcess, bridge_env, free_port, start_instant_engine
from tests.reliability import record
from tests.speech import ffmpeg_convert
from tests.test_proxy import ProxyProcess, add_key
from tests.test_usage_store import PostgresServer


class RedisServer:
    """Debian's redis-server on a free loopback port, nothing saved; stop() and start() it to play an outage."""

    def __init__(self, work: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("shared limits NOT tested: no redis-server (apt-get install redis-server)")
        self.port, self.work = free_port(), work
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.work)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        ping = ["redis-cli", "-p", str(self.port), "ping"]
        while subprocess.run(ping, capture_output=True).stdout.strip() != b"PONG":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def cluster(models_dir, catalog_file, tmp_path_factory, beckett):
    work = tmp_path_factory.mktemp("routing")
    engines, bridges_, proxies = [], {}, []
    pg = PostgresServer()
    redis = RedisServer(work)
    try:
        for name, model in (("a1", MOONSHINE.id), ("a2", MOONSHINE.id), ("b", COPY_ID)):
            engine, url = start_instant_engine("--delay", "0.1")
            engines.append(engine)
            bridges_[name] = BridgeProcess(bridge_env(models_dir, catalog_file, ENGINE_ADAPTER="websocket",
                                                      ENGINE_URL=url, SPEED_CHECK="false", DEFAULT_MODEL=model),
                                           work / f"bridge-{name}.log")
        for bridge in bridges_.values():
            bridge.wait_ready()
        keys_file = work / "api-keys.json"
        keys = {"user": add_key(keys_file, "user"), "admin": add_key(keys_file, "admin", "--admin"),
                "limited": add_key(keys_file, "limited", "--rpm", "6")}
        urls = ",".join(b.url for b in bridges_.values())
        for i in range(2):
            folder = work / f"proxy-{i}"
            folder.mkdir()
            shutil.copy(keys_file, folder / "api-keys.json")
            proxies.append(ProxyProcess(bridges_["a1"].url, folder, BRIDGE_URLS=urls, BRIDGE_POLL_SECONDS="0.5",
                                        USAGE_DB=pg.url, RATE_LIMIT_STORAGE=redis.url))
        for proxy in proxies:
            deadline = time.monotonic() + 20
            while len(httpx.get(proxy.url + "/health").json().get("models", [])) < 2:
                assert time.monotonic() < deadline, proxy.log_path.read_text()[-2000:]
                time.sleep(0.2)
        clip = ffmpeg_convert(beckett, work / "b.mp3", "-b:a", "64k").read_bytes()
        yield {"bridges": bridges_, "proxies": proxies, "keys": keys, "clip": clip, "pg": pg, "redis": redis}
    finally:
        for proxy in proxies:
            proxy.stop()
        for bridge in bridges_.values():
            bridge.stop()
        for engine in engines:
            engine.terminate()
            engine.wait(10)
        redis.stop()
        pg.remove()


def post(proxy, key: str, clip: bytes, model: str | None, client: httpx.Client | None = None) -> httpx.Response:
    request_id = f"route-{uuid.uuid4().hex[:12]}"
    data = {"model": model} if model is not None else {}
    r = (client or httpx).post(proxy.url + "/v1/audio/transcriptions", files={"file": ("b.mp3", clip)}, data=data,
                               headers={"Authorization": f"Bearer {key}", "x-request-id": request_id}, timeout=60)
    r.request_id = request_id  # type: ignore[attr-defined]
    return r


def served_by(cluster, request_id: str) -> list[str]:
    return [name for name, b in cluster["bridges"].items() if request_id in b.log()]


def test_each_request_goes_to_a_bridge_holding_its_model_and_load_spreads(cluster):
    key, clip = cluster["keys"]["user"], cluster["clip"]
    proxy = cluster["proxies"][0]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post(cluster["proxies"][i % 2], key, clip,
                                               MOONSHINE.id if i % 4 else COPY_ID), range(24)))
    time.sleep(0.3)  # access lines are written as the answers end
    where: dict[str, list[str]] = {}
    for r in answers:
        assert r.status_code == 200, r.text
        where.setdefault(r.headers["x-model-id"], []).extend(served_by(cluster, r.request_id))
    assert set(where[COPY_ID]) == {"b"} and len(where[COPY_ID]) == 6
    spread = {name: where[MOONSHINE.id].count(name) for name in ("a1", "a2")}
    assert sum(spread.values()) == 18 and min(spread.values()) >= 4, spread  # both twins took a fair share
    # An alias or no model: any ready bridge. A catalog id loaded nowhere: 400 naming what is loaded.
    for model in ("whisper-1", None):
        assert post(proxy, key, clip, model).status_code == 200
    r = post(proxy, key, clip, "moonshine-broken")
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_loaded"
    assert MOONSHINE.id in r.json()["error"]["message"] and COPY_ID in r.json()["error"]["message"]
    assert "download" not in r.json()["error"]["message"]  # it is downloaded: a switch is the step
    r = post(proxy, key, clip, "parakeet-tdt-0.6b-v3-int8")  # downloaded on no bridge: that comes first
    assert r.status_code == 400 and "models download parakeet-tdt-0.6b-v3-int8" in r.json()["error"]["message"]
    r = post(proxy, key, clip, "no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # The catalog through the proxy: the union, with where each model is loaded.
    models = httpx.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    cards = {card["id"]: card for card in models["data"]}
    assert sorted(cards[MOONSHINE.id]["loaded_on"]) == sorted([cluster["bridges"][n].url for n in ("a1", "a2")])
    assert cards[COPY_ID]["loaded_on"] == [cluster["bridges"]["b"].url] and not cards["moonshine-broken"]["loaded"]
    assert models["loaded"] == sorted([MOONSHINE.id, COPY_ID]) and len(models["bridges"]) == 3
    record("Requests routed by model over three bridges", "load", "every request answered by a bridge holding "
           "its model; the two twins shared the load; a model loaded nowhere is a 400 naming those loaded",
           copy_model_requests=len(where[COPY_ID]), twins=str(spread))


def live_counts(cluster, want: dict[str, int]) -> dict[str, int]:
    """Each bridge's open live sessions, once they read ``want`` (the bridges count a session
    closed by the proxy as its handler ends, a moment later)."""
    deadline = time.monotonic() + 10
    while True:
        counts = {name: b.health()["realtime_sessions"] for name, b in cluster["bridges"].items()}
        if counts == want or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def ga_update(model: str, event_id: str = "u1") -> str:
    return json.dumps({"type": "session.update", "event_id": event_id, "session": {
        "type": "transcription", "audio": {"input": {"transcription": {"model": model}}}}})


def test_live_sessions_go_to_a_bridge_holding_the_model_they_name(cluster, beckett):
    """A live session opens on any bridge; the session.update naming its model moves it, before any
    audio, to a bridge holding that model, invisibly to the client: three sessions naming the
    copy's id all end on bridge b (the round over three bridges puts one or two of them on the
    twins first), answer its updates and carry a turn to it. The beta form and the URL's ``model``
    route alike; a model loaded nowhere is an error event naming the loaded ones, and the session
    goes on."""
    from websockets.sync.client import connect

    from tests.helpers import pcm24
    from tests.test_realtime import append, events_until

    proxy, key = cluster["proxies"][0], cluster["keys"]["user"]
    url = proxy.url.replace("http", "ws") + "/v1/realtime?intent=transcription"
    auth = {"Authorization": f"Bearer {key}"}
    pcm = pcm24(beckett, silence_after=0)[: 48000 * 2]
    stay_ms: list[float] = []
    move_ms: list[float] = []  # what a move adds to the update's answer: shown, not asserted
    with contextlib.ExitStack() as stack:
        sessions = []
        for _ in range(3):
            ws = stack.enter_context(connect(url, additional_headers=auth))
            created = json.loads(ws.recv(timeout=10))
            assert created["type"] == "session.created"
            # An update without a model first: replayed on the bridge the session moves to.
            sent = time.perf_counter()
            ws.send(json.dumps({"type": "session.update", "event_id": "u0", "session": {
                "type": "transcription", "audio": {"input": {"turn_detection": None}}}}))
            assert json.loads(ws.recv(timeout=10))["type"] == "session.updated"
            stay_ms.append((time.perf_counter() - sent) * 1000)
            on_b = cluster["bridges"]["b"].health()["realtime_sessions"]
            sent = time.perf_counter()
            ws.send(ga_update(COPY_ID))
            updated = json.loads(ws.recv(timeout=10))
            if cluster["bridges"]["b"].health()["realtime_sessions"] > on_b:  # it moved there
                move_ms.append((time.perf_counter() - sent) * 1000)
            assert updated["type"] == "session.updated", updated
            assert updated["session"]["audio"]["input"]["transcription"]["model"] == COPY_ID
            assert updated["session"]["audio"]["input"]["turn_detection"] is None  # the replayed update held
            sessions.append(ws)
        assert live_counts(cluster, {"a1": 0, "a2": 0, "b": 3}) == {"a1": 0, "a2": 0, "b": 3}
        assert move_ms, "no session had to move: the test shows nothing"
        print(f"\nsession.update answered: {sorted(round(t, 1) for t in stay_ms)} ms in place, "
              f"{sorted(round(t, 1) for t in move_ms)} ms with a move")
        ws = sessions[0]
        for i in range(0, len(pcm), 4800):
            ws.send(append(pcm[i:i + 4800]))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        done = events_until(ws, "conversation.item.input_audio_transcription.completed", 30)[-1]
        assert done["transcript"] == "instant" and done["usage"]["seconds"] == pytest.approx(2.0, abs=0.01)
        # Once audio has gone, the session stays put: a later update naming the twins' model is b's to answer.
        ws.send(ga_update(MOONSHINE.id, "late"))
        late = events_until(ws, "error", 10)[-1]["error"]
        assert late["code"] == "model_not_loaded" and late["event_id"] == "late"
        assert f"the loaded model is {COPY_ID!r}" in late["message"]  # b's own answer
    assert live_counts(cluster, {"a1": 0, "a2": 0, "b": 0})["b"] == 0

    # The beta form, the URL's model, and a model loaded nowhere.
    with connect(url, additional_headers={**auth, "openai-beta": "realtime=v1"}) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "transcription_session.created"
        ws.send(json.dumps({"type": "transcription_session.update", "session": {
            "input_audio_transcription": {"model": COPY_ID}}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "transcription_session.updated"
        assert live_counts(cluster, {"a1": 0, "a2": 0, "b": 1})["b"] == 1
    with connect(url + f"&model={COPY_ID}", additional_headers=auth) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        assert live_counts(cluster, {"a1": 0, "a2": 0, "b": 1})["b"] == 1
    with connect(url, additional_headers=auth) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(ga_update("moonshine-broken", "nowhere"))
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["error"]["code"] == "model_not_loaded", error
        assert error["error"]["event_id"] == "nowhere"
        assert error["error"]["param"] == "session.audio.input.transcription.model"
        assert MOONSHINE.id in error["error"]["message"] and COPY_ID in error["error"]["message"]
        ws.send(ga_update(MOONSHINE.id))
        assert json.loads(ws.recv(timeout=10))["type"] == "session.updated"
    with connect(url + "&model=moonshine-broken", additional_headers=auth) as ws:
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["error"]["code"] == "model_not_loaded"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert live_counts(cluster, {"a1": 0, "a2": 0, "b": 0}) == {"a1": 0, "a2": 0, "b": 0}
    record("Live sessions routed by the model they name", "load", "three sessions naming the copy's model "
           "all ended, before audio, on the one bridge holding it (those opened elsewhere moved) and carried a "
           "turn there; a model loaded nowhere is an error event naming the loaded models", sessions=3,
           moved=len(move_ms),
           update_ms_in_place=round(statistics.median(stay_ms), 1),
           update_ms_moved=round(statistics.median(move_ms), 1))


def test_a_rate_limit_holds_across_both_proxies(cluster):
    """6 requests a minute for the key, sent alternately to the two proxies: 6 answered in all."""
    key = cluster["keys"]["limited"]
    statuses = [httpx.get(cluster["proxies"][i % 2].url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
                          ).status_code for i in range(12)]
    assert statuses.count(200) == 6 and statuses.count(429) == 6, statuses
    assert statuses[:6] == [200] * 6


def test_usage_from_both_proxies_adds_up_in_postgresql(cluster):
    key, admin, clip = cluster["keys"]["user"], cluster["keys"]["admin"], cluster["clip"]

    def total() -> int:
        usage = httpx.get(cluster["proxies"][0].url + "/v1/usage?key=user",
                          headers={"Authorization": f"Bearer {admin}"}).json()
        return sum(t["requests"] for t in usage["totals"])

    before = total()
    for i in range(4):
        assert post(cluster["proxies"][i % 2], key, clip, None).status_code == 200
    assert total() == before + 4  # read through one proxy, written by both


def test_a_killed_bridge_fails_only_what_it_held_and_its_twin_takes_the_rest(cluster):
    key, clip = cluster["keys"]["user"], cluster["clip"]
    a1 = cluster["bridges"]["a1"]
    outcomes: list[tuple[float, float, httpx.Response]] = []
    lock, stop = threading.Lock(), threading.Event()

    def client_loop(i: int) -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                started = time.monotonic()
                r = post(cluster["proxies"][i % 2], key, clip, MOONSHINE.id, client)
                with lock:
                    outcomes.append((started, time.monotonic(), r))

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client_loop, i) for i in range(8)]
        time.sleep(3)
        held = a1.health()["requests_in_flight"]
        killed = time.monotonic()
        a1.stop(signal.SIGKILL)
        time.sleep(5)
        stop.set()
        for future in futures:
            future.result()
    failed = [(s, e, r) for s, e, r in outcomes if r.status_code != 200]
    after = [(s, e, r) for s, e, r in outcomes if s > killed]
    print(f"\n{len(outcomes)} requests; a1 held {held} when killed; {len(failed)} failed "
          f"({sorted({r.status_code for _, _, r in failed})}); {len(after)} started after")
    # What failed was in flight on a1 when it died; it is a clean 503 the client may retry.
    assert len(failed) <= held + 1, (held, [r.text for _, _, r in failed])
    assert all(s < killed < e and r.status_code == 503 and r.headers.get("retry-after") for s, e, r in failed), \
        [(round(s - killed, 2), round(e - killed, 2), r.status_code, r.headers.get("retry-after"), r.text[:200])
         for s, e, r in failed]
    assert after and all(r.status_code == 200 and r.headers["x-model-id"] == MOONSHINE.id for _, _, r in after)
    time.sleep(0.3)
    assert all(served_by(cluster, r.request_id) == ["a2"] for _, _, r in after)
    health = httpx.get(cluster["proxies"][0].url + "/health").json()
    assert {b["url"]: b["ready"] for b in health["bridges"]}[a1.url] is False
    record("One of two bridges of a model killed (SIGKILL) under 8 clients", "faults",
           "only requests in flight on it failed (503 with Retry-After); every later request went to its twin",
           requests=len(outcomes), held_by_killed_bridge=held, failed=len(failed), after_kill=len(after))


def test_redis_outage_limits_each_proxy_on_its_own_then_shares_again(cluster):
    """Redis stopped: nothing is refused because of it, each proxy counts the key's limit in its own
    memory (so 2 proxies let through up to twice the limit), the log and a metric say so; Redis
    back: the limit is shared again."""
    key, redis = cluster["keys"]["limited"], cluster["redis"]
    proxies = cluster["proxies"]

    def get(proxy) -> int:
        return httpx.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

    def local_gauge(proxy) -> float:
        text = httpx.get(proxy.metrics_url).text
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("stt_proxy_rate_limits_local ")))

    redis.stop()
    try:
        statuses = {i: [get(p) for _ in range(8)] for i, p in enumerate(proxies)}
        assert all(s.count(200) == 6 and s.count(429) == 2 for s in statuses.values()), statuses
        assert all(local_gauge(p) == 1 for p in proxies)
        assert all("counting limits in this proxy's memory" in p.log_path.read_text() for p in proxies)
    finally:
        redis.start()
    subprocess.run(["redis-cli", "-p", str(redis.port), "flushall"], check=True, capture_output=True)
    time.sleep(RETRY_SECONDS + 0.5)  # the proxies try Redis again after this
    statuses_after = [get(proxies[i % 2]) for i in range(12)]
    assert statuses_after.count(200) == 6, statuses_after  # shared again: 6 in all, not 6 each
    assert all(local_gauge(p) == 0 for p in proxies)
    assert all("answers again" in p.log_path.read_text() for p in proxies)
    record("Redis stopped and started under two proxies", "faults", "nothing refused because of it; each proxy "
           "held the key's limit on its own meanwhile (6 each of 8), logged and exported as "
           "stt_proxy_rate_limits_local=1; shared again once Redis was back (6 of 12 in all)")


def test_switches_over_several_bridges(cluster):
    """Runs after a1 was killed: a2 holds the Moonshine id, b the copy. ``bridges=one`` changes
    nothing when a ready bridge holds the model, else loads it on one bridge whose model another
    also serves; ``bridges=all`` switches every ready bridge."""
    proxy, admin, key, clip = cluster["proxies"][0], cluster["keys"]["admin"], cluster["keys"]["user"], cluster["clip"]
    a2, b = cluster["bridges"]["a2"].url, cluster["bridges"]["b"].url

    def switch(model: str, scope: str | None = None) -> httpx.Response:
        return httpx.post(proxy.url + "/v1/models/switch" + (f"?bridges={scope}" if scope else ""),
                          json={"model_id": model}, headers={"Authorization": f"Bearer {admin}"}, timeout=60)

    def loaded_on() -> dict[str, list[str]]:
        models = httpx.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        return {card["id"]: sorted(card["loaded_on"]) for card in models["data"] if card["loaded_on"]}

    r = switch(COPY_ID)
    assert r.status_code == 200 and r.json()["switched"] is False and r.json()["bridges"] == [b]
    r = switch(COPY_ID, "all")
    assert r.status_code == 200 and sorted(r.json()["bridges"]) == sorted([a2, b]), r.text
    assert loaded_on() == {COPY_ID: sorted([a2, b])}
    # No ready bridge holds it now; the killed a1 did, and may come back: retry later.
    r = post(proxy, key, clip, MOONSHINE.id)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable" and r.headers["retry-after"]
    r = switch(MOONSHINE.id)  # one of the two copies gives way; the copy stays loaded on the other
    assert r.status_code == 200 and r.json()["switched"] is True and len(r.json()["bridges"]) == 1, r.text
    assert sorted(loaded_on()) == sorted([MOONSHINE.id, COPY_ID])
    for model in (MOONSHINE.id, COPY_ID):
        r = post(proxy, key, clip, model)
        assert r.status_code == 200 and r.headers["x-model-id"] == model
    r = switch("moonshine-broken", "sideways")
    assert r.status_code == 400 and r.json()["error"]["param"] == "bridges"
    assert switch("no-such-model").status_code == 404


def test_a_dns_name_stands_for_all_its_addresses(monkeypatch):
    """A headless Service's name resolves to every bridge; DNS with several addresses for one name
    does not exist on this machine, so the resolver's answer is given."""
    async def getaddrinfo(host, port, type=0):
        assert (host, port) == ("mvp-bridge", 8000)
        return [(2, 1, 6, "", ("10.0.0.7", port)), (2, 1, 6, "", ("10.0.0.5", port)),
                (2, 1, 6, "", ("10.0.0.7", port)), (10, 1, 6, "", ("fd00::3", port, 0, 0))]

    async def run() -> list[str]:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        return await bridges.resolve("http://mvp-bridge:8000")

    assert asyncio.run(run()) == ["http://10.0.0.5:8000", "http://10.0.0.7:8000", "http://[fd00::3]:8000"]
    assert asyncio.run(bridges.resolve("http://127.0.0.1:8123")) == ["http://127.0.0.1:8123"]
