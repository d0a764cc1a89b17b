"""Lorry's settings: one pydantic-settings class read from ``LORRY_*`` environment variables."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DATA_DIR = Path(os.environ.get("LORRY_DATA_DIR", Path.home() / ".local" / "share" / "lorry"))
MODELS_DIR = Path(os.environ.get("LORRY_MODELS_DIR", Path.home() / ".cache" / "lorry" / "models"))


class Settings(BaseSettings):
    """Every knob of the service; each field ``x`` is read from ``LORRY_X``.

    Parameters
    ----------
    database_url : str
        SQLAlchemy URL of the job table (SQLite file by default, PostgreSQL in production).
    broker_url : str
        Celery broker (Redis); the API also keeps nudge de-duplication keys there.
    model : str
        Base model directory or Hub id the GPU workers load.
    adapter_roots : list of str
        Directories under which local adapter paths may be registered.
    """

    model_config = SettingsConfigDict(env_prefix="LORRY_", extra="ignore")

    database_url: str = f"sqlite:///{DATA_DIR / 'lorry.db'}"
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    redis_prefix: str = "lorry"

    # engine
    model: str = str(MODELS_DIR / "SmolLM2-135M-Instruct")
    device: str = "auto"
    dtype: str = "auto"
    max_loras: int = Field(8, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    max_cpu_loras: int = Field(64, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    max_model_len: int | None = Field(2048, ge=16)
    adapter_roots: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [
        str(Path.cwd() / "adapters"), str(DATA_DIR / "adapters")])
    allow_hub_adapters: bool = True

    # queue / worker
    worker_id: str | None = None
    lease_seconds: int = Field(60, ge=5)
    heartbeat_seconds: float = Field(10.0, gt=0)
    drain_max_seconds: float = Field(120.0, gt=0)  # then maintain gets a turn
    maintain_interval: float = Field(15.0, gt=0)
    nudge_ttl_seconds: float = Field(30.0, gt=0)  # a pending nudge; drain clears it
    prune_workers_after: int = Field(600, ge=10)

    # api
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    max_batch_lines: int = Field(50_000, ge=1)
    max_line_bytes: int = Field(1024 * 1024, ge=64)
    max_prompt_chars: int = Field(200_000, ge=1)
    max_tokens_limit: int = Field(4096, ge=1)
    page_limit: int = Field(100, ge=1, le=1000)

    # flower
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_basic_auth: str | None = None  # "user:password"

    @field_validator("database_url")
    @classmethod
    def _expand_sqlite(cls, url: str) -> str:
        """Expand ``~`` in SQLite paths and create the parent directory."""
        prefix = "sqlite:///"
        if url.startswith(prefix) and url != prefix + ":memory:":
            path = Path(os.path.expanduser(url[len(prefix):]))
            path.parent.mkdir(parents=True, exist_ok=True)
            return prefix + str(path)
        return url

    @field_validator("adapter_roots", mode="before")
    @classmethod
    def _split_roots(cls, value):
        """``LORRY_ADAPTER_ROOTS`` is a PATH-like list (``/a:/b``) or a JSON list."""
        if isinstance(value, str):
            if value.strip().startswith("["):
                import json
                return json.loads(value)
            return [p for p in value.split(os.pathsep) if p]
        return value

    @property
    def redis_url(self) -> str:
        return self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
