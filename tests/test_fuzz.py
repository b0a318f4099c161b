"""Property-based fuzzing (schemathesis) of both services against their published OpenAPI schemas:
no 500, and every answer's status, content type and body as the schema documents them. A bridge in
front of the stand-in engine (fuzzing is about the HTTP layer), and the proxy in front of it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import BridgeProcess, bridge_env, start_instant_engine
from tests.reliability import record
from tests.test_proxy import ProxyProcess, add_key

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzzed(models_dir, catalog_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    engine, url = start_instant_engine()
    bridge = BridgeProcess(bridge_env(models_dir, catalog_file, ENGINE_ADAPTER="websocket", ENGINE_URL=url,
                                      SPEED_CHECK="false"), work / "bridge.log")
    proxy = None
    try:
        bridge.wait_ready()
        key = add_key(work / "proxy" / "api-keys.json", "fuzzer", "--admin")
        proxy = ProxyProcess(bridge.url, work / "proxy", AUTH_FAILURES_PER_MINUTE="0")
        yield {"bridge": (bridge, None), "proxy": (proxy, key)}
    finally:
        if proxy is not None:
            proxy.stop()
        bridge.stop()
        engine.terminate()
        engine.wait(10)


def schemathesis(url: str, key: str | None, examples: int, report: Path) -> tuple[int, str]:
    args = [str(Path(sys.executable).parent / "schemathesis"), "run", url + "/openapi.json", "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing", "--max-examples", str(examples), "--workers", "2",
            "--request-timeout", "30", "--seed", "1", "--no-color"]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=report.parent)
    return run.returncode, run.stdout + run.stderr


@pytest.mark.parametrize("service", ["bridge", "proxy"])
def test_fuzzing_finds_no_500_and_no_answer_outside_the_schema(fuzzed, service, request, tmp_path):
    proc, key = fuzzed[service]
    examples = 1000 if request.config.getoption("--run-slow") else 100
    schema = httpx.get(proc.url + "/openapi.json").json()
    assert "/v1/audio/transcriptions" in schema["paths"] and "Error" in schema["components"]["schemas"]
    rc, out = schemathesis(proc.url, key, examples, tmp_path / "report")
    print(out[-3000:])
    assert rc == 0, out[-6000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    assert cases and cases.group(1) == cases.group(2) and int(cases.group(1)) >= 100, out[-2000:]
    assert "Traceback" not in proc.log_path.read_text()  # nothing unexpected in the service either
    operations = len([op for path in schema["paths"].values() for op in path])
    record(f"Fuzzing the {service}", "fuzzing", "no 500, every status, content type and body as documented",
           cases=int(cases.group(1)), operations=operations, checks=CHECKS.replace(",", ", "))
