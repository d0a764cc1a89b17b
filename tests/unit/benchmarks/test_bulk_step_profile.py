"""benchmarks/bulk.py's step profile: where a bulk run's step time goes (read from the GPU runs'
JSON; a wrong fit or a missed slow step would send the next session after the wrong cause)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
bulk = pytest.importorskip("bulk")


def test_prompt_steps_fit_tokens_and_rows_and_the_slow_ones_stand_out():
    # 40 prompt-bearing steps at 20 ms + 25 ms per 1k tokens + 0.05 ms per decode row, two of
    # them 400 ms slower (a compile, say), one writing adapters; 30 decode calls of 4 device
    # steps at 10 ms each, one 300 ms slower
    rec = [True]
    for i in range(40):
        tok, rows = 500 + 150 * i, (i * 7) % 256
        ms = 20 + 0.025 * tok + 0.05 * rows + (400 if i in (5, 30) else 0)
        rec.append((ms, tok, rows, 1, int(i == 5)))
    for i in range(30):
        rec.append((40.0 + (300 if i == 3 else 0), 0, 200, 4, 0))
    p = bulk.step_profile(rec)
    pb = p["prompt_bearing"]
    assert pb["steps"] == 40 and pb["slow_steps"] == 2
    assert {w["at"] for w in pb["worst"][:2]} == {5, 30}     # places in the records
    assert pb["worst"][0]["ms"] - pb["worst"][0]["fit_ms"] > 300
    assert pb["steps_writing_adapters"] == 1 and pb["mean_excess_ms_writing"] > 300
    # fitted again without the two slow steps: the per-token cost, intercept and row cost
    assert pb["fit_ms"]["per_1k_tokens"] == pytest.approx(25.0, abs=0.01)
    assert pb["fit_ms"]["intercept"] == pytest.approx(20.0, abs=0.05)
    assert pb["fit_ms"]["per_decode_row"] == pytest.approx(0.05, abs=1e-3)
    assert pb["fit_ms"]["r2"] > 0.999
    assert sum(b["steps"] for b in pb["by_tokens"]) == 40
    d = p["decode"]
    assert d["calls"] == 30 and d["device_steps"] == 120
    assert d["ms_per_device_step"]["median"] == 10.0
    assert d["slow_calls"] == 1 and d["slow_excess_seconds"] == pytest.approx(0.3)
