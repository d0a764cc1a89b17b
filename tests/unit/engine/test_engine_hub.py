"""Adapters and bases given as Hub repo ids resolve offline from a local HF cache layout."""
from __future__ import annotations

import shutil

import pytest

from lorry.engine import EngineConfig, LLMEngine, LoRAError, LoRARequest, SamplingParams

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo_id: str, src) -> None:
    """Lay ``src`` out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(src, root / "snapshots" / COMMIT)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_base_and_adapter_from_offline_hub_cache(tiny_llama, offline_cache):
    _cache_repo(offline_cache, "tiny-org/tiny-llama", tiny_llama.dir)
    _cache_repo(offline_cache, "tiny-org/qv-adapter", tiny_llama.adapters["qv_r8"])
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    hub = LLMEngine(EngineConfig(model="tiny-org/tiny-llama", max_loras=1, max_lora_rank=8))
    local = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=1, max_lora_rank=8))
    a = hub.generate("hello", sp, LoRARequest("qv", 1, "tiny-org/qv-adapter"), use_tqdm=False)
    b = local.generate("hello", sp, LoRARequest("qv", 1, str(tiny_llama.adapters["qv_r8"])),
                       use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert hub.list_loras()["gpu"] == [1]


def test_unknown_hub_adapter_is_a_clear_error(tiny_llama, offline_cache):
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=1, max_lora_rank=8))
    with pytest.raises(LoRAError, match="tiny-org/missing.*could not be fetched"):
        eng.add_lora(LoRARequest("m", 1, "tiny-org/missing", revision="v1"))
    assert eng.cache_stats()["cpu"]["residents"] == 0
