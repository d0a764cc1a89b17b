"""Lorry's settings: one pydantic-settings class read from ``LORRY_*`` environment variables.

Only the edges read the environment (the CLI, the Celery app, the ASGI factory); everything
below them receives a validated ``Settings`` and, for the engine, ``Settings.engine_config()``.
Validators only parse and check: creating directories is the caller's business.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lorry.engine.config import EngineConfig
from lorry.engine.demo_model import DEMO_MODEL_NAME, default_models_dir

# Settings fields passed to EngineConfig under the same name (checked by its rules).
ENGINE_FIELDS = ("model", "tokenizer", "revision", "device", "dtype", "lora_dtype",
                 "lora_backend", "max_loras", "max_lora_rank", "lora_memory_slots",
                 "max_cpu_loras", "max_num_seqs",
                 "max_model_len", "max_num_batched_tokens", "mixed_steps", "num_scheduler_steps",
                 "prefill_min_tokens", "prefill_max_wait",
                 "quantization",
                 "enforce_eager",
                 "lora_fold", "lora_load_process", "pinned_reserve_mb", "load_format", "seed",
                 "adapter_roots",
                 "max_full_module_copies",
                 "block_size", "enable_prefix_caching", "gpu_memory_utilization",
                 "num_kv_blocks", "kv_cache_dtype")


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "lorry"


class Settings(BaseSettings):
    """Every knob of the service; each field ``x`` is read from ``LORRY_X``.

    Parameters
    ----------
    data_dir : Path
        Where the embedded SQLite database and tenants' files live by default.
    models_dir : Path
        Where ``lorry model prepare`` writes the demo base model.
    database_url : str
        SQLAlchemy URL of the job table (``{data_dir}/lorry.db`` by default; PostgreSQL in
        production).
    broker_url : str
        Celery broker (Redis); the API also keeps nudge de-duplication keys there.
    model : str
        Base model directory or Hub id the GPU workers load (the demo model by default).
    adapter_roots : list of str
        Directories under which local adapter paths may be registered, and which GPU workers
        check again at every load (``EngineConfig.adapter_roots``).
    adapter_roots_per_tenant : bool
        A tenant may register only paths under ``{root}/{tenant id}`` of a root (shared
        registrations by the operator's CLI keep the plain roots).
    metrics_token : SecretStr, optional
        Bearer token a Prometheus scraper sends to ``/metrics``; unset: ``/metrics`` is 404.
    metrics_tenant_labels : bool
        Label queue-depth metrics with tenant ids and adapter names (off: status only).
    flower_basic_auth : str, optional
        ``user:password`` for Flower; ``lorry flower`` refuses to start without it unless
        ``--insecure`` is given.

    The engine fields (``ENGINE_FIELDS``: ``model`` ... ``seed``, ``adapter_roots``,
    ``lora_memory_slots``, ``max_full_module_copies`` and the KV cache's ``block_size``,
    ``enable_prefix_caching``, ``gpu_memory_utilization``, ``num_kv_blocks``,
    ``kv_cache_dtype``) are
    ``EngineConfig``'s options under the same names, validated by ``EngineConfig``'s own rules
    when the settings are built.
    """

    model_config = SettingsConfigDict(env_prefix="LORRY_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    models_dir: Path = Field(default_factory=default_models_dir)
    database_url: str = ""  # "" -> sqlite:///{data_dir}/lorry.db
    # PostgreSQL: a statement running longer is cancelled by the server, and a connection whose
    # server sends nothing for longer still (frozen) is closed: both are 503s, not hangs
    # (JobQueue's statement_timeout_seconds; 0: no limit)
    database_statement_timeout_seconds: float = Field(60.0, ge=0)
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    redis_prefix: str = "lorry"   # Redis keys, and the Celery queue (task_queue)

    # engine (EngineConfig's names)
    model: str = ""  # "" -> {models_dir}/SmolLM2-135M-Instruct
    tokenizer: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    lora_dtype: str = "auto"
    lora_backend: str = "auto"
    max_loras: int = Field(8, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    max_cpu_loras: int = Field(64, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    max_model_len: int | None = Field(2048, ge=16)
    max_num_batched_tokens: int = Field(2048, ge=1)
    mixed_steps: bool = True
    num_scheduler_steps: int = Field(8, ge=1)
    # new prompts wait in decode rounds for this many tokens' worth of free rows
    # (EngineConfig.prefill_min_tokens; unset: 4096 on CUDA, 0 elsewhere; 0: off), at most
    # prefill_max_wait device steps
    prefill_min_tokens: int | None = Field(None, ge=0)
    prefill_max_wait: int = Field(32, ge=0)
    quantization: str | None = None
    enforce_eager: bool = False
    lora_fold: bool = True
    # background adapter loads in a process of their own (EngineConfig.lora_load_process)
    lora_load_process: bool = False
    # MiB of pinned host memory reserved for adapter staging (EngineConfig.pinned_reserve_mb;
    # unset: automatic, 0: off)
    pinned_reserve_mb: int | None = Field(None, ge=0)
    load_format: str = "auto"
    seed: int = 0
    adapter_roots: Annotated[list[str], NoDecode] = Field(default_factory=list)
    adapter_roots_per_tenant: bool = False
    # LoRA weight memory in max_lora_rank-wide slots, shared by rank; None: max_loras of them
    lora_memory_slots: int | None = Field(None, ge=1)
    # GPU-resident full trained lm_head/embed_tokens copies (modules_to_save); None: no limit
    max_full_module_copies: int | None = Field(None, ge=0)
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    num_kv_blocks: int | None = Field(None, ge=2)  # None: sized from memory (CUDA) or rows
    kv_cache_dtype: str = "auto"  # "fp8": keys/values in float8 e4m3 (half the bytes)
    allow_hub_adapters: bool = True
    max_adapters_per_tenant: int = Field(1000, ge=1)  # a tenant's own registered adapters

    # queue / worker
    worker_id: str | None = None
    # a CUDA worker compiles every kernel variant a step can pick before its first drain
    # (LLMEngine.compile_kernels), so that none compiles mid-run
    compile_kernels: bool = True
    lease_seconds: int = Field(60, ge=5)
    heartbeat_seconds: float = Field(10.0, gt=0)
    cancel_poll_seconds: float = Field(1.0, gt=0)  # a running job's cancel reaches its worker
    drain_max_seconds: float = Field(120.0, gt=0)  # then maintain gets a turn
    maintain_interval: float = Field(15.0, gt=0)
    nudge_ttl_seconds: float = Field(30.0, gt=0)  # a pending nudge; drain clears it
    # while the broker (Redis) cannot be reached, an idle worker looks for queued jobs this
    # often and drains them itself (0: off: workers then wait for Redis to hear of work)
    broker_fallback_seconds: float = Field(5.0, ge=0)
    prune_workers_after: int = Field(600, ge=10)

    # api
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    max_batch_lines: int = Field(50_000, ge=1)
    max_line_bytes: int = Field(1024 * 1024, ge=64)
    body_idle_seconds: float = Field(30.0, gt=0)  # no byte of a request body for this: 408
    # what one tenant's files (uploads, batch outputs and error files) may hold together; an
    # upload past it is 413 storage_quota_exceeded
    max_file_bytes_per_tenant: int = Field(100 * 1024 ** 3, ge=1)
    # /v1/chat/completions and /v1/completions wait this long for their job, then answer 504
    # naming the job to poll (it keeps running)
    sync_timeout_seconds: float = Field(300.0, gt=0)
    # completions one tenant may have waiting or streaming at once across the API processes
    # (counted in Redis; per process while it is away: each polls the database and a stream
    # holds a Redis connection); more are 429 too_many_open
    max_open_completions: int = Field(64, ge=1)
    # batches one tenant may be creating at once across the API processes (each reads its whole
    # input: up to LORRY_MAX_BODY_BYTES on disk); more are 429 too_many_open_ingests
    max_open_ingests: int = Field(2, ge=1)
    # /metrics answers only a scraper sending `Authorization: Bearer <metrics_token>` (404
    # while none is set); tenant ids and adapter names appear as labels only when opted in.
    metrics_token: SecretStr | None = None
    metrics_tenant_labels: bool = False

    # flower
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_basic_auth: str | None = None  # "user:password"

    @field_validator("data_dir", "models_dir", mode="after")
    @classmethod
    def _expand_user(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("quantization", "tokenizer", "revision", "metrics_token",
                     "flower_basic_auth", "max_full_module_copies", "num_kv_blocks",
                     "lora_memory_slots", "prefill_min_tokens", "pinned_reserve_mb",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        """``LORRY_QUANTIZATION=`` (empty) means none, as leaving it unset does (likewise the
        tokenizer, revision, metrics token, Flower credentials and full-copy limit)."""
        return None if value == "" else value

    @field_validator("broker_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        """The broker is Redis (the API's nudge keys and the workers' figures live there
        too); what redis-py cannot parse is refused here, never quoting the URL (a password
        may be in it)."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("is no Redis URL: give redis://[:PASSWORD@]HOST:PORT/DB "
                             "(rediss:// with TLS, unix:///path.sock)")
        try:
            parts.port
        except ValueError:
            raise ValueError("its port is no number 1-65535: give "
                             "redis://[:PASSWORD@]HOST:PORT/DB") from None
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        if db and not db.isdigit():
            raise ValueError("its database index (the path after the port) is no number: "
                             "give redis://HOST:PORT/0 or another number")
        return url

    @field_validator("adapter_roots", mode="before")
    @classmethod
    def _split_roots(cls, value):
        """``LORRY_ADAPTER_ROOTS`` is a PATH-like list (``/a:/b``) or a JSON list."""
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    return json.loads(value)
                except ValueError as e:
                    raise ValueError("starts with '[' but is no JSON list of directories "
                                     f"({e}); give '[\"/a\", \"/b\"]' or /a:/b") from None
            return [p for p in value.split(os.pathsep) if p]
        return value

    @model_validator(mode="after")
    def _defaults_and_engine_rules(self):
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'lorry.db'}"
        elif self.database_url.startswith("sqlite:///") and self.database_url != "sqlite:///:memory:":
            self.database_url = "sqlite:///" + os.path.expanduser(self.database_url[10:])
        if not self.model:
            self.model = str(self.models_dir / DEMO_MODEL_NAME)
        if not self.adapter_roots:
            self.adapter_roots = [str(Path.cwd() / "adapters"), str(self.data_dir / "adapters")]
        if self.max_cpu_loras < self.max_loras:
            self.max_cpu_loras = self.max_loras  # the CPU cache holds at least the GPU slots
        self.engine_config()  # raises ValueError naming the LORRY_* value EngineConfig refuses
        return self

    def engine_config(self, **overrides) -> EngineConfig:
        """The ``EngineConfig`` a worker serves with (``overrides`` replace settings)."""
        kwargs = {name: getattr(self, name) for name in ENGINE_FIELDS}
        kwargs.update(overrides)
        try:
            return EngineConfig(**kwargs)
        except ValueError as e:
            # EngineConfig names its field ("EngineConfig.max_loras=0 ..."); operators set
            # the variable, so the message names that instead.
            raise ValueError(re.sub(r"EngineConfig\.(\w+)",
                                    lambda m: "LORRY_" + m.group(1).upper(), str(e))) from e

    def sqlite_path(self) -> Path | None:
        """The SQLite file of ``database_url`` (None for other databases or ``:memory:``)."""
        prefix = "sqlite:///"
        if self.database_url.startswith(prefix) and self.database_url != prefix + ":memory:":
            return Path(self.database_url[len(prefix):])
        return None

    def ensure_dirs(self) -> None:
        """Create the SQLite database's folder (called by the edges before first use)."""
        path = self.sqlite_path()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)


