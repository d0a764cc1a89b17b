"""Drain-loop tests: the real engine on a tiny model and the real queue on SQLite."""
from __future__ import annotations

import pytest

from lorry.testing import make_peft_adapter, make_tiny_llama


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model dir, {adapter name: dir}) with adapters of different ranks and targets."""
    root = tmp_path_factory.mktemp("drain")
    model = make_tiny_llama(root / "tiny-llama")
    adapters = {"alpha": make_peft_adapter(model, root / "alpha", r=8, seed=1),
                "beta": make_peft_adapter(model, root / "beta", r=16, seed=2,
                                          target_modules="all-linear")}
    return model, adapters


@pytest.fixture(scope="session")
def engine(tiny):
    from lorry.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=str(tiny[0]), device="cpu", max_loras=2,
                                  max_lora_rank=16, max_cpu_loras=4, max_num_seqs=4,
                                  max_model_len=128))


@pytest.fixture
def queue(tmp_path, tiny):
    from lorry.scheduler import JobQueue

    q = JobQueue(f"sqlite:///{tmp_path / 'drain.db'}")
    for name, path in tiny[1].items():
        q.register_adapter(name, str(path), rank=8)
    yield q
    q.close()
