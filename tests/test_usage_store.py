"""The usage store behaves the same on SQLite and on a real PostgreSQL server started here."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from auth_proxy.usage_store import UsageRecord, UsageStore
from tests.conftest import free_port


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


class PostgresServer:
    """A private PostgreSQL cluster on a free loopback port, run as the 'postgres' user; stop()
    and start() it to play an outage."""

    def __init__(self) -> None:
        bindir = _pg_bin()
        if bindir is None:
            pytest.skip("PostgreSQL store NOT tested: no PostgreSQL server binaries (apt-get install postgresql)")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL store NOT tested: no 'postgres' system user to run the server as")
        self.bindir = bindir
        # Not under pytest's tmp root: that is private to root, and the server runs as 'postgres'.
        self.base = Path(tempfile.mkdtemp(prefix="mvp-pg-"))
        self.data = self.base / "data"
        os.chmod(self.base, 0o777)
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*self.run_as, f"{bindir}/initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def start(self) -> None:
        subprocess.run([*self.run_as, f"{self.bindir}/pg_ctl", "-D", str(self.data), "-w", "-l",
                        str(self.base / "pg.log"), "-o", f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1",
                        "start"], check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run([*self.run_as, f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = UsageStore(str(tmp_path / "usage.db"))
    else:
        url = request.getfixturevalue("postgres_url")
        s = UsageStore(url)
        with s._lock:
            s._conn.execute("TRUNCATE usage")
    yield s
    s.close()


def rec(key: str, seconds: float, created: float, status: int = 200) -> UsageRecord:
    return UsageRecord(request_id=f"r{created}", key_id=key, key_name=key.upper(), model="m",
                       route="/v1/audio/transcriptions", status=status, audio_seconds=seconds, latency_ms=12.5,
                       created=created)


def test_totals_records_filters_and_quota_sums(store, tmp_path):
    now = time.time()
    for i in range(5):
        store.record(rec("a", 1.5, now - i))
    store.record(rec("a", 0.0, now, status=429))
    store.record(rec("b", 10.0, now - 100_000))
    totals = {t["key_id"]: t for t in store.totals()}
    assert totals["a"]["requests"] == 6 and totals["a"]["succeeded"] == 5
    assert totals["a"]["audio_seconds"] == pytest.approx(7.5)
    assert totals["b"]["audio_seconds"] == pytest.approx(10.0)
    assert [t["key_id"] for t in store.totals(since=now - 50_000)] == ["a"]
    assert store.totals(key_id="b", until=now - 200_000) == []
    assert len(store.records(key_id="a", limit=3)) == 3
    assert store.audio_seconds_since("a", now - 2.5) == pytest.approx(4.5)
    store.export_json(tmp_path / "usage.json")
    assert '"requests": 6' in (tmp_path / "usage.json").read_text()


def test_records_survive_a_reopen(store, tmp_path):
    store.record(rec("c", 2.0, time.time()))
    again = UsageStore(store.url)
    try:
        assert [t["requests"] for t in again.totals(key_id="c")] == [1]
    finally:
        again.close()
