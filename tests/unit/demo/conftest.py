"""Fixtures of the demo-adapter tests: one CPU engine and one mixed batch over the held-out prompts."""
from __future__ import annotations

import pytest
from demo_checks import ADAPTERS_DIR, CHECKS, make_engine, run_all
from demo_data import held_out_prompts

NAMES = sorted(CHECKS)


@pytest.fixture(scope="module")
def demo_engine():
    return make_engine()


@pytest.fixture(scope="module")
def held_out_answers(demo_engine):
    """{None (base) or adapter name: [answer per held-out prompt]}, from one mixed batch."""
    missing = [n for n in NAMES if not (ADAPTERS_DIR / n / "adapter_model.safetensors").is_file()]
    assert not missing, f"demo adapters {missing} are missing under {ADAPTERS_DIR}; run " \
                        "scripts/train_demo_adapters.py"
    return run_all(demo_engine, held_out_prompts(), NAMES)
