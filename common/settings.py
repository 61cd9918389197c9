"""Typed settings for every embedq process, read from `EMBEDQ_*` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COMPAT_FAMILIES = ("tei", "infinity", "layra")


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDQ_", extra="ignore")

    # Where things are
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every Redis call fails after these rather than hanging (blocking reads block for 1 s at most).
    redis_connect_timeout_s: float = Field(default=3.0, gt=0)
    redis_socket_timeout_s: float = Field(default=10.0, gt=1)
    models_file: Path = PROJECT_ROOT / "models.yaml"
    var_dir: Path = PROJECT_ROOT / "var"
    # Uploads and page images (common.store.blobs): any fsspec URL (s3://bucket/prefix for S3 or MinIO);
    # default: var_dir/blobs, which only the processes of one machine share. EMBEDQ_BLOB_URL: its old name.
    blob_uri: str = Field(default="", validation_alias=AliasChoices("EMBEDQ_BLOB_URI", "EMBEDQ_BLOB_URL", "blob_uri"))

    # HTTP front end
    host: str = "127.0.0.1"
    port: int = 8000
    # API keys (api.auth): `key` (the shared tenant) or `name:key` (tenant `name`), comma-separated,
    # and, one a line, in the file; none at all leaves the API open. Admins see every tenant's.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # How long the console's sign-in (a cookie signed with the key, api.session) stays valid.
    console_session_s: int = Field(default=8 * 3600, gt=0)
    max_inputs: int = 2048
    max_body_bytes: int = 64 * 1024 * 1024
    # The vectors of one answer, as bytes (JSON floats take about 2.5 times that): 2,048 inputs of
    # 512 token vectors would otherwise be 512 MiB held in Redis.
    max_response_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_query_chars: int = Field(default=8192, gt=0)  # a search query (tokenized and cut to the model's limit)
    max_filter_chars: int = Field(default=4096, gt=0)  # a Milvus filter expression
    max_files_per_upload: int = Field(default=256, gt=0)
    max_metadata_bytes: int = Field(default=64 * 1024, gt=0)  # one file's metadata, as JSON
    max_pages_per_file: int = Field(default=2000, gt=0)  # a PDF or office document
    request_timeout_s: float = 60.0
    queue_limit: int = 10_000
    # Requests one API process waits on at once; past it, 429 with Retry-After, before it degrades.
    max_in_flight: int = Field(default=4096, gt=0)
    # Concurrent requests for the same model and options go to the workers as one task (api.coalesce).
    coalesce: bool = True
    # Compatibility routes (api.compat) at the paths other servers' clients call, comma-separated
    # families of COMPAT_FAMILIES; none by default. TEI's and LAYRA's requests name no model: theirs
    # is the one set here, else the first served model that can answer them.
    compat: Annotated[list[str], NoDecode] = Field(default_factory=list)
    compat_tei_model: str = ""
    compat_layra_model: str = ""

    # Workers and queue semantics
    cpu_threads: int = Field(default_factory=lambda: os.cpu_count() or 1)
    # How a search worker's page scan multiplies (workers.search.kernels): auto times each at start-up.
    scan_kernel: Literal["auto", "int8", "fbgemm", "float32"] = "auto"
    # Page collections are split in this many shards over the live search workers (common.shards).
    search_shards: int = Field(default=1, gt=0, le=1024)
    # The most a search worker's pages may take; a load past it is refused (default: half the RAM).
    search_memory_gb: float = Field(default_factory=lambda: _ram_gb() / 2, gt=0)
    worker_concurrency: int = 64
    # A live worker renews the messages it holds with each heartbeat (common.delivery.leases), so
    # this bounds only how long a dead worker's messages wait before they run elsewhere. Shorter
    # than request_timeout_s, so the requests of a worker that died run again while their callers
    # still wait.
    visibility_timeout_s: int = 30
    # A model worker fetches no more while the tasks it holds have this many batches of inputs
    # (batches of its model's max_batch_size): the rest waits in Redis for any worker.
    fetch_batches: int = Field(default=2, gt=0)
    # A task whose runs killed their worker this many times is failed, not run again.
    max_deliveries: int = Field(default=3, gt=0)
    result_expires_s: int = 600
    # How often senders look for their tasks lost with a dead worker (common.delivery).
    lost_task_check_s: float = Field(default=5.0, gt=0)
    worker_heartbeat_ttl_s: int = 15
    task_events: bool = True  # Celery task events, for Flower

    # Upstream embedding servers (workers.backends.upstream): each replica's health is checked with a
    # one-input embedding call this often; one that fails this many times in a row (requests or checks)
    # is out of rotation for the cool-down; a request to one gives up after the timeout.
    upstream_health_every_s: float = Field(default=2.0, gt=0)
    upstream_failures: int = Field(default=2, gt=0)
    upstream_cooldown_s: float = Field(default=10.0, gt=0)
    upstream_timeout_s: float = Field(default=60.0, gt=0)
    # How a `backend: vllm` worker runs vLLM, which pins a torch of its own and so lives in its own
    # environment; loading (and compiling) a large model takes minutes.
    vllm_command: str = "vllm"
    vllm_start_timeout_s: float = Field(default=1800.0, gt=0)

    # Ingestion jobs and the vector store
    milvus_uri: str = "http://127.0.0.1:19530"
    # For a Milvus with auth on: `user:password` (or an API key); empty for one without (Milvus Lite).
    milvus_token: str = ""
    job_ttl_s: int = 7 * 24 * 3600
    # A worker's write to Milvus waits out a Milvus that cannot be reached this long (a restart),
    # trying again with backoff, before the batch fails.
    store_outage_s: float = Field(default=60.0, ge=0)
    # A job whose work no live worker can take fails after waiting this long.
    job_stall_timeout_s: float = Field(default=600.0, gt=0)
    ingest_pages_per_task: int = 4
    ingest_chunks_per_task: int = 64
    ingest_concurrency: int = 2

    # The embedding cache (common.cache), in a Redis of its own so that its evictions never touch
    # queues or jobs: EMBEDQ_CACHE=off turns it off; without a URL there is none (`embedq up` starts
    # one, bounded to cache_max_mb and evicting the least recently used entries).
    cache: bool = True
    cache_url: str = ""
    cache_ttl_s: int = Field(default=24 * 3600, gt=0)
    cache_max_mb: int = Field(default=1024, gt=0)
    # Every cache call gives up after this: a cache that is slow or gone costs a request this, once.
    cache_timeout_s: float = Field(default=0.25, gt=0)

    @field_validator("compat", mode="before")
    @classmethod
    def _split_families(cls, value: object) -> object:
        if isinstance(value, str):
            return [family.strip().lower() for family in value.split(",") if family.strip()]
        return value

    @field_validator("compat")
    @classmethod
    def _known_families(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(COMPAT_FAMILIES))
        if unknown:
            raise ValueError(f"unknown compatibility families {unknown}: choose from {list(COMPAT_FAMILIES)}")
        return value

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """A comma-separated list; blank is none, but a blank entry in a list is refused, since
        `EMBEDQ_API_KEYS=","` must not leave the API open."""
        if isinstance(value, str):
            if not value.strip():
                return []
            entries = [entry.strip() for entry in value.split(",")]
            if "" in entries:
                raise ValueError(f"an entry of {value!r} is empty: list keys as `key` or `name:key`, comma-separated")
            return entries
        return value

    # Images and documents (common.inputs)
    max_image_pixels: int = Field(default=50_000_000, gt=0)  # also caps a rendered PDF page
    max_images_per_request: int = Field(default=64, gt=0)
    pdf_dpi_small: int = Field(default=200, gt=0)
    pdf_dpi_large: int = Field(default=150, gt=0)
    pdf_large_pages: int = Field(default=50, gt=0)  # from this many pages on, render at pdf_dpi_large
    office_timeout_s: float = Field(default=120.0, gt=0)  # LibreOffice conversion to PDF
    office_memory_mb: int = Field(default=2048, gt=0)  # LibreOffice's address space, in MiB
    # Each page is kept (common.store.blobs) as a full-size JPEG and a thumbnail this wide, for the console
    # and for clients that hand the page of a hit to a VLM.
    page_image_quality: int = Field(default=80, ge=1, le=100)
    thumb_width: int = Field(default=256, gt=0)
    chunk_size: int = Field(default=1000, gt=0)  # characters
    chunk_overlap: int = Field(default=200, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"EMBEDQ_CHUNK_OVERLAP ({self.chunk_overlap}) must be under EMBEDQ_CHUNK_SIZE ({self.chunk_size})"
            )
        return self

    @property
    def blob_location(self) -> str:
        return self.blob_uri or str(self.var_dir / "blobs")

    @property
    def cache_on(self) -> bool:
        return self.cache and bool(self.cache_url)

    @property
    def heartbeat_every_s(self) -> float:
        """How often a worker beats and renews its leases: well inside both the heartbeat TTL and
        the visibility timeout."""
        return max(min(self.worker_heartbeat_ttl_s, self.visibility_timeout_s) / 3, 0.2)

    def pdf_dpi(self, page_count: int) -> int:
        """The rendering resolution for a document of `page_count` pages."""
        return self.pdf_dpi_large if page_count >= self.pdf_large_pages else self.pdf_dpi_small


@lru_cache
def get_settings() -> Settings:
    return Settings()