class SettingsError(ValueError):
    """A LORRY_* value refused, named with its reason and never with the values given: a
    pydantic ValidationError's text shows the whole input, every LORRY_* variable (the
    metrics token, the Flower password, the database URL) included."""


def settings_problem(error: ValidationError) -> str:
    """Each refused setting and why, without any input value."""
    parts = []
    for e in error.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"LORRY_{where.upper()}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid settings"


def task_queue(prefix: str) -> str:
    """The Celery queue of a deployment's drain and maintain messages: two deployments on one
    Redis database (their own LORRY_REDIS_PREFIX each) took each other's drains from the one
    default queue, ``celery``, each draining its own empty table (a bulk audit)."""
    return f"{prefix}:tasks"


def celery_names(prefix: str) -> dict[str, str]:
    """Celery settings that keep a deployment's messages its own on a shared Redis database:
    its task queue, and the exchanges of its events (what Flower shows) and of remote control
    (what Flower's buttons send: another deployment's Flower could stop its workers)."""
    return {"task_default_queue": task_queue(prefix), "event_exchange": f"{prefix}.celeryev",
            "control_exchange": f"{prefix}.control"}


def get_settings() -> Settings:
    """Read the settings from the environment (the edges call this once and pass them down).
    Raises SettingsError naming what is refused."""
    try:
        settings = Settings()
    except ValidationError as e:
        raise SettingsError(settings_problem(e)) from None
    try:
        settings.ensure_dirs()
    except OSError as e:
        where = "LORRY_DATA_DIR" if settings.database_url.startswith(
            f"sqlite:///{settings.data_dir}/") else "LORRY_DATABASE_URL"
        raise SettingsError(f"{where}: cannot create the SQLite database's folder "
                            f"{e.filename} ({e.strerror})") from None
    return settings
