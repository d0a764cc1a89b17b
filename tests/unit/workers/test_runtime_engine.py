"""A worker's engine compiles its kernel variants before the first drain, on CUDA only and
unless LORRY_COMPILE_KERNELS=false (a compile mid-drain stalls every running job ~1 s)."""
from __future__ import annotations

import types

import pytest

from lorry.settings import Settings
from lorry.workers import runtime


class _Engine:
    def __init__(self, device: str):
        self.device = types.SimpleNamespace(type=device)
        self.compiled = 0

    def compile_kernels(self, use_tqdm=True):
        self.compiled += 1
        return {"steps": 3, "seconds": 0.5, "by": {}}


@pytest.mark.parametrize("device,flag,want", [("cuda", True, 1), ("cuda", False, 0),
                                              ("cpu", True, 0)])
def test_build_engine_compiles_the_kernels_on_cuda_unless_turned_off(device, flag, want,
                                                                     monkeypatch):
    import lorry.engine
    made = []
    monkeypatch.setattr(lorry.engine, "LLMEngine",
                        lambda config: made.append(_Engine(device)) or made[-1])
    settings = Settings(compile_kernels=flag)
    engine = runtime.build_engine(settings)
    assert engine is made[0] and engine.compiled == want


def test_the_setting_reads_lorry_compile_kernels(monkeypatch):
    monkeypatch.setenv("LORRY_COMPILE_KERNELS", "false")
    assert Settings().compile_kernels is False


def test_a_failed_warm_up_leaves_the_worker_serving(monkeypatch, caplog):
    import lorry.engine

    class Failing(_Engine):
        def compile_kernels(self, use_tqdm=True):
            raise RuntimeError("out of memory in a probe")
    monkeypatch.setattr(lorry.engine, "LLMEngine", lambda config: Failing("cuda"))
    with caplog.at_level("WARNING"):
        engine = runtime.build_engine(Settings())
    assert isinstance(engine, Failing)
    assert "kernel warm-up failed (RuntimeError: out of memory in a probe)" in caplog.text
