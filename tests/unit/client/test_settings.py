"""Settings from LORRY_* variables: lists, ~ expansion, engine options checked by EngineConfig's
rules, refusals naming the variable, and no side effects until the edge asks for them."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lorry.engine.config import EngineConfig
from lorry.settings import ENGINE_FIELDS, Settings, get_settings


def test_environment_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("LORRY_ADAPTER_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("LORRY_DATABASE_URL", "sqlite:///~/lorry-settings-test/x.db")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LORRY_MAX_LORAS", "16")
    s = Settings()
    assert s.adapter_roots == [f"{tmp_path}/a", f"{tmp_path}/b"]
    assert s.database_url == f"sqlite:///{tmp_path}/lorry-settings-test/x.db"
    assert s.max_loras == 16
    assert not (tmp_path / "lorry-settings-test").exists()  # building settings creates nothing
    assert get_settings().database_url == s.database_url
    assert (tmp_path / "lorry-settings-test").is_dir()  # the edge's get_settings() does
    monkeypatch.setenv("LORRY_ADAPTER_ROOTS", '["/x", "/y"]')
    assert Settings().adapter_roots == ["/x", "/y"]


def test_defaults_follow_data_and_models_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("LORRY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LORRY_MODELS_DIR", str(tmp_path / "models"))
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path}/data/lorry.db"
    assert s.model == str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    assert str(tmp_path / "data" / "adapters") in s.adapter_roots


def test_every_engine_option_is_a_setting(monkeypatch):
    monkeypatch.setenv("LORRY_QUANTIZATION", "bnb-nf4")
    monkeypatch.setenv("LORRY_ENFORCE_EAGER", "true")
    monkeypatch.setenv("LORRY_LORA_BACKEND", "torch")
    monkeypatch.setenv("LORRY_MAX_NUM_BATCHED_TOKENS", "512")
    monkeypatch.setenv("LORRY_LORA_FOLD", "false")
    monkeypatch.setenv("LORRY_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("LORRY_DTYPE", "bfloat16")
    cfg = Settings(model="/models/base").engine_config()
    assert isinstance(cfg, EngineConfig)
    assert (cfg.quantization, cfg.enforce_eager, cfg.lora_backend, cfg.max_num_batched_tokens,
            cfg.lora_fold, cfg.max_model_len, cfg.dtype) == (
        "bnb-nf4", True, "torch", 512, False, 1024, "bfloat16")
    assert set(ENGINE_FIELDS) <= set(EngineConfig.__dataclass_fields__)


@pytest.mark.parametrize(("var", "value", "named"), [
    ("LORRY_MAX_NUM_SEQS", "0", "max_num_seqs"),
    ("LORRY_QUANTIZATION", "int3", "LORRY_QUANTIZATION='int3' is invalid"),
    ("LORRY_MAX_LORA_RANK", "12", "LORRY_MAX_LORA_RANK=12 is invalid"),
    ("LORRY_LORA_BACKEND", "cuda", "LORRY_LORA_BACKEND='cuda' is invalid"),
    ("LORRY_DTYPE", "float8", "LORRY_DTYPE='float8' is invalid"),
    ("LORRY_ADAPTER_ROOTS", "[/srv/a", "starts with '\\[' but is no JSON list"),
])
def test_bad_values_are_refused_with_the_variable(monkeypatch, var, value, named):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError, match=named):
        Settings()


def test_max_full_module_copies_reaches_engine_config(monkeypatch):
    assert Settings(model="/m").engine_config().max_full_module_copies is None
    monkeypatch.setenv("LORRY_MAX_FULL_MODULE_COPIES", "2")
    assert Settings(model="/m").engine_config().max_full_module_copies == 2
    monkeypatch.setenv("LORRY_MAX_FULL_MODULE_COPIES", "")
    assert Settings(model="/m").max_full_module_copies is None  # empty: no limit
    monkeypatch.setenv("LORRY_MAX_FULL_MODULE_COPIES", "-1")
    with pytest.raises(ValidationError, match="max_full_module_copies"):
        Settings(model="/m")


def test_the_prompt_hold_reaches_engine_config(monkeypatch):
    cfg = Settings(model="/m").engine_config()
    assert (cfg.prefill_min_tokens, cfg.prefill_max_wait) == (None, 32)   # None: by device
    monkeypatch.setenv("LORRY_PREFILL_MIN_TOKENS", "0")
    monkeypatch.setenv("LORRY_PREFILL_MAX_WAIT", "64")
    cfg = Settings(model="/m").engine_config()
    assert (cfg.prefill_min_tokens, cfg.prefill_max_wait) == (0, 64)
    monkeypatch.setenv("LORRY_PREFILL_MIN_TOKENS", "")
    assert Settings(model="/m").engine_config().prefill_min_tokens is None  # empty: unset
    monkeypatch.setenv("LORRY_PREFILL_MIN_TOKENS", "-5")
    with pytest.raises(ValidationError, match="prefill_min_tokens"):
        Settings(model="/m")


def test_lora_load_process_reaches_engine_config(monkeypatch):
    assert Settings(model="/m").engine_config().lora_load_process is False
    monkeypatch.setenv("LORRY_LORA_LOAD_PROCESS", "true")
    assert Settings(model="/m").engine_config().lora_load_process is True
    monkeypatch.setenv("LORRY_LORA_LOAD_PROCESS", "perhaps")
    with pytest.raises(ValidationError, match="lora_load_process"):
        Settings(model="/m")


def test_lora_memory_slots_reaches_engine_config(monkeypatch):
    assert Settings(model="/m").engine_config().lora_memory_slots is None   # max_loras' worth
    monkeypatch.setenv("LORRY_MAX_LORAS", "48")
    monkeypatch.setenv("LORRY_LORA_MEMORY_SLOTS", "16")
    cfg = Settings(model="/m").engine_config()
    assert (cfg.max_loras, cfg.lora_memory_slots) == (48, 16)
    monkeypatch.setenv("LORRY_LORA_MEMORY_SLOTS", "")
    assert Settings(model="/m").lora_memory_slots is None
    monkeypatch.setenv("LORRY_LORA_MEMORY_SLOTS", "0")
    with pytest.raises(ValidationError, match="lora_memory_slots"):
        Settings(model="/m")


def test_kv_cache_dtype_reaches_engine_config(monkeypatch):
    assert Settings(model="/m").engine_config().kv_cache_dtype == "auto"
    monkeypatch.setenv("LORRY_KV_CACHE_DTYPE", "fp8")
    assert Settings(model="/m").engine_config().kv_cache_dtype == "fp8"


@pytest.mark.parametrize(("var", "value", "named"), [
    ("LORRY_MAX_LORA_RANK", "12", "LORRY_MAX_LORA_RANK=12 is invalid"),
    ("LORRY_KV_CACHE_DTYPE", "int8", "LORRY_KV_CACHE_DTYPE='int8' is invalid"),
    ("LORRY_BLOCK_SIZE", "7", "LORRY_BLOCK_SIZE=7 is invalid"),
    ("LORRY_MAX_NUM_SEQS", "0", "LORRY_MAX_NUM_SEQS: Input should be greater than"),
])
def test_a_refused_setting_never_shows_the_other_values(monkeypatch, tmp_path, var, value,
                                                        named):
    """pydantic's own text showed the whole environment (input_value={...}), and its readable
    tail held the last settings: the Flower password, the metrics token, the database URL."""
    from lorry.settings import SettingsError, get_settings

    secrets = {"LORRY_METRICS_TOKEN": "tok-0123456789abcdef-secret",
               "LORRY_FLOWER_BASIC_AUTH": "admin:hunter2-secret",
               "LORRY_DATABASE_URL": "postgresql+psycopg://lorry:pw-secret@db:5432/lorry"}
    for k, v in {**secrets, "LORRY_DATA_DIR": str(tmp_path), var: value}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as e:
        get_settings()
    assert named in str(e.value)
    assert "secret" not in str(e.value) and "hunter2" not in str(e.value), str(e.value)
    import subprocess
    import sys

    lorry = str(Path(sys.executable).with_name("lorry"))   # the installed console script
    cli = subprocess.run([lorry, "tenant", "list"], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 2 and named in cli.stderr, cli.stderr
    assert "secret" not in cli.stderr + cli.stdout and "hunter2" not in cli.stderr
