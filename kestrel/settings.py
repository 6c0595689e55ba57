"""Service settings, read once from the environment (``KESTREL_*``, plus the conventional ``REDIS_URL``).

One object configures the API, the workers and ``kestrel up``, so a limit or a store root can never
differ between the process that validates a request and the one that runs it.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Torch-free (the API reads these settings too).
from kestrel.core.catalog import DEFAULT_MODEL, DType
from kestrel.core.loading import DeviceMap, Quantization, parse_device_map, parse_gpu_ids

if TYPE_CHECKING:
    from kestrel.core.store import Store

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
WEEK_S = 7 * 24 * 3600
_LOCAL_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Settings(BaseSettings):
    """Everything an operator can set. Env names are the field names upper-cased with ``KESTREL_``."""

    model_config = SettingsConfigDict(env_prefix="KESTREL_", extra="ignore", populate_by_name=True)

    store_root: Path = Field(Path(".kestrel"), description="artifact store directory (runs, SAEs, uploads)")
    store_backend: Literal["local", "s3", "both"] = Field(
        "local",
        description="where artifacts live: local (store_root), s3 (s3_url; store_root keeps only "
        "caches), both (written to both, read locally first)",
    )
    s3_url: str | None = Field(None, description="S3 location of the store, s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto); empty: AWS. Credentials: the boto3 chain"
    )
    s3_cache_dir: Path | None = Field(
        None, description="where files read from S3 are cached; empty: <store_root>/s3-cache"
    )
    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        validation_alias=AliasChoices("REDIS_URL", "KESTREL_REDIS_URL", "redis_url"),
        description="Redis holding the queues and jobs (env REDIS_URL)",
    )
    api_key: SecretStr | None = Field(
        None, description="when set, every route but health/ready/docs needs it"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS; empty: CORS off"
    )
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="comma-separated directories whose subdirectories are local models, named by directory",
    )

    # Request limits: each is named in the 413/422 that enforces it.
    max_texts_per_request: int = Field(256, gt=0, description="texts in one inline dataset or encode call")
    max_text_chars: int = Field(20_000, gt=0, description="characters in one inline text")
    max_tokens_per_text: int = Field(2048, gt=0, description="tokens kept per document (capture max_length)")
    max_new_tokens: int = Field(256, gt=0, description="tokens one generate call may produce")
    max_upload_mb: float = Field(200.0, gt=0, description="size of one uploaded file")
    max_request_mb: float = Field(16.0, gt=0, description="size of any other request body")
    max_top_k: int = Field(64, gt=0, description="latents per token an encode call may ask for")

    # Jobs and workers.
    interactive_timeout_s: float = Field(
        30.0, gt=0, description="how long an awaited call waits for its job before answering 202 with it"
    )
    job_ttl_s: int = Field(WEEK_S, gt=0, description="how long finished and failed batch jobs are kept")
    interactive_job_ttl_s: int = Field(3600, gt=0, description="how long interactive jobs (encode) are kept")
    batch_job_timeout_s: int = Field(3 * 24 * 3600, gt=0, description="hard limit on one batch job")
    interactive_job_timeout_s: int = Field(600, gt=0, description="hard limit on one interactive job")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="worker heartbeat period")
    heartbeat_ttl_s: int = Field(30, gt=0, description="a job whose worker is silent this long has died")
    reaper_interval_s: float = Field(5.0, gt=0, description="how often dead workers' jobs are failed")
    worker_max_models: int = Field(2, gt=0, description="models one worker keeps loaded (LRU)")
    device: str = Field("auto", description="device workers load models on: cpu, cuda or auto")
    idempotency_ttl_s: int = Field(24 * 3600, gt=0, description="how long an Idempotency-Key is remembered")

    # Hub ids and awaited calls (interactive/generate queues).
    allowed_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated fnmatch globs of hub model ids workers may fetch ('*': any); "
        "empty: only bundled and local models and hub ids already in the local HF cache",
    )
    allowed_datasets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated fnmatch globs of hub dataset ids workers may fetch ('*': any); "
        "empty: only datasets already in the local HF cache",
    )
    hub_timeout_s: float = Field(
        10.0, gt=0, description="how long a worker waits for the hub before a hub load fails (424)"
    )

    @field_validator("allowed_models", "allowed_datasets", mode="before")
    @classmethod
    def _split_globs(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # Bad input and limits: operator caps on what one request may build or run (kestrel.core.limits),
    # and the auth override for a non-loopback API without a key.
    max_n_latents: int = Field(131_072, gt=0, description="latents of one SAE (training, import)")
    max_sae_params: int = Field(1 << 28, gt=0, description="d_in × n_latents of one SAE (training, import)")
    max_batch_size: int = Field(
        65_536, gt=0, description="rows per training step; documents per capture batch"
    )
    max_epochs: int = Field(1000, gt=0, description="epochs of one training")
    max_batch_tokens: int = Field(
        1 << 20, gt=0, description="padded tokens per forward batch (capture and discovery token_budget)"
    )
    max_tokens_per_job: int = Field(
        10_000_000_000, gt=0, description="tokens one training may read (train.token_budget)"
    )
    min_shard_mb: float = Field(1.0, gt=0, description="smallest shard size a capture or import may ask for")
    max_shard_mb: float = Field(
        1024.0, gt=0, description="largest shard size a capture or import may ask for"
    )
    allow_no_auth: bool = Field(
        False,
        description="let `kestrel serve` listen on a non-loopback address without an API key "
        "(only behind something else that authenticates, or on a host port bound to 127.0.0.1)",
    )

    # Scale: the GPUs a worker owns, and how it places models too large for one
    # (kestrel.core.loading, docs/scaling.md).
    worker_gpus: str | None = Field(
        None,
        description="GPUs this worker owns, as CUDA_VISIBLE_DEVICES (indices or UUIDs: '0,1'; "
        "'none': no GPU), set before the worker initialises CUDA; empty: every GPU it sees",
    )
    device_map: Annotated[DeviceMap | None, NoDecode] = Field(
        None,
        description="split each model a job loads across the worker's devices: 'auto' (accelerate "
        "fills the GPUs, then CPU) or a JSON object {module: device}; empty: one device (device)",
    )
    model_dtype: DType = Field(
        "fp32", description="dtype a worker loads a model in when the request names none"
    )
    quantization: Quantization = Field(
        "none", description="load weights in 8 or 4 bits (bitsandbytes, the `gpu` extra; a CUDA host)"
    )

    @field_validator("worker_gpus", mode="before")
    @classmethod
    def _gpu_ids(cls, value: object) -> object:
        return parse_gpu_ids(value) if isinstance(value, str) else value

    @field_validator("device_map", mode="before")
    @classmethod
    def _device_map(cls, value: object) -> object:
        return parse_device_map(value) if isinstance(value, str | dict) else value

    # `kestrel up`.
    preload_model: str = Field(
        DEFAULT_MODEL,
        description="model `kestrel up` asks the interactive and generate workers to load at start "
        "(empty: none), so the first encode or generate does not wait for a load",
    )
    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(8000, gt=0, lt=65536, description="port the API listens on")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: object) -> object:
        """``KESTREL_API_KEY=""`` (or blanks) means no key, said loudly: never a key that every
        request without one matches."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str) and not raw.strip():
            logging.getLogger("kestrel.settings").warning(
                "KESTREL_API_KEY is set but empty: treated as unset, so the API asks for no key"
            )
            return None
        return value

    @field_validator("cors_origins", "model_dirs", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    def open_store(self) -> Store:
        """The artifact store these settings choose (``store_backend``); see ``core.store.open_store``."""
        from kestrel.core.store import open_store

        return open_store(self)

    def local_models(self) -> dict[str, Path]:
        """Server-configured local checkpoints: ``{name: directory}``; clients only ever name them."""
        found: dict[str, Path] = {}
        for root in self.model_dirs:
            root = root.expanduser().resolve()
            if not root.is_dir():
                continue
            for child in sorted(root.iterdir()):
                if (
                    child.is_dir()
                    and (child / "config.json").is_file()
                    and _LOCAL_MODEL_NAME.fullmatch(child.name)
                ):
                    found.setdefault(child.name, child)
        return found


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
