"""A small soak: scripts/soak.py with 300 jobs over 20 adapters and 3 tenants and at least one
kill -9 of a worker (every 4-6 s, the first one at the latest once 30 jobs are done, so that
a fast machine cannot drain the queue before it); it must report lost = 0 and duplicated = 0."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_small_soak_loses_and_duplicates_nothing():
    out = subprocess.run(
        [sys.executable, "scripts/soak.py", "--jobs", "300", "--adapters", "20", "--tenants",
         "3", "--workers", "2", "--max-tokens", "4", "--kill-every", "4", "6",
         "--first-kill-after", "30",
         "--timeout", "300", "--seed", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=480, check=False)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, (report, out.stderr[-3000:])
    assert report["jobs"] == 300 and report["kills"] >= 1
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert report["statuses"] == {"succeeded": 300} and report["output_lines"] == 300
