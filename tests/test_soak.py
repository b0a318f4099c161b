"""Soak: many requests through proxy and bridge; nothing lost, memory steady. Run with --run-slow."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.test_proxy import ProxyProcess, add_key

pytestmark = pytest.mark.slow


def test_soak_through_the_proxy(bridge, beckett, tmp_path):
    p = ProxyProcess(bridge.url, tmp_path / "p")
    try:
        key = add_key(p.keys_file, "soak")
        import time

        time.sleep(1.2)
        data = beckett.read_bytes()
        formats = ["json", "text", "srt", "vtt", "verbose_json"]

        def one(i: int) -> int:
            with httpx.Client(timeout=300) as c:
                return c.post(p.url + "/v1/audio/transcriptions", files={"file": ("b.wav", data)},
                              data={"response_format": formats[i % len(formats)]},
                              headers={"Authorization": f"Bearer {key}"}).status_code

        bridge_proc = psutil.Process(bridge.proc.pid)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(16)))  # warm-up
            rss_before = bridge_proc.memory_info().rss
            statuses = list(pool.map(one, range(200)))
        assert statuses == [200] * 200
        growth = (bridge_proc.memory_info().rss - rss_before) / 2**20
        assert growth < 50, f"bridge RSS grew {growth:.0f} MB over 200 requests"
        usage = httpx.get(p.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
        assert usage["totals"][0]["requests"] == 216
        assert bridge.health()["requests_in_flight"] == 0
    finally:
        p.stop()
