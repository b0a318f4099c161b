"""Writes docs/reliability.md from what the reliability tests observed in their latest run.

    .venv/bin/python scripts/reliability_report.py          # from the records of the last test run
    .venv/bin/python scripts/reliability_report.py --run    # run those tests first (add --run-slow: the long ones)

Each test of load, faults, resource bounds, attacks and fuzzing writes its case, the outcome and
its figures to .cache/reliability/ once its assertions have passed (tests/reliability.py); a case
whose test failed or did not run has no fresh record, and the document says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reliability import RESULTS  # noqa: E402 - after the path is set

TESTS = ["tests/test_load.py", "tests/test_faults.py", "tests/test_usage_outage.py", "tests/test_bounds.py",
         "tests/test_bad_inputs.py::test_audio_longer_than_the_limit_is_refused_without_decoding_it_all",
         "tests/test_proxy_attacks.py", "tests/test_fuzz.py"]
SECTIONS = [("load", "Load"), ("faults", "Faults during load"), ("bounds", "Resource bounds"),
            ("attacks", "Attacks on the proxy"), ("fuzzing", "Fuzzing")]
OUT = ROOT / "docs" / "reliability.md"


def run_tests(extra: list[str]) -> int:
    shutil.rmtree(RESULTS, ignore_errors=True)
    started = time.monotonic()
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *extra],
                        cwd=ROOT).returncode
    print(f"tests finished in {time.monotonic() - started:.0f} s with exit code {rc}")
    return rc


def cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(records: list[dict], rc: int | None) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    newest = max((r["when"] for r in records), default="-")
    lines = [
        "# Reliability: load, faults, bounds, attacks and fuzzing",
        "",
        "Written by `scripts/reliability_report.py` from the latest run of the tests that observe each case",
        f"(commit {commit}; newest record {newest}; {os.cpu_count()} cores, Python {platform.python_version()},",
        "the Moonshine model on CPU, everything on loopback). Each row is written by its test once the test's",
        "assertions have passed, so a row is what was observed, not what was hoped. Run it again with",
        "`.venv/bin/python scripts/reliability_report.py --run` (`--run-slow` adds the 2-minute load run and",
        "longer fuzzing).",
        "",
    ]
    if rc not in (None, 0):
        lines += [f"**The test run ended with exit code {rc}: a case whose test failed has no row below.**", ""]
    for section, title in SECTIONS:
        rows = [r for r in records if r["section"] == section]
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["No case recorded in this run.", ""]
            continue
        lines += ["| Case | Observed | Figures | Test |", "| --- | --- | --- | --- |"]
        for r in sorted(rows, key=lambda r: r["case"]):
            figures = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in r["figures"].items()) or "-"
            lines.append(f"| {cell(r['case'])} | {cell(r['outcome'])} | {cell(figures)} | `{cell(r['test'])}` |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the reliability tests first")
    args, extra = parser.parse_known_args()
    rc = run_tests(extra) if args.run else None
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))] if RESULTS.is_dir() else []
    if not records:
        print(f"no records in {RESULTS}: run the tests first (--run)", file=sys.stderr)
        return 1
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render(records, rc))
    print(f"wrote {OUT.relative_to(ROOT)}: {len(records)} cases")
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
