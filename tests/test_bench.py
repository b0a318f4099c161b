"""``python -m bench --quick``: the one benchmark command runs end to end and its table parses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PATHS = ["in-process OfflineRecognizer", "raw sherpa-onnx WebSocket", "bridge", "proxy + bridge",
         "bridge, instant engine", "proxy + bridge, instant engine"]


def parse_table(text: str) -> dict[tuple[str, int], dict[str, float]]:
    all_lines = text.splitlines()
    start = next(i for i, line in enumerate(all_lines) if line.startswith("| "))
    lines = []  # the first table only (the hours rows have a table of their own)
    for line in all_lines[start:]:
        if not line.startswith("| "):
            break
        lines.append(line)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1].startswith("| ---")
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        values = dict(zip(head, cells, strict=True))
        rows[(values["path"], int(values["concurrency"]))] = {k: float(v) for k, v in values.items() if k != "path"}
    return rows


def run_bench(out: Path, *args: str, **env: str) -> str:
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-3000:]
    files = list(out.glob("*-quick*.md"))
    assert len(files) == 1 and files[0].read_text() in run.stdout  # printed and written alike
    return files[0].read_text()


@pytest.mark.slow  # over 2 minutes on 2 cores (8 in-process recognizers); the --url path runs by default
def test_python_m_bench_quick_prints_and_writes_one_table(tmp_path, models_dir):
    text = run_bench(tmp_path, MODELS_DIR=str(models_dir), DEFAULT_MODEL="moonshine-base-en")
    rows = parse_table(text)
    assert set(rows) == {(p, c) for p in PATHS for c in (1, 4, 8)}
    for (path, c), row in rows.items():
        assert row["requests"] >= c and 0 < row["p50 ms"] <= row["p95 ms"], (path, c, row)
        assert row["audio s/s"] > 0 and row["peak RSS MB"] > 0, (path, c, row)
    # What the instant engine shows is the bridge's own cost: far below a real engine's time.
    assert rows[("bridge, instant engine", 1)]["p50 ms"] < rows[("bridge", 1)]["p50 ms"] / 3
    for ratio in ("bridge / raw at concurrency 1", "proxy / bridge at concurrency 8"):
        match = re.search(re.escape(ratio) + r": p50 latency ([\d.]+), throughput ([\d.]+)", text)
        assert match and all(0.2 < float(v) < 5 for v in match.groups()), ratio
    # The proxy's own cost, in front of the stand-in's bridge: a few milliseconds, never a second.
    match = re.search(r"the proxy's own cost at concurrency 1: p50 ([+-][\d.]+) ms", text)
    assert match and -50 < float(match.group(1)) < 1000
    match = re.search(r"30 s upload through bridge: [\d.]+ s, real-time factor ([\d.]+)", text)
    assert match and 0 < float(match.group(1)) < 2
    # Hours of audio (here half a minute and a minute): a time and a peak memory for each length.
    hours = re.findall(r"\| ([\d.]+) min \| ([\d.]+) s, (\d+), \+(-?\d+) MB \|", text)
    assert [h[0] for h in hours] == ["0.5", "1"] and all(float(h[1]) > 0 for h in hours), hours
