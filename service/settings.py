"""The settings of the API and of both sides of the queue, read from environment variables prefixed `ISL_` (every
one: docs/settings.md, made from the descriptions here by `python -m worker.reference`). What only the workers read
is in worker/tasks/settings.py (`WorkerSettings`, a subclass)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_KEY = "isl-dev-key"  # accepted only in development mode, and only when no keys are configured


TENANT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def valid_ae_title(aet: str) -> bool:
    """An AE title as DICOM PS3.5 allows it: 1 to 16 characters of the default repertoire, no backslash or control
    character, not only spaces."""
    return 0 < len(aet) <= 16 and aet.strip() != "" and all(" " <= c < "\x7f" and c != "\\" for c in aet)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ISL_")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for job records and the Celery broker: "
                                                                  "redis://HOST:PORT/DB, or its sentinels: sentinel://"
                                                                  "HOST1:PORT1,HOST2:PORT2,HOST3:PORT3/MASTER_NAME/DB")
    storage_root: Path = Field(Path("isl-storage"), description="shared folder for inputs and results (all hosts)")
    models_dir: Path = Field(Path("models"), description="folder of model bundles, one subfolder each")
    default_model: str = Field("hippocampus_few", description="bundle used when a job names none")
    api_keys: str = Field("", description="tenant:sha256(key) pairs, comma-separated; keys are stored hashed only")
    dev_mode: bool = Field(False, description="allow starting without keys (then the key 'isl-dev-key' is tenant "
                                              "'dev')")
    max_upload_bytes: int = Field(1 << 30, description="larger uploads are refused with 413, counted as the body "
                                                         "arrives (chunked or not)")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="the body limit of every request that is not an "
                                                                 "upload (forms, JSON)")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that has not sent a whole request head "
                                                            "within this long is closed (408)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request whose body stalls for this long between two "
                                                          "chunks is answered 408 and closed")
    auth_failures: int = Field(20, ge=1, description="wrong keys and failed sign-ins a client address may make per "
                                                     "ISL_AUTH_WINDOW_S; each further one: 429 (a valid key always "
                                                     "gets in)")
    auth_window_s: int = Field(300, ge=1, description="the window of ISL_AUTH_FAILURES, and how long a locked-out "
                                                      "client waits")
    queue: str = Field("isl", description="Celery queue the GPU workers consume")
    train_queue: str = Field("train", description="Celery queue of retraining jobs (`isl worker --queues` names the "
                                                  "queues a worker consumes)")
    visibility_timeout_s: int = Field(7200, ge=1, description="Redis redelivers an unacknowledged job after this long "
                                                              "(a copy of a job that still runs is not run again)")
    min_free_mb: int = Field(1024, ge=0, description="uploads are refused with 507 while the storage root has less "
                                                     "free space than this")
    database_url: str = Field("", description="SQLAlchemy URL of the database of job history and the audit trail "
                                             "(postgresql+psycopg://user:password@host/db); empty: SQLite file "
                                             "isl.db under the storage root")
    retention_days: float = Field(0.0, ge=0, description="inputs and results of jobs that ended longer ago than "
                                                         "this are deleted (the job's record and audit trail stay); "
                                                         "0: kept for ever")
    retention_sweep_s: float = Field(3600.0, gt=0, description="how often the workers look for jobs past the "
                                                               "retention age")
    agreement_dice: float = Field(0.94, ge=0, le=1, description="agreement: the automatic masks have converged only "
                                                                "when every structure's mean Dice against the "
                                                                "corrections reaches this")
    agreement_spearman: float = Field(0.97, ge=-1, le=1, description="agreement: ... and the Spearman correlation "
                                                                     "of their volumes reaches this")
    dimse_ae_title: str = Field("ISL", description="this service's DICOM AE title: the one `isl dicom-listener` "
                                                   "answers to, and the calling AE title of the workers' C-STORE")
    dimse_port: int = Field(11112, ge=1, le=65535, description="TCP port of `isl dicom-listener`")
    dimse_calling_aets: str = Field("", description="tenant:AET|AET,... the calling AE titles each tenant sends from; "
                                                    "an association from any other is refused")
    dimse_quiet_s: float = Field(30.0, gt=0, description="a series received over DIMSE is complete, and becomes a "
                                                         "job, once no association delivering it is open and no "
                                                         "instance of it arrived for this long")
    console_session_hours: float = Field(8.0, gt=0, le=24 * 30, description="a web console sign-in lasts this long "
                                                                             "(a revoked key ends it at once)")
    console_operators: str = Field("", description="tenants (comma-separated) who see the console's operations page: "
                                                   "every worker, queue and failure, of all tenants")
    console_secure_cookie: bool = Field(False, description="mark the console's cookies Secure (set it when the "
                                                           "console is served over HTTPS, behind a TLS proxy; they "
                                                           "are Secure anyway on a request seen as https)")

    def database(self) -> str:
        """The database URL in use: ISL_DATABASE_URL, or the embedded SQLite file under the storage root."""
        from jobstore.database import default_url

        return self.database_url or default_url(self.storage_root)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        from jobstore.redisconn import check_url

        check_url(v)  # a malformed URL stops the process at start, naming the problem
        return v

    @field_validator("dimse_ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        if not valid_ae_title(v):
            raise ValueError(f"ISL_DIMSE_AE_TITLE {v!r} is not an AE title (1 to 16 characters, no backslash or "
                             "control character)")
        return v

    def tenants_by_calling_aet(self) -> dict[str, str]:
        """Calling AE title -> tenant, from ISL_DIMSE_CALLING_AETS; a malformed entry or an AE title given to two
        tenants is refused with the entry named."""
        out: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.dimse_calling_aets.split(","))):
            tenant, _, titles = item.partition(":")
            if not TENANT.fullmatch(tenant.strip()) or not titles.strip():
                raise ValueError(f"ISL_DIMSE_CALLING_AETS entry {item!r} is not tenant:AET|AET (a tenant is letters, "
                                 "digits, '_', '-' and '.')")
            for aet in (t.strip() for t in titles.split("|")):
                if not valid_ae_title(aet):
                    raise ValueError(f"ISL_DIMSE_CALLING_AETS entry {item!r}: {aet!r} is not an AE title (1 to 16 "
                                     "characters, no backslash or control character)")
                if out.get(aet, tenant.strip()) != tenant.strip():
                    raise ValueError(f"ISL_DIMSE_CALLING_AETS: AE title {aet!r} is given to both {out[aet]!r} and "
                                     f"{tenant.strip()!r}")
                out[aet] = tenant.strip()
        return out

    def tenants_by_key_hash(self) -> dict[str, str]:
        """sha256(key) -> tenant. Refuses empty or malformed configuration unless in development mode."""
        pairs = {}
        for item in filter(None, (p.strip() for p in self.api_keys.split(","))):
            tenant, _, digest = item.partition(":")
            if not TENANT.fullmatch(tenant) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"ISL_API_KEYS entry {item!r} is not tenant:<64 hex sha256 of the key> (a tenant is 1 "
                                 "to 64 letters, digits, '_', '-' and '.')")
            if digest == hash_key(DEV_KEY):
                raise ValueError(f"ISL_API_KEYS: tenant {tenant!r} uses the development key; choose a real secret")
            pairs[digest] = tenant
        if not pairs:
            if not self.dev_mode:
                raise ValueError("no API keys configured (ISL_API_KEYS); set them, or ISL_DEV_MODE=1 for development")
            pairs[hash_key(DEV_KEY)] = "dev"
        return pairs
