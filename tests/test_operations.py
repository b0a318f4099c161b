"""What an operator relies on: Prometheus metrics scraped by a real Prometheus, a request id shared by
both services' logs, one access line per request (JSON with LOG_FORMAT=json), and no API key in
any log line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BridgeProcess, bridge_env, free_port
from tests.helpers import transcribe
from tests.test_bench import parse_table, run_bench
from tests.test_proxy import ProxyProcess, add_key

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="module")
def stack(models_dir: Path, catalog_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A bridge and a proxy of their own (counts start at zero), both logging JSON lines."""
    work = tmp_path_factory.mktemp("ops")
    bridge = BridgeProcess(bridge_env(models_dir, catalog_file, LOG_FORMAT="json", ENGINE_CONNECTIONS="2",
                                      SHERPA_NUM_THREADS="1"), work / "bridge.log")
    try:
        bridge.wait_ready()
        keys_file = work / "proxy" / "api-keys.json"
        keys_file.parent.mkdir()
        key = add_key(keys_file, "ops")
        proxy = ProxyProcess(bridge.url, work / "proxy", LOG_FORMAT="json")
        try:
            yield {"bridge": bridge, "proxy": proxy, "key": key}
        finally:
            proxy.stop()
    finally:
        bridge.stop()


def json_lines(log: str) -> list[dict]:
    lines = [line for line in log.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line parses, or this raises


def access_lines(log: str) -> list[dict]:
    return [e for e in json_lines(log) if e["logger"].endswith(".access")]


def lines_of(read: Callable[[], str], request_id: str) -> list[dict]:
    """The access lines of one request (written once its response has ended: wait a moment)."""
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in access_lines(read()) if e["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_metrics_have_a_port_of_their_own(stack):
    proxy, bridge = stack["proxy"], stack["bridge"]
    assert proxy.metrics_port != proxy.port
    r = httpx.get(proxy.metrics_url)  # no key needed there
    assert r.status_code == 200 and "stt_proxy_requests_total" in r.text
    assert httpx.get(proxy.url + "/metrics").status_code in (401, 404)
    assert httpx.get(proxy.url + "/metrics", headers={"Authorization": f"Bearer {stack['key']}"}).status_code == 404
    r = httpx.get(bridge.metrics_url)
    assert r.status_code == 200 and "stt_bridge_engine_ready" in r.text
    assert httpx.get(bridge.url + "/metrics").status_code == 404


def test_one_request_id_in_both_logs_and_the_response(stack, beckett):
    proxy, bridge, key = stack["proxy"], stack["bridge"], stack["key"]
    rid = f"toolbar-{uuid.uuid4().hex[:12]}"
    r = transcribe(proxy.url, beckett, headers={"Authorization": f"Bearer {key}", "x-request-id": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    proxy_line = lines_of(proxy.log_path.read_text, rid)
    bridge_line = lines_of(bridge.log, rid)
    assert len(proxy_line) == 1 and len(bridge_line) == 1  # one line per request on each service
    for line in proxy_line + bridge_line:
        assert line["status"] == 200 and line["model"] == "moonshine-base-en"
        assert line["audio_seconds"] == pytest.approx(9.96, abs=0.05) and line["latency_ms"] > 0
    assert proxy_line[0]["key"] == "ops"
    # An id that could forge log lines is replaced by one of the proxy's own, passed on the same way.
    r = httpx.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {key}", "x-request-id": "a b\tc"})
    new_id = r.headers["x-request-id"]
    assert r.status_code == 200 and new_id != "a b\tc" and new_id.isalnum()
    assert lines_of(bridge.log, new_id) and lines_of(proxy.log_path.read_text, new_id)


def test_refused_keys_are_logged_by_prefix_and_no_key_reaches_a_log(stack, beckett):
    proxy, bridge, key = stack["proxy"], stack["bridge"], stack["key"]
    wrong = "sk-mvp-" + uuid.uuid4().hex + uuid.uuid4().hex
    r = httpx.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {wrong}"})
    assert r.status_code == 401
    line = lines_of(proxy.log_path.read_text, r.headers["x-request-id"])
    assert len(line) == 1 and line[0]["status"] == 401
    assert wrong.startswith(line[0]["key_hint"].rstrip("…")) and len(line[0]["key_hint"]) <= 13
    r = transcribe(proxy.url, beckett, headers={"Authorization": f"Bearer {key}"}, stream="true")
    assert r.status_code == 200
    for log in (proxy.log_path.read_text(), bridge.log()):
        assert key not in log and wrong not in log
        for secret in (key, wrong):  # nor most of one
            assert secret[:20] not in log


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed")
def test_a_real_prometheus_scrapes_both_services(stack, beckett, tmp_path):
    proxy, bridge, key = stack["proxy"], stack["bridge"], stack["key"]
    before = {**scrape(bridge.metrics_url), **scrape(proxy.metrics_url)}
    auth = {"Authorization": f"Bearer {key}"}
    for _ in range(2):
        assert transcribe(proxy.url, beckett, headers=auth).status_code == 200
    assert httpx.get(proxy.url + "/v1/models", headers={"Authorization": "Bearer sk-nope-000000000000"}
                     ).status_code == 401

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": "mvp-bridge", "static_configs": [{"targets": [f"127.0.0.1:{bridge.metrics_port}"]}]},
            {"job_name": "mvp-auth", "static_configs": [{"targets": [f"127.0.0.1:{proxy.metrics_port}"]}]},
        ],
    }))
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def query(expr: str) -> float | None:
        r = httpx.get(api, params={"query": expr}, timeout=5)
        result = r.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def settled(expr: str, expected: float, tolerance: float = 1e-6) -> float | None:
        deadline = time.monotonic() + 60
        value = None
        while time.monotonic() < deadline:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                value = query(expr)
            except (httpx.HTTPError, KeyError, ValueError):
                value = None
            if value is not None and abs(value - expected) <= tolerance:
                return value
            time.sleep(0.5)
        return value

    try:
        assert settled('up{job="mvp-bridge"}', 1) == 1
        assert settled('up{job="mvp-auth"}', 1) == 1
        route = 'route="/v1/audio/transcriptions"'
        for name, added, tolerance in (
            (f'stt_proxy_requests_total{{{route},status="200",key="ops"}}', 2, 0),
            ('stt_proxy_requests_total{route="/v1/models",status="401",key="-"}', 1, 0),
            (f'stt_proxy_request_duration_seconds_count{{{route}}}', 2, 0),
            ('stt_proxy_audio_seconds_total{key="ops"}', 2 * 9.96, 0.1),
            (f'stt_bridge_requests_total{{{route},status="200"}}', 2, 0),
            ('stt_bridge_audio_seconds_total{model="moonshine-base-en"}', 2 * 9.96, 0.1),
            ('stt_bridge_real_time_factor_count{model="moonshine-base-en"}', 2, 0),
        ):
            expected = before.get(canonical(name), 0.0) + added
            assert settled(name, expected, tolerance + 1e-6) == pytest.approx(expected, abs=tolerance + 1e-6), name
        # A histogram: a quantile from the buckets of the proxy's latency.
        p50 = query(f'histogram_quantile(0.5, sum by (le) (stt_proxy_request_duration_seconds_bucket{{{route}}}))')
        assert p50 is not None and 0 < p50 < 60
        assert settled('stt_bridge_engine_ready{model="moonshine-base-en"}', 1) == 1
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()


