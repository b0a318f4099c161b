"""Faults under load through the proxy, one at a time: the bridge stopped with SIGTERM and started
again, and the usage store's disk filling up. (The engine killed with SIGKILL and the key file
rewritten every second are in test_load.py; PostgreSQL stopped in test_usage_outage.py.)"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from auth_proxy.limiter import redact
from tests.conftest import ROOT, BridgeProcess, bridge_env, free_port
from tests.reliability import record
from tests.speech import ffmpeg_convert
from tests.test_proxy import ProxyProcess, add_key


@dataclass
class Outcome:
    request_id: str
    started: float
    ended: float
    status: int
    code: str = ""
    retry_after: str | None = None


class Load:
    """``clients`` threads posting uploads (some streamed) through a proxy until stopped; every
    answer kept with its times. A request that hangs past 60 s fails the test."""

    def __init__(self, url: str, key: str, clips: list[bytes], clients: int) -> None:
        self.url, self.key, self.clips = url, key, clips
        self.outcomes: list[Outcome] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._client, i) for i in range(clients)]

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                request_id = f"load-{uuid.uuid4().hex[:12]}"
                started = time.monotonic()
                data = {"stream": "true"} if rng.random() < 0.25 else {}
                try:
                    r = client.post(self.url + "/v1/audio/transcriptions", data=data,
                                    files={"file": ("a.mp3", rng.choice(self.clips))},
                                    headers={"Authorization": f"Bearer {self.key}", "x-request-id": request_id})
                except httpx.HTTPError as exc:  # a hang or a dropped connection: both fail the test
                    with self._lock:
                        self.errors.append(exc)
                    continue
                code = ""
                if r.status_code != 200:
                    code = r.json().get("error", {}).get("code", "")
                elif data and "transcript.text.done" not in r.text:
                    code = "stream_incomplete"
                with self._lock:
                    self.outcomes.append(Outcome(request_id, started, time.monotonic(), r.status_code, code,
                                                 r.headers.get("retry-after")))
                if r.status_code == 503:  # as the SDKs do, though sooner than Retry-After asks
                    time.sleep(0.2)

    def wait_for(self, what: str, enough: Callable[[list[Outcome]], bool], timeout: float = 300) -> None:
        """Wait until the answers so far are ``enough`` (counted in requests, not seconds: a loaded
        machine answers slowly); ``what`` names them in the failure."""
        deadline = time.monotonic() + timeout
        while not enough(list(self.outcomes)):
            assert not self.errors, f"while waiting for {what}: {self.errors[:3]}"
            assert time.monotonic() < deadline, \
                f"no {what} in {timeout:.0f} s; answers so far: {summary(self.outcomes)}"
            time.sleep(0.2)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for future in self._futures:
            future.result()
        self._pool.shutdown()
        return self.outcomes


def summary(outcomes: list[Outcome]) -> str:
    """How many answers of each status and code."""
    return str(dict(Counter(f"{o.status} {o.code}".strip() for o in outcomes)))


def served_ids(db: Path | str, want: set[str], timeout: float = 20) -> dict[str, dict]:
    """The usage store's records (status 200) of ``want``, read from the proxy's SQLite file (or its
    PostgreSQL URL), waiting for writes kept during an outage to land."""
    deadline = time.monotonic() + timeout
    query = "SELECT request_id, status, audio_seconds FROM usage WHERE status = 200"
    while True:
        if str(db).startswith("postgresql://"):
            import psycopg

            with psycopg.connect(str(db)) as pg:
                rows = pg.execute(query).fetchall()
        else:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                rows = conn.execute(query).fetchall()
        found = {rid: {"status": status, "audio_seconds": seconds} for rid, status, seconds in rows if rid in want}
        if set(found) == want or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def check_fail_closed(outcomes: list[Outcome], bridge_log: str, served: dict[str, dict], *, lost: float,
                      down: tuple[float, float], back: float, what: str) -> tuple[list[Outcome], list[Outcome]]:
    """What a usage-store outage under load must show: every refusal a 503 usage_unavailable with
    Retry-After, requests started within ``down`` refused unless their record could be written first
    and none of the refused forwarded, every one started after ``back`` served, and every served
    request (those in flight at ``lost``, when the store went away, included) metered with its
    audio. Returns (refused, served across ``lost``)."""
    refused = [o for o in outcomes if o.status != 200]
    during = [o for o in outcomes if down[0] < o.started < down[1]]
    spanning = [o for o in outcomes if o.started < lost < o.ended and o.status == 200]
    after = [o for o in outcomes if o.started > back]
    print(f"\n{what}: {len(outcomes)} requests, {len(refused)} refused, {len(during)} started meanwhile "
          f"({sorted({o.status for o in during})}), {len(spanning)} served across it, {len(after)} after")
    assert refused, f"nothing refused: {summary(outcomes)}"
    wrong = [o for o in refused if not (o.status == 503 and o.code == "usage_unavailable" and o.retry_after)]
    assert not wrong, f"refusals other than 503 usage_unavailable with Retry-After: {wrong[:3]}"
    # Nothing is served unmetered: a request started meanwhile is refused, or its record was written
    # before it was served (SQLite can still append into the space its WAL already holds on a full disk).
    assert any(o.status == 503 for o in during), f"none refused of those started meanwhile: {summary(during)}"
    assert all(o.status == 503 or o.request_id in served for o in during), \
        "a request was served while its usage could not be written"
    assert not any(o.request_id in bridge_log for o in refused), "a refused request reached the bridge"
    assert after, f"no request started after the store was back: {summary(outcomes)}"
    assert all(o.status == 200 for o in after), f"refused after the store was back: {summary(after)}"
    missing = {o.request_id for o in outcomes if o.status == 200} - set(served)
    assert not missing, f"{len(missing)} served requests not metered"
    assert spanning, f"no request in flight when the store went away was served: {summary(outcomes)}"
    unmetered = [o.request_id for o in spanning if not served[o.request_id]["audio_seconds"] > 0]
    assert not unmetered, f"served across the outage without their audio metered: {unmetered[:3]}"
    return refused, spanning


def served_count(outcomes: list[Outcome], after: float = 0.0) -> int:
    """How many requests started after ``after`` were served."""
    return sum(o.status == 200 and o.started > after for o in outcomes)


def mp3_clips(beckett: Path, work: Path) -> list[bytes]:
    return [ffmpeg_convert(beckett, work / "b.mp3", "-b:a", "64k").read_bytes(),
            ffmpeg_convert(beckett, work / "short.mp3", "-t", "3", "-b:a", "64k").read_bytes()]


def test_bridge_sigterm_and_restart_under_load(models_dir, catalog_file, beckett, tmp_path):
    """The bridge gets SIGTERM under 8 clients: requests in flight finish, the bridge exits 0, the
    proxy answers 503 bridge_unavailable with Retry-After while it is gone, none hangs, and a new
    bridge on the same address is used again as soon as it is ready."""
    port = free_port()
    env = bridge_env(models_dir, catalog_file, TMPDIR=str(tmp_path))
    first = BridgeProcess(env, tmp_path / "bridge-1.log", port=port)
    first.wait_ready()
    key = add_key(tmp_path / "proxy" / "api-keys.json", "user")
    proxy = ProxyProcess(first.url, tmp_path / "proxy")
    second: BridgeProcess | None = None
    load = Load(proxy.url, key, mp3_clips(beckett, tmp_path), clients=8)
    try:
        time.sleep(3)
        term = time.monotonic()
        in_flight = first.health()["requests_in_flight"]
        rc = first.stop(signal.SIGTERM, timeout=60)  # the bridge's own bound: 30 s of graceful shutdown
        exited = time.monotonic() - term
        time.sleep(1)  # the proxy meets an address with nothing behind it
        second = BridgeProcess(env, tmp_path / "bridge-2.log", port=port)
        second.wait_ready()
        ready = time.monotonic()
        # Until requests sent after the new bridge was ready have been answered (a few seconds, longer
        # on a busy machine): counted, not timed.
        deadline = ready + 60
        while time.monotonic() < deadline and sum(o.started > ready + 0.5 for o in list(load.outcomes)) < 4:
            time.sleep(0.5)
        outcomes = load.stop()
        served = served_ids(proxy.db, {o.request_id for o in outcomes if o.status == 200}, timeout=5)
    finally:
        load.stop()
        proxy.stop()
        if second is not None:
            second.stop()
        first.stop()
    assert not load.errors, load.errors[:3]
    # Requests in flight get the 30 s of graceful shutdown; one still running then is cut off with 503
    # shutting_down (a busy machine can get there), and the bridge exits 0 soon after.
    assert rc == 0 and exited < 40, (rc, exited)
    statuses = sorted({o.status for o in outcomes})
    across = [o for o in outcomes if o.started < term < o.ended]
    after = [o for o in outcomes if o.started > ready + 0.5]
    print(f"\n{len(outcomes)} requests, statuses {statuses}; {in_flight} in flight at SIGTERM, exit after "
          f"{exited:.1f} s; {len(across)} spanning it: {sorted(o.status for o in across)}; back "
          f"{ready - term:.1f} s after SIGTERM; {len(after)} after, {sorted({o.status for o in after})}")
    assert set(statuses) <= {200, 503}
    refused = [o for o in outcomes if o.status == 503]
    assert refused and all(o.retry_after and o.code in ("bridge_unavailable", "engine_unavailable", "shutting_down")
                           for o in refused)
    assert not [o for o in outcomes if o.code == "stream_incomplete"]
    assert any(o.status == 200 for o in across), "requests in flight at SIGTERM should have finished"
    assert after, f"no request started after the store was back: {summary(outcomes)}"
    assert all(o.status == 200 for o in after), f"refused after the store was back: {summary(after)}"
    # Every answered request is in the usage store once, as what it was.
    assert len(served) == sum(1 for o in outcomes if o.status == 200), [
        o for o in outcomes if o.status == 200 and o.request_id not in served][:4]
    record("Bridge SIGTERM and restart under load", "faults",
           "requests in flight finished (200), the bridge exited 0; while it was gone the proxy answered 503 "
           "bridge_unavailable with Retry-After; no request hung; the new bridge was used as soon as it was ready",
           clients=8, requests=len(outcomes), in_flight_at_sigterm=in_flight, exit_seconds=round(exited, 1),
           refused_503=len(refused), spanning_sigterm_ok=sum(o.status == 200 for o in across),
           back_after_seconds=round(ready - term, 1))


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
    """A 16 MiB tmpfs at ``folder`` whose space can be used up (writes then fail with ENOSPC, as on a
    full disk) and freed again; yields ``(fill, free)``. Needs root allowed to mount."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    filler = folder / "filler"

    def fill() -> None:
        # Unbuffered: a buffered file would raise ENOSPC again from close(), flushing what it kept.
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 65536)
        finally:
            os.close(fd)

    try:
        yield fill, filler.unlink
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_usage_disk_full_under_load(bridge, beckett, tmp_path):
    """The disk under the SQLite usage store fills up under 6 clients: requests are refused with 503
    usage_unavailable and Retry-After, never forwarded unmetered; requests already being served are
    written once there is room again; the proxy takes requests again by itself."""
    key = add_key(tmp_path / "proxy" / "api-keys.json", "user")
    with small_disk(tmp_path / "usage-disk") as (fill, free):
        proxy = ProxyProcess(bridge.url, tmp_path / "proxy", USAGE_DB=str(tmp_path / "usage-disk" / "usage.db"))
        proxy.db = tmp_path / "usage-disk" / "usage.db"
        load = Load(proxy.url, key, mp3_clips(beckett, tmp_path), clients=6)
        try:
            load.wait_for("6 requests served before the disk filled", lambda done: served_count(done) >= 6)
            full = time.monotonic()
            fill()
            load.wait_for("3 requests refused after the disk filled",
                          lambda done: sum(o.status == 503 and o.started > full + 0.5 for o in done) >= 3)
            freed = time.monotonic()
            free()
            load.wait_for("6 requests served after the disk was freed",
                          lambda done: served_count(done, after=freed + 0.5) >= 6)
            outcomes = load.stop()
            bridge_log = bridge.log()
            served = served_ids(proxy.db, {o.request_id for o in outcomes if o.status == 200})
        finally:
            load.stop()
            proxy.stop()
    assert not load.errors, load.errors[:3]
    refused, spanning = check_fail_closed(outcomes, bridge_log, served, lost=full, down=(full + 0.5, freed),
                                          back=freed + 0.5, what="usage disk full")
    record("Usage disk full under load", "faults",
           "503 usage_unavailable with Retry-After while the store could not be written, no refused request "
           "forwarded; requests in flight metered once there was room; service back by itself",
           how="16 MiB tmpfs filled (ENOSPC)",
           clients=6, requests=len(outcomes), refused_503=len(refused), served_across_the_fill=len(spanning),
           metered=len(served))


