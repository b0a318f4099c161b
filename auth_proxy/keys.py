"""API keys in ``api-keys.json``: only a sha256 of each key is stored, plus a display prefix,
creation time and limits.

The file is reloaded when it changes; a malformed new version is logged and the last good one
kept. A plaintext key written by hand (``{"name": ..., "key": "sk-..."}``) still works: it is
hashed on load and the file rewritten atomically without it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("auth_proxy.keys")

KEY_PREFIX = "sk-mvp-"


@dataclass
class ApiKey:
    id: str
    name: str
    prefix: str
    sha256: str
    created: float
    admin: bool = False
    rpm: int | None = None
    audio_seconds_per_day: float | None = None


class KeyFileError(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _parse(raw: str) -> tuple[list[ApiKey], bool]:
    """Returns the keys and whether plaintext keys were found (and hashed)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise KeyFileError(f"not JSON: {exc}") from exc
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError('expected {"keys": [...]}')
    keys: list[ApiKey] = []
    had_plaintext = False
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise KeyFileError(f"entry {i} needs a name")
        if "key" in entry:  # plaintext, written by hand
            plain = str(entry.pop("key"))
            entry.setdefault("sha256", hash_key(plain))
            entry.setdefault("prefix", plain[:10])
            had_plaintext = True
        if not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
            raise KeyFileError(f"entry {i} ({entry['name']}) needs a sha256")
        try:
            keys.append(ApiKey(
                id=str(entry.get("id") or entry["sha256"][:12]),
                name=entry["name"],
                prefix=str(entry.get("prefix", "")),
                sha256=entry["sha256"],
                created=_number(entry.get("created", 0)),
                admin=bool(entry.get("admin", False)),
                rpm=int(entry["rpm"]) if entry.get("rpm") is not None else None,
                audio_seconds_per_day=(_number(entry["audio_seconds_per_day"])
                                       if entry.get("audio_seconds_per_day") is not None else None),
            ))
        except (TypeError, ValueError) as exc:
            raise KeyFileError(f"entry {i} ({entry['name']}): {exc}") from exc
    return keys, had_plaintext


def _number(value: object) -> float:
    """A number from the file, kept as written (an int stays an int: a rewrite changes no byte of it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"not a number: {value!r}")
    return value if isinstance(value, int) else float(value)


def write_keys(path: Path, keys: list[ApiKey]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"keys": [asdict(k) for k in keys]}, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    try:
        os.replace(tmp, path)
    except OSError:
        # A file bind-mounted on its own (compose: ./api-keys.json:/config/api-keys.json) cannot be
        # replaced by rename; rewrite it in place. A reader that catches it half-written keeps the
        # last good version and reloads on the next change.
        path.write_text(tmp.read_text())
        tmp.unlink()


def read_keys(path: Path) -> list[ApiKey]:
    path = Path(path)
    if not path.exists():
        return []
    keys, had_plaintext = _parse(path.read_text())
    if had_plaintext:
        write_keys(path, keys)
        log.warning("%s held plaintext keys: they were hashed and the file rewritten without them", path)
    return keys


class KeyStore:
    """The keys the proxy accepts; ``authenticate`` re-reads the file when it changed."""

    def __init__(self, path: Path, check_every: float = 1.0) -> None:
        self.path = Path(path)
        self.check_every = check_every
        self._keys: list[ApiKey] = []
        self._by_hash: dict[str, ApiKey] = {}
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.reload(force=True)

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime, st.st_size)

    def reload(self, force: bool = False) -> None:
        with self._lock:
            stamp = self._file_stamp()
            if not force and stamp == self._stamp:
                return
            try:
                keys = read_keys(self.path)
            except (KeyFileError, OSError) as exc:
                log.error("%s is malformed (%s); keeping the last good version (%d keys)",
                          self.path, exc, len(self._keys))
                self._stamp = stamp
                return
            self._keys = keys
            self._by_hash = {k.sha256: k for k in keys}
            self._stamp = self._file_stamp()
            log.info("loaded %d API key(s) from %s", len(keys), self.path)

    def authenticate(self, presented: str) -> ApiKey | None:
        now = time.monotonic()
        if now - self._checked >= self.check_every:
            self._checked = now
            self.reload()
        digest = hash_key(presented)
        found = None
        # Constant-time comparison against every key: timing says nothing about which matched.
        for known, key in list(self._by_hash.items()):
            if hmac.compare_digest(known, digest):
                found = key
        return found

    def __len__(self) -> int:
        return len(self._keys)


def add_key(path: Path, name: str, *, admin: bool, rpm: int | None, audio_seconds_per_day: float | None) -> str:
    keys = read_keys(path)
    if any(k.name == name for k in keys):
        raise KeyFileError(f"a key named {name!r} exists; revoke it first or pick another name")
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(plain)
    keys.append(ApiKey(id=digest[:12], name=name, prefix=plain[:12], sha256=digest, created=time.time(),
                       admin=admin, rpm=rpm, audio_seconds_per_day=audio_seconds_per_day))
    write_keys(path, keys)
    return plain


def revoke_key(path: Path, name: str) -> bool:
    keys = read_keys(path)
    kept = [k for k in keys if k.name != name]
    if len(kept) == len(keys):
        return False
    write_keys(path, kept)
    return True
