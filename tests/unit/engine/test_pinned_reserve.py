"""EngineConfig.pinned_reserve_mb: the size of the pinned segment reserved for adapter staging
buffers, and how it is handed to torch's host allocator (the CUDA effect: the *_cuda tests)."""
from __future__ import annotations

import pytest

from lorry.engine import EngineConfig, LLMEngine, LoRARequest
from lorry.engine.lora import pinned_reserve
from lorry.engine.lora.pinned_reserve import MIB, auto_mb, power_of_two, reserve, staging_bytes


def test_staging_bytes_is_what_an_adapter_on_every_module_stages(tiny_llama):
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), device="cpu", max_loras=2,
                                 max_lora_rank=16, max_cpu_loras=8))
    layout, dtype = eng.loras.gpu.layout, eng.dtype
    sizes = {}
    for i, name in enumerate(tiny_llama.adapters):
        req = LoRARequest(name, i + 1, str(tiny_llama.adapters[name]))
        eng.add_lora(req)
        sizes[name] = eng.loras.cpu.peek(req).nbytes
    # all_r4_rslora targets every linear module at rank 4: exactly the bound at rank 4
    assert sizes["all_r4_rslora"] == staging_bytes(layout, 4, dtype)
    # the bound at max_lora_rank covers every adapter the engine can load, and is tight for
    # one of that rank on every module (mlp_r16 touches three of the seven)
    bound = staging_bytes(layout, 16, dtype)
    assert max(sizes.values()) <= bound
    assert sizes["mlp_r16"] < bound


