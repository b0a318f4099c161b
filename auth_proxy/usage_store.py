"""Durable usage metering: one record per request, in SQLite (WAL) or PostgreSQL.

``USAGE_DB`` is a file path for SQLite (one proxy) or a ``postgresql://`` URL (several proxy
replicas sharing one database). Each record is committed before the proxy finishes the response,
so a proxy stopped with SIGTERM loses nothing it answered. ``usage.json`` is a human-readable
summary written atomically from the database.

A forwarded request is metered in two steps: ``begin`` writes its record (status 0, pending)
before anything is forwarded, so that when the store cannot be written the proxy refuses the
request (503) rather than serve it unmetered; ``complete`` fills in the outcome. A PostgreSQL
connection that was lost is opened again on the next call.

Durability: ``record`` and ``complete`` are on disk when they return. ``begin`` returns once the
row is written, and ``sync`` puts it on disk: the proxy runs that fsync while the bridge works,
and answers nothing before it is done. SQLite runs in WAL mode with ``synchronous=NORMAL`` (no
fsync at each commit), and ``sync`` is an fsync of the WAL file, which is what ``synchronous=FULL``
does at each commit (where WAL mode is refused, every commit is synced as with FULL); PostgreSQL
commits are durable when they return.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id {pk},
    request_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_name TEXT NOT NULL,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    status INTEGER NOT NULL,
    audio_seconds DOUBLE PRECISION NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    created DOUBLE PRECISION NOT NULL
)
"""
INDEX = "CREATE INDEX IF NOT EXISTS usage_key_created ON usage (key_id, created)"
COLUMNS = "request_id, key_id, key_name, model, route, status, audio_seconds, latency_ms, created"


@dataclass
class UsageRecord:
    request_id: str
    key_id: str
    key_name: str
    model: str
    route: str
    status: int
    audio_seconds: float
    latency_ms: float
    created: float


class UsageStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self._lock = threading.Lock()
        if self.postgres:
            import psycopg

            self._conn: Any = psycopg.connect(url, autocommit=True)
            self._param = "%s"
            pk = "BIGSERIAL PRIMARY KEY"
        else:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(url, check_same_thread=False, isolation_level=None, timeout=30)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # In WAL mode the fsync of a commit is ``sync``'s; where WAL is refused (some network
            # file systems), every commit is synced as it is made.
            self._wal: str | None = f"{url}-wal" if str(mode).lower() == "wal" else None
            self._conn.execute(f"PRAGMA synchronous={'NORMAL' if self._wal else 'FULL'}")
            self._param = "?"
            pk = "INTEGER PRIMARY KEY AUTOINCREMENT"
        with self._lock:
            self._conn.execute(SCHEMA.format(pk=pk))
            self._conn.execute(INDEX)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self._param)

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement under the lock and return its rows; PostgreSQL: a lost connection is
        opened again, once per call."""
        with self._lock:
            try:
                return _rows(self._conn.execute(self._sql(sql), params))
            except Exception as exc:
                if not self.postgres or (not self._conn.closed and not _connection_lost(exc)):
                    raise
                import psycopg

                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001 - it is gone already
                    pass
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                return _rows(self._conn.execute(self._sql(sql), params))

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._execute(sql, params)

    def begin(self, rec: UsageRecord) -> int:
        """Write a request's record before it is served (status 0 until ``complete``); its row id."""
        rows = self._execute(f"INSERT INTO usage ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                             tuple(asdict(rec).values()))
        return int(rows[0][0])

    def sync(self) -> None:
        """Every write made so far on disk. SQLite: an fsync of the WAL (committed transactions are
        appended there; a checkpoint that moved them into the database file has synced both)."""
        if self.postgres or self._wal is None:
            return
        with self._lock:
            fd = os.open(self._wal, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def complete(self, row: int, *, status: int, model: str, audio_seconds: float, latency_ms: float) -> None:
        self._execute("UPDATE usage SET status = ?, model = ?, audio_seconds = ?, latency_ms = ? WHERE id = ?",
                      (status, model, audio_seconds, latency_ms, row))
        self.sync()

    def record(self, rec: UsageRecord) -> None:
        self._execute(f"INSERT INTO usage ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", tuple(asdict(rec).values()))
        self.sync()

    @staticmethod
    def _where(key_id: str | None, since: float | None, until: float | None) -> tuple[str, tuple[Any, ...]]:
        clauses: list[str] = []
        params: list[Any] = []
        if key_id is not None:
            clauses.append("key_id = ?")
            params.append(key_id)
        if since is not None:
            clauses.append("created >= ?")
            params.append(since)
        if until is not None:
            clauses.append("created < ?")
            params.append(until)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", tuple(params)

    def totals(self, key_id: str | None = None, since: float | None = None,
               until: float | None = None) -> list[dict[str, Any]]:
        where, params = self._where(key_id, since, until)
        rows = self._query(
            "SELECT key_id, key_name, COUNT(*), COALESCE(SUM(audio_seconds), 0), "
            f"SUM(CASE WHEN status < 400 THEN 1 ELSE 0 END) FROM usage{where} GROUP BY key_id, key_name "
            "ORDER BY key_name", params)
        return [{"key_id": r[0], "key_name": r[1], "requests": int(r[2]), "audio_seconds": round(float(r[3]), 3),
                 "succeeded": int(r[4])} for r in rows]

    def records(self, key_id: str | None = None, since: float | None = None, until: float | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
        where, params = self._where(key_id, since, until)
        rows = self._query(f"SELECT {COLUMNS} FROM usage{where} ORDER BY created DESC LIMIT ?", (*params, limit))
        names = [c.strip() for c in COLUMNS.split(",")]
        return [dict(zip(names, r, strict=True)) for r in rows]

    def audio_seconds_since(self, key_id: str, since: float) -> float:
        rows = self._query("SELECT COALESCE(SUM(audio_seconds), 0) FROM usage WHERE key_id = ? AND created >= ?",
                           (key_id, since))
        return float(rows[0][0])

    def export_json(self, path: Path) -> None:
        """Write the human-readable summary atomically."""
        summary = {"generated": time.time(), "keys": self.totals()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _connection_lost(exc: Exception) -> bool:
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


def _rows(cursor: Any) -> list[tuple[Any, ...]]:
    return list(cursor.fetchall()) if cursor.description else []
