"""The proxy in front of the real bridge: the real openai client, keys, CORS, limits, usage."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import BECKETT_TEXT, ROOT, free_port
from tests.helpers import assert_openai_error, wer
from tests.reliability import record

ALLOWED = "http://toolbar.example"


def add_key(keys_file: Path, name: str, *args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "auth_proxy", "keys", "add", name, *args], cwd=ROOT,
                         env={**os.environ, "API_KEYS_FILE": str(keys_file)}, capture_output=True, text=True,
                         check=True)
    return run.stdout.strip()


class ProxyProcess:
    def __init__(self, bridge_url: str, work: Path, *, wrap: tuple[str, ...] = (), **env: str) -> None:
        """``wrap``: a command the proxy runs under (e.g. strace and its options)."""
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.keys_file = work / "api-keys.json"
        self.db = work / "usage.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = work / "proxy.log"
        full = {**os.environ, "AUTH_HOST": "127.0.0.1", "AUTH_PORT": str(self.port), "BRIDGE_URL": bridge_url,
                "AUTH_METRICS_PORT": str(self.metrics_port),
                "API_KEYS_FILE": str(self.keys_file), "USAGE_DB": str(self.db),
                "USAGE_JSON": str(work / "usage.json"), "CORS_ORIGINS": ALLOWED, "TMPDIR": str(work), **env}
        self._log = self.log_path.open("ab")
        self.wrapped = bool(wrap)
        self.proc = subprocess.Popen([*wrap, sys.executable, "-m", "auth_proxy"], cwd=ROOT, env=full,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/health", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(self.log_path.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            # Under a wrapper the proxy is its child, and the wrapper ends with it.
            for target in psutil.Process(self.proc.pid).children() if self.wrapped else [self.proc]:
                target.send_signal(sig)
            self.proc.wait(60)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def proxy(bridge, tmp_path_factory):
    work = tmp_path_factory.mktemp("proxy")
    keys_file = work / "api-keys.json"
    keys = {name: add_key(keys_file, name, *args) for name, args in {
        "alice": (), "bob": (), "root": ("--admin",), "slow": ("--rpm", "2"),
        "thrifty": ("--audio-seconds-per-day", "5"),
    }.items()}
    p = ProxyProcess(bridge.url, work)
    p.keys = keys
    yield p
    p.stop()


def client(proxy, key: str | None = None, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key or proxy.keys["alice"], **kw)


def test_openai_client_every_response_format(proxy, beckett):
    c = client(proxy)
    with beckett.open("rb") as fh:
        t = c.audio.transcriptions.create(model="whisper-1", file=fh)
    assert wer(BECKETT_TEXT, t.text) <= 0.1
    for fmt in ("text", "srt", "vtt"):
        with beckett.open("rb") as fh:
            out = c.audio.transcriptions.create(model="whisper-1", file=fh, response_format=fmt)
        assert isinstance(out, str) and "fail better" in out.lower()
    with beckett.open("rb") as fh:
        v = c.audio.transcriptions.create(model="whisper-1", file=fh, response_format="verbose_json")
    assert v.duration == pytest.approx(9.96, abs=0.05) and v.segments and v.segments[0].end > 0


def test_openai_client_streams_through_the_proxy(proxy, beckett):
    c = client(proxy)
    with beckett.open("rb") as fh:
        events = list(c.audio.transcriptions.create(model="whisper-1", file=fh, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and "".join(deltas) == done[0].text
    assert wer(BECKETT_TEXT, done[0].text) <= 0.1


def test_models_and_switch_through_the_client(proxy):
    c = client(proxy)
    ids = [m.id for m in c.models.list()]
    assert "moonshine-base-en" in ids
    with pytest.raises(openai.PermissionDeniedError):  # a switch changes the model for every key
        c.post("/models/switch", body={"model_id": "moonshine-base-en"}, cast_to=httpx.Response)
    admin = client(proxy, proxy.keys["root"])
    r = admin.post("/models/switch", body={"model_id": "moonshine-base-en"}, cast_to=httpx.Response)
    assert r.status_code == 200 and r.json()["model"] == "moonshine-base-en"


def test_wrong_or_missing_key(proxy, beckett):
    with pytest.raises(openai.AuthenticationError) as exc:
        client(proxy, "sk-mvp-wrong").models.list()
    assert exc.value.code == "invalid_api_key"
    assert_openai_error(httpx.get(proxy.url + "/v1/models"), 401, "invalid_api_key")
    # /health needs no key
    assert httpx.get(proxy.url + "/health").status_code == 200


def test_rate_limit_429_with_retry_after(proxy):
    c = client(proxy, proxy.keys["slow"], max_retries=0)
    c.models.list()
    c.models.list()
    with pytest.raises(openai.RateLimitError) as exc:
        c.models.list()
    headers = exc.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"


def test_daily_audio_quota_stops_the_sdk_from_retrying(proxy, beckett):
    c = client(proxy, proxy.keys["thrifty"])  # default: 2 retries
    with beckett.open("rb") as fh:
        c.audio.transcriptions.create(model="whisper-1", file=fh)  # 10 s > the 5 s quota: now used up
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as exc, beckett.open("rb") as fh:
        c.audio.transcriptions.create(model="whisper-1", file=fh)
    assert exc.value.code == "insufficient_quota"
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert time.monotonic() - started < 5  # no retries
    root = httpx.get(proxy.url + "/v1/usage", params={"key": "thrifty"},
                     headers={"Authorization": f"Bearer {proxy.keys['root']}"}).json()
    assert [t["requests"] for t in root["totals"]] == [2]


def test_cors_preflights(proxy):
    stainless = "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-package-version," \
                "x-stainless-runtime,x-stainless-arch,x-stainless-retry-count,x-stainless-timeout"
    ok = httpx.options(proxy.url + "/v1/audio/transcriptions", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": stainless})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ALLOWED
    allowed_headers = ok.headers["access-control-allow-headers"].lower()
    for h in stainless.split(","):
        assert h in allowed_headers
    assert "access-control-allow-credentials" not in ok.headers
    bad = httpx.options(proxy.url + "/v1/audio/transcriptions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": stainless})
    assert "access-control-allow-origin" not in bad.headers
    simple = httpx.get(proxy.url + "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_usage_totals_match_requests_and_audio(proxy, beckett, tmp_path):
    key = proxy.keys["bob"]
    short = tmp_path / "short.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(beckett), "-t", "3", str(short)],
                   check=True)
    seconds = 0.0
    for path in (beckett, short, beckett):
        with path.open("rb") as fh:
            r = httpx.post(proxy.url + "/v1/audio/transcriptions", files={"file": fh},
                           headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200
        seconds += r.json()["usage"]["seconds"]
    body = httpx.get(proxy.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert [(t["key_name"], t["requests"]) for t in body["totals"]] == [("bob", 3)]
    assert body["totals"][0]["audio_seconds"] == pytest.approx(seconds, abs=0.01)
    assert {r["model"] for r in body["records"]} == {"moonshine-base-en"}
    # Filter by time: nothing before the epoch's first second.
    empty = httpx.get(proxy.url + "/v1/usage", params={"until": 1},
                      headers={"Authorization": f"Bearer {key}"}).json()
    assert empty["totals"] == []
    bad = httpx.get(proxy.url + "/v1/usage", params={"since": "yesterday"}, headers={"Authorization": f"Bearer {key}"})
    assert assert_openai_error(bad, 400, "invalid_value")["param"] == "since"
    # Non-admins see only themselves; admins see everyone.
    denied = httpx.get(proxy.url + "/v1/usage", params={"key": "alice"}, headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(denied, 403)
    with short.open("rb") as fh:  # alice's own request, so that this test does not lean on the others'
        assert httpx.post(proxy.url + "/v1/audio/transcriptions", files={"file": fh}, timeout=60,
                          headers={"Authorization": f"Bearer {proxy.keys['alice']}"}).status_code == 200
    everyone = httpx.get(proxy.url + "/v1/usage", headers={"Authorization": f"Bearer {proxy.keys['root']}"}).json()
    assert {"bob", "alice"} <= {t["key_name"] for t in everyone["totals"]}
    # usage.json, the human-readable export, catches up within a few seconds.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        export = json.loads((proxy.work / "usage.json").read_text()) if (proxy.work / "usage.json").exists() else {}
        if any(k["key_name"] == "bob" and k["requests"] == 3 for k in export.get("keys", [])):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("usage.json did not catch up")


def test_key_file_hot_reload_malformed_and_revoke(proxy):
    new_key = add_key(proxy.keys_file, "carol")
    c = client(proxy, new_key, max_retries=0)
    deadline = time.monotonic() + 10
    while True:
        try:
            c.models.list()
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    good = proxy.keys_file.read_text()
    proxy.keys_file.write_text("{ this is not json")
    time.sleep(1.5)
    c.models.list()  # last good version kept
    assert "malformed" in proxy.log_path.read_text()
    proxy.keys_file.write_text(good)
    subprocess.run([sys.executable, "-m", "auth_proxy", "keys", "revoke", "carol"], cwd=ROOT, check=True,
                   env={**os.environ, "API_KEYS_FILE": str(proxy.keys_file)}, capture_output=True)
    time.sleep(1.5)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    assert new_key not in proxy.keys_file.read_text() and new_key not in proxy.log_path.read_text()


def test_plaintext_key_written_by_hand_is_hashed(proxy):
    data = json.loads(proxy.keys_file.read_text())
    data["keys"].append({"name": "handwritten", "key": "sk-handwritten-0123456789"})
    proxy.keys_file.write_text(json.dumps(data))
    deadline = time.monotonic() + 10
    while True:
        status = httpx.get(proxy.url + "/v1/models",
                           headers={"Authorization": "Bearer sk-handwritten-0123456789"}).status_code
        if status == 200 and "sk-handwritten-0123456789" not in proxy.keys_file.read_text():
            break
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert "plaintext keys" in proxy.log_path.read_text()


def test_nothing_is_answered_before_its_usage_record_is_on_disk(bridge, tmp_path):
    """The pending usage record is fsync'd while the bridge works, and the answer waits for that
    fsync. Under strace, every fsync returns only after 1.5 s, far longer than the bridge takes to
    answer: each request's answer must still leave after the fsync of the WAL that follows its
    record's write has returned."""
    import re

    trace = tmp_path / "strace.log"
    p = ProxyProcess(bridge.url, tmp_path / "p", wrap=(
        "strace", "-f", "-qq", "-s", "8192", "-o", str(trace), "-e", "trace=openat,fsync,pwrite64,write,writev,sendto",
        "-e", "inject=fsync:delay_exit=1500000"))
    try:
        key = add_key(p.keys_file, "frank")
        time.sleep(1.2)
        ids = [f"durable-{i}-{os.getpid()}" for i in range(3)]
        waits: list[float] = []
        for request_id in ids:
            started = time.monotonic()
            r = httpx.get(p.url + "/v1/models", headers={"Authorization": f"Bearer {key}", "x-request-id": request_id},
                          timeout=30)
            assert r.status_code == 200 and r.headers["x-request-id"] == request_id
            waits.append(time.monotonic() - started)
            assert waits[-1] >= 1.4  # the answer waited for the fsync
    finally:
        p.stop()
    lines = trace.read_text(errors="replace").splitlines()
    wal_fds = {m.group(1) for line in lines if "usage.db-wal" in line and "openat(" in line
               for m in [re.search(r"= (\d+)", line)] if m}
    assert wal_fds, "the usage store's WAL was never opened"
    synced = [i for i, line in enumerate(lines)  # where an fsync of the WAL returned
              if re.search(r"fsync\((\d+)\)\s+= 0", line) and re.search(r"fsync\((\d+)", line).group(1) in wal_fds
              or "<... fsync resumed>" in line and "= 0" in line]
    for request_id in ids:
        written = next(i for i, line in enumerate(lines) if "pwrite64(" in line and request_id in line)
        answered = next(i for i, line in enumerate(lines)
                        if re.search(r"(write|writev|sendto)\(", line) and "HTTP/1.1 200" in line
                        and f"x-request-id: {request_id}" in line)
        assert any(written < i < answered for i in synced), \
            f"{request_id}: answered (line {answered}) before its record (line {written}) was on disk"
    record("Slow disk under the usage store", "faults",
           "each answer left only after the fsync that put its request's usage record on disk had returned",
           how="every fsync held 1.5 s (strace fault injection)", requests=len(ids), waited_s=round(min(waits), 2))