def test_auto_size_rounds_as_the_allocator_and_keeps_to_a_quarter_of_host_memory():
    assert [power_of_two(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]
    # 200 adapters of 100 MiB + 1 byte each: 200 blocks of 128 MiB
    assert auto_mb(200, 100 * MIB + 1, host_bytes=None) == 200 * 128
    assert auto_mb(200, 100 * MIB + 1, host_bytes=64 * 1024 * MIB) == 16 * 1024
    assert auto_mb(3, 10, host_bytes=None) == 1      # whole MiB, never 0 for some adapters


def torch_like_setter(calls: list):
    """A setter that records its settings and refuses what torch's CUDA allocator config
    refuses: a reserve that is not a whole number > 0."""
    def set_(settings: str) -> None:
        for item in settings.split(","):
            key, _, value = item.partition(":")
            if key == pinned_reserve.KEY and not (value.isdigit() and int(value) > 0):
                raise ValueError("Pinned reserve segment size has to be greater than 0")
        calls.append(settings)
    return set_


@pytest.fixture
def fresh(monkeypatch):
    """A process that has made no decision yet, no allocator settings in the environment
    (and a torch that does not tell its own), and a recording setter in place of torch's."""
    calls = []
    monkeypatch.setattr(pinned_reserve, "_process", {})
    for key in pinned_reserve.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(pinned_reserve, "_torch_settings", lambda: None)
    monkeypatch.setattr(pinned_reserve, "_setter", lambda: torch_like_setter(calls))
    monkeypatch.setattr(pinned_reserve, "_pin_first", lambda: calls.append("pinned"))
    return calls


def test_reserve_is_set_once_per_process_with_the_operators_other_settings(fresh,
                                                                           monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert reserve(None, adapters=8, one_bytes=3 * MIB) == {"mb": 32, "how": "set"}
    # set, then made at once by a first pinned allocation (not inside the first load)
    assert fresh == ["expandable_segments:True,pinned_reserve_segment_size_mb:32", "pinned"]
    # the segment is one per process: a second engine is told, and sets nothing
    assert reserve(512, adapters=8, one_bytes=MIB) == {"mb": 32, "how": "first engine (set)"}
    assert len(fresh) == 2


def test_an_explicit_size_and_off(fresh, monkeypatch):
    assert reserve(100, adapters=8, one_bytes=3 * MIB) == {"mb": 100, "how": "set"}
    assert fresh == ["pinned_reserve_segment_size_mb:100", "pinned"]
    monkeypatch.setattr(pinned_reserve, "_process", {})
    assert reserve(0, adapters=8, one_bytes=3 * MIB) == {"mb": 0, "how": "off"}
    assert len(fresh) == 2


def test_the_operators_own_reserve_wins(fresh, monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "pinned_reserve_segment_size_mb:2048")
    assert reserve(None, adapters=8, one_bytes=3 * MIB) == {"mb": 2048, "how": "environment"}
    assert fresh == []


def test_a_setting_torch_refuses_is_reported_and_loads_go_on_without(monkeypatch):
    monkeypatch.setattr(pinned_reserve, "_process", {})
    for key in pinned_reserve.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(pinned_reserve, "_torch_settings", lambda: None)

    def refuse(_):
        raise RuntimeError("unrecognized key")
    monkeypatch.setattr(pinned_reserve, "_setter", lambda: refuse)
    got = reserve(64, adapters=8, one_bytes=MIB)
    assert got == {"mb": 0, "how": "not set: unrecognized key"}


def test_a_segment_the_host_cannot_pin_is_asked_for_no_more(fresh, monkeypatch):
    # torch makes the segment at the first pinned allocation and tries again at every later
    # one while that fails: the setting goes down to the smallest torch takes (it refuses 0),
    # made at once, so loads pin their own buffers
    def pin():
        if fresh[-1].endswith(":1048576"):
            raise RuntimeError("CUDA error: out of memory")
        fresh.append("pinned")
    monkeypatch.setattr(pinned_reserve, "_pin_first", pin)
    got = reserve(1 << 20, adapters=8, one_bytes=MIB)
    assert got["mb"] == 0 and got["how"].startswith("not set: pinning 1048576 MiB failed")
    assert "failed too" not in got["how"]
    assert fresh == ["pinned_reserve_segment_size_mb:1048576",
                     "pinned_reserve_segment_size_mb:1", "pinned"]


def test_the_settings_torch_holds_are_kept_beside_the_reserve(fresh, monkeypatch):
    # what torch parsed (a variable it preferred, or a setting made at run time) is what a
    # new setting must repeat: torch resets the settings a new string leaves out
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setattr(pinned_reserve, "_torch_settings",
                        lambda: "garbage_collection_threshold:0.6")
    assert reserve(64, adapters=8, one_bytes=MIB) == {"mb": 64, "how": "set"}
    assert fresh == ["garbage_collection_threshold:0.6,pinned_reserve_segment_size_mb:64",
                     "pinned"]


def test_without_torchs_own_the_variable_torch_reads_first_is_used(fresh, monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.6")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "pinned_reserve_segment_size_mb:8")
    assert reserve(64, adapters=8, one_bytes=MIB) == {"mb": 64, "how": "set"}
    assert fresh[0] == "garbage_collection_threshold:0.6,pinned_reserve_segment_size_mb:64"


@pytest.mark.parametrize("bad", [-1, True, 1.5, "64"])
def test_engine_config_refuses_a_bad_reserve(bad):
    with pytest.raises(ValueError, match="pinned_reserve_mb"):
        EngineConfig(model="m", pinned_reserve_mb=bad)


def test_workers_take_the_reserve_from_lorry_settings(monkeypatch):
    from lorry.settings import Settings

    monkeypatch.setenv("LORRY_PINNED_RESERVE_MB", "0")
    assert Settings().engine_config().pinned_reserve_mb == 0
    monkeypatch.delenv("LORRY_PINNED_RESERVE_MB")
    assert Settings().engine_config().pinned_reserve_mb is None


def test_the_automatic_cap_is_shared_by_the_hosts_gpus(monkeypatch):
    # one worker per GPU: eight workers each taking a quarter would pin twice the host
    monkeypatch.setattr(pinned_reserve.os, "sysconf",
                        {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (512 << 30) // 4096}.get)
    monkeypatch.setattr(pinned_reserve, "host_gpus", lambda: 8)
    assert pinned_reserve.host_memory_bytes() == 64 << 30
    assert auto_mb(200, 100 * MIB, pinned_reserve.host_memory_bytes()) == 16 * 1024