def scrape(url: str) -> dict[str, float]:
    """The samples of one /metrics page, by ``canonical`` name{labels}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url).text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[canonical(f"{sample.name}{{{labels}}}")] = sample.value
    return out


def canonical(series: str) -> str:
    """name{b="2",a="1"} -> name{a="1",b="2"}: one spelling for a series."""
    name, _, labels = series.partition("{")
    return f"{name}{{{','.join(sorted(labels.rstrip('}').split(',')))}}}" if labels else name


def test_bench_measures_a_running_deployment(stack, tmp_path):
    """``python -m bench --url --key``: the same audio and table against a deployment's proxy."""
    proxy = stack["proxy"]
    before = scrape(proxy.metrics_url)
    rows = parse_table(run_bench(tmp_path, "--url", proxy.url, "--key", stack["key"]))
    assert set(rows) == {("deployment (proxy)", c) for c in (1, 4, 8)}
    assert all(row["p50 ms"] > 0 and row["audio s/s"] > 0 for row in rows.values())
    # Every request really went through the deployment, with the key: the first warm-up, one more
    # per concurrency level, the rows, the long upload.
    after = scrape(proxy.metrics_url)
    name = canonical('stt_proxy_requests_total{route="/v1/audio/transcriptions",status="200",key="ops"}')
    warm_ups = 1 + (1 + 4 + 8)
    assert after[name] - before.get(name, 0) == warm_ups + sum(int(r["requests"]) for r in rows.values()) + 1


def test_the_bridge_turns_off_onnxruntime_telemetry(tmp_path):
    """onnxruntime (the VAD's runtime) reports usage to Microsoft from Linux since 1.32: at import it
    writes a session file in the temp folder and a device id under ~/.cache. The bridge's package
    turns that off before onnxruntime loads, unless the operator asked for it."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    # onnxruntime keeps quiet on its own where it sees a CI system: the test runs as a server would.
    ci = {"CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL", "CODEBUILD_BUILD_ID",
          "BUILDKITE", "TEAMCITY_VERSION"}
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY" and k not in ci}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    load = ("from bridge.silero import SileroModel; from bridge.vad import find_vad_model; "
            "SileroModel(find_vad_model(None))")
    subprocess.run([sys.executable, "-c", load], env=env, check=True)
    assert list(home.rglob("*")) == [] and list(tmp.rglob("*")) == []
    # The same without the bridge's default: what onnxruntime does on its own (so the check above holds).
    bare = "import onnxruntime"
    subprocess.run([sys.executable, "-c", bare], env=env, check=True)
    if not list(tmp.rglob("*")) and not list(home.rglob("*")):
        pytest.skip("this onnxruntime writes no telemetry files (built without it, or before 1.32)")
