"""The settings of the API and of both sides of the queue, read from environment variables prefixed `ISL_` (see
the README). What only the workers read is in worker/tasks/settings.py (`WorkerSettings`, a subclass)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_KEY = "isl-dev-key"  # accepted only in development mode, and only when no keys are configured


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ISL_")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for job records and the Celery broker")
    storage_root: Path = Field(Path("isl-storage"), description="shared folder for inputs and results (all hosts)")
    models_dir: Path = Field(Path("models"), description="folder of model bundles, one subfolder each")
    default_model: str = Field("hippocampus_few", description="bundle used when a job names none")
    api_keys: str = Field("", description="tenant:sha256(key) pairs, comma-separated; keys are stored hashed only")
    dev_mode: bool = Field(False, description="allow starting without keys (then the key 'isl-dev-key' is tenant "
                                              "'dev')")
    max_upload_bytes: int = Field(1 << 30, description="larger uploads are refused with 413")
    queue: str = Field("isl", description="Celery queue the GPU workers consume")
    visibility_timeout_s: int = Field(7200, ge=1, description="Redis redelivers an unacknowledged job after this long "
                                                              "(a copy of a job that still runs is not run again)")
    min_free_mb: int = Field(1024, ge=0, description="uploads are refused with 507 while the storage root has less "
                                                     "free space than this")

    def tenants_by_key_hash(self) -> dict[str, str]:
        """sha256(key) -> tenant. Refuses empty or malformed configuration unless in development mode."""
        pairs = {}
        for item in filter(None, (p.strip() for p in self.api_keys.split(","))):
            tenant, _, digest = item.partition(":")
            if not tenant or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"ISL_API_KEYS entry {item!r} is not tenant:<64 hex sha256 of the key>")
            if digest == hash_key(DEV_KEY):
                raise ValueError(f"ISL_API_KEYS: tenant {tenant!r} uses the development key; choose a real secret")
            pairs[digest] = tenant
        if not pairs:
            if not self.dev_mode:
                raise ValueError("no API keys configured (ISL_API_KEYS); set them, or ISL_DEV_MODE=1 for development")
            pairs[hash_key(DEV_KEY)] = "dev"
        return pairs
