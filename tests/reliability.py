"""What the reliability tests observed, for ``docs/reliability.md``.

Each test of load, faults, bounds and attacks calls :func:`record` once its assertions have passed,
with the case's name, the outcome in words and the figures it measured. The records of the latest
run land in ``.cache/reliability/`` (one JSON file per case, or ``RELIABILITY_RESULTS``), and
``scripts/reliability_report.py`` writes the document from them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("RELIABILITY_RESULTS", ROOT / ".cache" / "reliability"))


def record(case: str, section: str, outcome: str, **figures: object) -> None:
    """``section``: load, faults, bounds, attacks or fuzzing; ``figures``: names to numbers or words."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    entry = {"case": case, "section": section, "outcome": outcome, "figures": figures, "test": test,
             "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    slug = "".join(c if c.isalnum() else "-" for c in case.lower()).strip("-")
    (RESULTS / f"{slug}.json").write_text(json.dumps(entry, indent=1, default=str))
