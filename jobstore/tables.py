"""The tables of the database (SQLAlchemy 2 declarative models): jobs, revoked keys, idempotency keys, batches, the
audit trail, corrections, retrainings and model versions. The schema is made and changed only by the Alembic
migrations in jobstore/migrations/, which compare against these models; the queries are in jobstore/database.py and
jobstore/registry.py, and what they hand back are the typed records of jobstore/rows.py."""
from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    """One job: the columns an auditor queries, and the whole record as Redis last held it at a change of state."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(128))
    received_by: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str] = mapped_column(Text, default="")
    record: Mapped[dict] = mapped_column(JSON)
    rev: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # the record's revision (jobstore.records)
    purged: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_jobs_tenant_created", "tenant", "created"), Index("ix_jobs_finished", "finished"),
                      Index("ix_jobs_state", "state"))


class RevokedKey(Base):
    """A revoked API key (its sha256): refused from then on, whatever Redis remembers."""

    __tablename__ = "revoked_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    revoked: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(Base):
    """The job a tenant's Idempotency-Key made: the primary key makes check-and-create one atomic insert."""

    __tablename__ = "idempotency_keys"
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id"))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BatchRow(Base):
    """A batch: its tenant and its jobs, in upload order."""

    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    jobs: Mapped[list] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who did what to which record, when. `actor`: `key:<first 12 hex of the key's sha256>` for API calls,
    `dimse:<calling AE title>` for the DICOM listener, `retention` for the policy's deletions."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    tenant: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(80))
    action: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("jobs.id"))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    __table_args__ = (Index("ix_audit_tenant_at", "tenant", "at"), Index("ix_audit_job", "job_id"))


class CorrectionRow(Base):
    """A radiologist's correction of a job's mask: who sent it, from what (a NIfTI label map or a DICOM SEG), where
    its files lie (`folder`, under the storage root: label.nii.gz and image.nii.gz on the scan's grid) and what it
    changed (`summary`: volumes before and after, Dice of the refined mask against it, per label)."""

    __tablename__ = "corrections"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id"))
    tenant: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    actor: Mapped[str] = mapped_column(String(80))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(16))
    folder: Mapped[str] = mapped_column(String(255))
    label_sha256: Mapped[str] = mapped_column(String(64))
    summary: Mapped[dict] = mapped_column(JSON)
    note: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (Index("ix_corrections_tenant_model", "tenant", "model", "created"),
                      Index("ix_corrections_job", "job_id"))


class TrainingRow(Base):
    """A retraining job: a tenant asked for a new version of a model trained on its base data and every correction
    so far. `state`: queued, running, succeeded or failed; `beat`: the running worker's last sign of life (a
    delivery that finds a running training whose beat is old takes it over); `outcome`: the promotion decision."""

    __tablename__ = "trainings"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    actor: Mapped[str] = mapped_column(String(80))
    state: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    beat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str] = mapped_column(String(128), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    parent_version: Mapped[str] = mapped_column(String(128), default="")
    version: Mapped[str] = mapped_column(String(128), default="")
    options: Mapped[dict] = mapped_column(JSON, default=dict)
    outcome: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (Index("ix_trainings_tenant_model", "tenant", "model", "created"),)


class ModelVersionRow(Base):
    """A version of a model retrained for one tenant: where its bundle lies (`folder`, under the storage root), its
    lineage (`parent`, the `data` it saw: base cases and corrections), its `figures` (validation Dice of it and of
    its parent on cases neither trained on, and the promotion rule's verdict) and its `status`: candidate, live,
    rejected (the rule refused it) or retired (was live). A tenant with no live row is served the base bundle."""

    __tablename__ = "model_versions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the training that made it
    tenant: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(128))
    parent: Mapped[str] = mapped_column(String(128))
    folder: Mapped[str] = mapped_column(String(255))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    figures: Mapped[dict] = mapped_column(JSON, default=dict)
    promoted: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    promoted_by: Mapped[str] = mapped_column(String(80), default="")
    __table_args__ = (Index("ix_model_versions_tenant_model", "tenant", "model", "created"),
                      Index("ux_model_versions_tenant_version", "tenant", "version", unique=True))


def utc(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def epoch(t: datetime | None) -> float | None:
    """Unix seconds of a stored time (SQLite hands back naive datetimes: they were written in UTC)."""
    if t is None:
        return None
    return round((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp(), 3)
