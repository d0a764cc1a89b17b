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


class _Engine:
    """An engine's step counters (LLMEngine._steps) and GPU slot misses, stepped by a script:
    each entry what one step() does to them."""

    def __init__(self, script):
        self._steps = {"prefill": {"steps": 0, "tokens": 0, "rows": 0},
                       "decode": {"steps": 0, "rows": 0}}
        self.loras = type("Loras", (), {})()
        self.loras.gpu = type("Gpu", (), {"misses": 0})()
        self.script = list(script)

    def step(self):
        kind, n, tokens, rows, misses = self.script.pop(0)
        if kind:
            c = self._steps[kind]
            c["steps"] += n
            c["rows"] += rows
            if kind == "prefill":
                c["tokens"] += tokens
        self.loras.gpu.misses += misses
        return []

    def cache_stats(self):
        return {"steps": self._steps}


def test_progress_records_each_step_as_the_engine_counted_it():
    # a warm-up step (before recording), a prompt step with 3 decode rows and an adapter
    # write, a round of 4 decode steps of 5 rows, a step that ran nothing (a load wait)
    eng = _Engine([("prefill", 1, 99, 0, 0), ("prefill", 1, 700, 3, 1),
                   ("decode", 4, 0, 20, 0), (None, 0, 0, 0, 0)])
    record = bulk._progress(eng, "test", every=1e9)
    eng.step()
    record[0] = True
    for _ in range(3):
        eng.step()
    steps = [r[1:] for r in record[1:]]
    assert steps == [(700, 3, 1, 1), (0, 5, 4, 0)]      # tokens, rows, device steps, writes
    assert all(r[0] >= 0 for r in record[1:])