def test_uploads_stream_through_without_buffering(proxy, tmp_path):
    rss_before = psutil.Process(proxy.proc.pid).memory_info().rss
    body = os.urandom(25 * 1024 * 1024)
    r = httpx.post(proxy.url + "/v1/audio/transcriptions", files={"file": ("noise.bin", body)},
                   headers={"Authorization": f"Bearer {proxy.keys['alice']}"}, timeout=120)
    assert_openai_error(r, 400, "invalid_audio")  # reached the bridge, which refused it
    growth = psutil.Process(proxy.proc.pid).memory_info().rss - rss_before
    assert growth < 10 * 1024 * 1024, growth


def bridge_uploads_answered(bridge) -> float:
    """How many transcription requests the bridge has answered (its Prometheus counter)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(bridge.metrics_url, timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "stt_bridge_requests"
               for s in f.samples if s.name.endswith("_total") and s.labels.get("route") == "/v1/audio/transcriptions")


def test_oversized_bodies_are_refused_before_forwarding(proxy, bridge):
    """A body over the cap gets 413 from the proxy itself: nothing reaches the bridge, and a chunked
    body (no length to refuse up front) is spooled to disk only up to the cap."""
    from tests.helpers import Watcher

    auth = {"Authorization": f"Bearer {proxy.keys['alice']}"}
    forwarded = bridge_uploads_answered(bridge)
    r = httpx.post(proxy.url + "/v1/audio/transcriptions", files={"file": ("big", b"\0" * (26 * 1024 * 1024))},
                   headers=auth, timeout=60)
    assert_openai_error(r, 413, "file_too_large")

    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        for _ in range(27):
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--b--\r\n"

    with Watcher({}, {"spool": proxy.work}) as watched:
        r = httpx.post(proxy.url + "/v1/audio/transcriptions", content=chunks(), timeout=60,
                       headers={**auth, "content-type": "multipart/form-data; boundary=b"})
    assert_openai_error(r, 413, "file_too_large")
    assert not list(proxy.work.glob("auth-upload-*"))  # spooled chunked upload removed
    assert watched.peak_bytes["spool"] <= 26 * 1024 * 1024, watched.peak_bytes  # the cap (25 MiB) and a chunk
    assert bridge_uploads_answered(bridge) == forwarded  # neither body reached the bridge


def test_bridge_down_gives_503_and_the_sdk_retries(tmp_path):
    p = ProxyProcess(f"http://127.0.0.1:{free_port()}", tmp_path / "p")
    try:
        key = add_key(p.keys_file, "dave")
        time.sleep(1.2)
        h = httpx.get(p.url + "/health")
        assert h.status_code == 503 and h.headers["retry-after"]
        c = openai.OpenAI(base_url=p.url + "/v1", api_key=key, max_retries=1)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as exc:
            c.models.list()
        assert exc.value.status_code == 503 and exc.value.response.headers["retry-after"]
        assert time.monotonic() - started >= 4  # the SDK honoured Retry-After: 5 once
        rows = sqlite3.connect(p.db).execute("SELECT COUNT(*), MIN(status) FROM usage").fetchone()
        assert rows == (2, 503)
    finally:
        p.stop()


def test_sigterm_under_load_loses_no_usage_record(bridge, beckett, tmp_path):
    p = ProxyProcess(bridge.url, tmp_path / "p")
    key = add_key(p.keys_file, "erin")
    time.sleep(1.2)

    def one(_: int) -> int:
        try:
            with beckett.open("rb") as fh:
                return httpx.post(p.url + "/v1/audio/transcriptions", files={"file": fh},
                                  headers={"Authorization": f"Bearer {key}"}, timeout=120).status_code
        except httpx.HTTPError:
            return 0

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        time.sleep(1.0)
        p.proc.send_signal(signal.SIGTERM)
        statuses = [f.result() for f in futures]
    assert p.proc.wait(60) == 0
    p.stop()
    answered = statuses.count(200)
    assert answered >= 1, statuses
    rows = sqlite3.connect(p.db).execute("SELECT COUNT(*) FROM usage WHERE status = 200").fetchone()[0]
    assert rows == answered, (statuses, rows)


def test_openai_stream_of_a_long_file_through_the_proxy(proxy, tmp_path):
    from tests.speech import HARVARD, festival_wav, have_festival, read_wav16, write_wav16

    if not have_festival():
        pytest.skip("festival/sox not installed")
    import numpy as np

    gap = np.zeros(8000, dtype=np.float32)
    sentences = (HARVARD * 3)[:30]
    audio = np.concatenate([x for s in sentences for x in (read_wav16(festival_wav(s)), gap)])
    assert len(audio) / 16000 > 65  # several 30 s pieces
    path = write_wav16(tmp_path / "long.wav", audio)
    c = client(proxy)
    arrivals: list[tuple[float, object]] = []
    started = time.monotonic()
    with path.open("rb") as fh:
        for event in c.audio.transcriptions.create(model="whisper-1", file=fh, stream=True):
            arrivals.append((time.monotonic() - started, event))
    deltas = [(t, e) for t, e in arrivals if e.type == "transcript.text.delta"]
    done = [(t, e) for t, e in arrivals if e.type == "transcript.text.done"]
    assert len(deltas) >= 3 and len(done) == 1
    assert "".join(e.delta for _, e in deltas) == done[0][1].text
    assert deltas[0][0] < done[0][0] - 1.0  # the first piece arrived well before the last was done
    assert wer(" ".join(sentences), done[0][1].text) <= 0.15
