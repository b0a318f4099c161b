"""Resource bounds through the proxy: a 25 MiB upload (with Content-Length and chunked) and 64
uploads at once each hold bounded memory and temporary disk in both services, leave no file
behind, and the in-flight caps of both answer 503 with Retry-After."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import Watcher
from tests.reliability import record
from tests.speech import ffmpeg_convert
from tests.test_proxy import ProxyProcess, add_key

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def bounded(bridge, tmp_path_factory):
    work = tmp_path_factory.mktemp("bounds")
    tmp = work / "tmp"
    tmp.mkdir()
    key = add_key(work / "api-keys.json", "user")
    proxy = ProxyProcess(bridge.url, work, TMPDIR=str(tmp), MAX_IN_FLIGHT="48")
    proxy.key, proxy.tmpdir = key, tmp
    yield proxy
    proxy.stop()


def watch(proxy, bridge) -> Watcher:
    engine = bridge.health()["engine_pid"]
    return Watcher({"proxy": (proxy.proc.pid, set()), "bridge": (bridge.proc.pid, {engine})},
                   {"proxy": proxy.tmpdir, "bridge": bridge.tmpdir})


def test_a_25_mib_upload_holds_bounded_memory_and_disk(bounded, bridge, tmp_path):
    # 135 s of quiet 48 kHz stereo noise as 16-bit WAV: just under 25 MiB, and nothing to transcribe.
    path = tmp_path / "big.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "anoisesrc=r=48000:a=0.002:c=pink",
                    "-ac", "2", "-t", "135", "-c:a", "pcm_s16le", str(path)], check=True)
    size = path.stat().st_size
    assert 24 * MiB < size < 25 * MiB
    auth = {"Authorization": f"Bearer {bounded.key}"}
    figures = {}
    for mode in ("content-length", "chunked"):
        with watch(bounded, bridge) as w:
            if mode == "content-length":
                with path.open("rb") as fh:
                    r = httpx.post(bounded.url + "/v1/audio/transcriptions", files={"file": fh}, headers=auth,
                                   timeout=120)
            else:
                def body():
                    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
                    with path.open("rb") as fh:
                        while chunk := fh.read(256 * 1024):
                            yield chunk
                    yield b"\r\n--b--\r\n"

                r = httpx.post(bounded.url + "/v1/audio/transcriptions", content=body(), timeout=120,
                               headers={**auth, "content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 200, r.text
        assert float(r.headers["x-audio-seconds"]) == pytest.approx(135, abs=0.1)
        print(f"\n{mode}: proxy +{w.growth('proxy'):.1f} MB, temp {w.peak_bytes['proxy'] / MiB:.1f} MiB; "
              f"bridge +{w.growth('bridge'):.1f} MB, temp {w.peak_bytes['bridge'] / MiB:.1f} MiB")
        # The proxy never holds the body in memory; it spools a chunked one to disk (to check the
        # cap before forwarding), a declared one streams straight through.
        assert w.growth("proxy") < 15, f"the proxy grew by {w.growth('proxy'):.0f} MB for one upload"
        if mode == "content-length":
            assert w.peak_bytes["proxy"] == 0
        else:
            assert 0.9 * size < w.peak_bytes["proxy"] <= size + 64 * 1024
        # The bridge keeps the upload on disk twice (the form's spool, an unnamed file, and the
        # decoder's copy), and the decoded 16 kHz audio (4.3 MB of 16-bit samples) in an unnamed file.
        assert w.peak_bytes["bridge"] <= 2 * size + 135 * 32000 + 64 * 1024
        assert w.growth("bridge") < 80, f"the bridge grew by {w.growth('bridge'):.0f} MB for one upload"
        assert w.folder_bytes("proxy") == 0 and w.folder_bytes("bridge") == 0  # nothing left behind
        figures[mode] = (f"proxy +{w.growth('proxy'):.1f} MB RSS, {w.peak_bytes['proxy'] / MiB:.1f} MiB temp; "
                         f"bridge +{w.growth('bridge'):.1f} MB RSS, {w.peak_bytes['bridge'] / MiB:.1f} MiB temp")
    record("25 MiB upload", "bounds", "200; no body held in memory by the proxy, at most one copy on disk "
           "in the proxy, two and the decoded audio in the bridge, every temporary file removed",
           upload_mib=f"{size / MiB:.1f}", **figures)


def test_64_uploads_at_once_are_bounded_and_the_caps_answer_503(bounded, bridge, beckett, tmp_path):
    clip = ffmpeg_convert(beckett, tmp_path / "b.mp3", "-t", "4", "-b:a", "64k").read_bytes()
    auth = {"Authorization": f"Bearer {bounded.key}"}
    start = threading.Barrier(64)

    def one(_: int) -> httpx.Response:
        with httpx.Client(timeout=120) as client:
            start.wait()
            return client.post(bounded.url + "/v1/audio/transcriptions", files={"file": ("b.mp3", clip)},
                               headers=auth)

    with watch(bounded, bridge) as w, ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(one, range(64)))
    statuses = [r.status_code for r in answers]
    refused = [r for r in answers if r.status_code == 503]
    by_proxy = [r for r in refused if "in flight" in r.json()["error"]["message"]]
    by_bridge = [r for r in refused if "busy" in r.json()["error"]["message"]]
    print(f"\n64 at once: {statuses.count(200)} answered, {len(by_proxy)} refused by the proxy (MAX_IN_FLIGHT=48), "
          f"{len(by_bridge)} by the bridge (32); proxy +{w.growth('proxy'):.1f} MB, bridge +{w.growth('bridge'):.1f} "
          f"MB; temp peaks {w.peak_bytes['proxy']} / {w.peak_bytes['bridge']} bytes")
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 16
    assert all(r.json()["error"]["code"] == "overloaded" and float(r.headers["retry-after"]) > 0 for r in refused)
    assert len(by_proxy) + len(by_bridge) == len(refused)
    assert by_proxy and by_bridge, "each service's in-flight cap should have refused some"
    assert w.growth("proxy") < 40 and w.growth("bridge") < 250
    # Each upload on disk, and the decoded audio of those in flight (4 s of 16-bit samples each).
    assert w.peak_bytes["proxy"] == 0 and w.peak_bytes["bridge"] <= 64 * len(clip) + 32 * 4 * 32000 + MiB
    assert w.folder_bytes("bridge") == 0
    assert bridge.health()["requests_in_flight"] == 0
    record("64 uploads at once", "bounds", "answered or refused with 503 overloaded + Retry-After by the cap "
           "of the service that was full; memory bounded, nothing left on disk",
           answered=statuses.count(200), refused_by_proxy=len(by_proxy), refused_by_bridge=len(by_bridge),
           proxy_rss_growth_mb=round(w.growth("proxy"), 1), bridge_rss_growth_mb=round(w.growth("bridge"), 1))