@pytest.mark.parametrize("store", ["read-only disk", "PostgreSQL not running"], ids=["read-only-disk", "no-postgresql"])
def test_a_proxy_whose_usage_store_cannot_be_opened_does_not_start_and_says_why(store, tmp_path):
    """Nothing would be metered, so nothing may be served: the start fails, naming USAGE_DB and the cause."""
    if store == "read-only disk":
        folder = tmp_path / "ro"
        folder.mkdir()
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)],
                               capture_output=True, text=True)
        if mount.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {mount.stderr.strip()}")
        db, cause = str(folder / "usage.db"), "unable to open database file"
    else:
        folder, db, cause = None, f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", "Connection refused"
    (tmp_path / "api-keys.json").write_text('{"keys": []}')
    try:
        run = subprocess.run([sys.executable, "-m", "auth_proxy"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "AUTH_HOST": "127.0.0.1", "AUTH_PORT": str(free_port()),
                                  "AUTH_METRICS_PORT": "0", "API_KEYS_FILE": str(tmp_path / "api-keys.json"),
                                  "USAGE_DB": db, "USAGE_JSON": "", "BRIDGE_URL": "http://127.0.0.1:9"})
    finally:
        if folder is not None:
            subprocess.run(["umount", "-l", str(folder)], check=False)
    assert run.returncode != 0
    said = run.stderr[-3000:]
    assert f"cannot open the usage store (USAGE_DB={redact(db)})" in said and cause in said, said
    record(f"Usage store cannot be opened at start ({store})", "faults",
           "the proxy does not start; its log names USAGE_DB and the cause", cause=cause)
