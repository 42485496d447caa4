"""Durable records in a relational database (SQLAlchemy 2; the schema is made and changed only by the Alembic
migrations in service/migrations/): each job's history, as of its last change of state, and the audit trail of who
(tenant, key id) submitted, downloaded, cancelled, corrected, retrained and promoted, and what the retention policy
deleted, when; radiologists' corrections; the model registry (each tenant's retrained versions of a model, their
lineage and validation figures, which one is live) and the retraining jobs that make them.

Redis stays the queue and the live state (stage, progress, leases); the database is what a hospital keeps and
audits. It outlives a Redis that lost its data: the job routes read a job from it when Redis no longer has one.
SQLite (a file under the storage root) is the embedded default, PostgreSQL the one of docker-compose.yml."""
from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from service.records import FINAL, Job

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_LOCK = 0x15C0DB  # the advisory lock that makes concurrent upgrades (API, workers, listener) take turns


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
    rev: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # the record's revision (service.records)
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


def default_url(storage_root: Path) -> str:
    return f"sqlite:///{Path(storage_root).resolve() / 'isl.db'}"


class Records:
    """The database of one deployment (`ISL_DATABASE_URL`). Every process that changes jobs opens one."""

    def __init__(self, url: str):
        self.url = url
        parsed = make_url(url)
        self.sqlite = parsed.get_backend_name() == "sqlite"
        if self.sqlite:
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # several processes write one file: wait for each other's transactions instead of failing at once
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # a database host that does not answer is given up after 3 s (the API answers 503, not a hang)
            # and one that stops answering on an open connection is noticed in seconds, not TCP's 15 minutes
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_timeout=5,
                                        connect_args={"connect_timeout": 3, "keepalives": 1, "keepalives_idle": 5,
                                                      "keepalives_interval": 2, "keepalives_count": 2,
                                                      "tcp_user_timeout": 8000})

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - any failure means: not reachable now
            return False

    # -- schema ---------------------------------------------------------------------------------------------
    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to `revision` (from an empty database too); concurrent callers take turns."""
        from alembic import command

        with self._migration_lock() as connection:
            cfg = alembic_config(connection)
            command.upgrade(cfg, revision)

    def revision(self) -> str | None:
        """The schema revision the database is at (None: empty)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[Any]:
        with self.engine.connect() as connection:
            if self.sqlite:
                database = make_url(self.url).database
                lock_path = Path(f"{database}.migrate.lock") if database else None
                with contextlib.ExitStack() as stack:
                    if lock_path is not None:
                        fh = stack.enter_context(open(lock_path, "w"))
                        fcntl.flock(fh, fcntl.LOCK_EX)
                    yield connection
                    connection.commit()
            else:
                connection.exec_driver_sql(f"SELECT pg_advisory_lock({_PG_LOCK})")
                connection.commit()
                try:
                    yield connection
                    connection.commit()
                finally:
                    connection.exec_driver_sql(f"SELECT pg_advisory_unlock({_PG_LOCK})")
                    connection.commit()

    # -- jobs -----------------------------------------------------------------------------------------------
    def save_job(self, job: Job, session: Session | None = None) -> None:
        """Insert the job's row, or update it when this record is newer (its `rev`) than the stored one: one
        statement, so that writers in several processes neither fail nor put an older state over a newer one."""
        values = {"id": job.id, "tenant": job.tenant, "created": utc(job.created), "state": str(job.state),
                  "model": job.options.model, "received_by": job.received_by, "started": utc(job.started),
                  "finished": utc(job.finished), "error": job.error, "record": job.model_dump(mode="json"),
                  "rev": job.rev, "purged": utc(job.purged)}
        insert = (sqlite_insert if self.sqlite else pg_insert)(JobRow).values(**values)
        statement = insert.on_conflict_do_update(index_elements=[JobRow.id],
                                                 set_={k: insert.excluded[k] for k in values if k != "id"},
                                                 where=JobRow.rev < insert.excluded.rev)
        with self._session(session) as s:
            s.execute(statement)

    def create_job(self, job: Job, idempotency_key: str | None = None) -> Job | None:
        """Record an accepted job, with its idempotency key when given, in one transaction; returns None, or the job
        this tenant already made with that key (then nothing is written): the database decides, atomically."""
        from sqlalchemy.exc import IntegrityError

        try:
            with Session(self.engine) as s, s.begin():
                self.save_job(job, session=s)
                if idempotency_key:
                    s.flush()
                    s.add(IdempotencyKey(tenant=job.tenant, key=idempotency_key, job_id=job.id,
                                         created=utc(job.created)))
        except IntegrityError:
            if idempotency_key and (existing := self.by_idempotency_key(job.tenant, idempotency_key)):
                return existing
            raise
        return None

    def by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        with Session(self.engine) as s:
            job_id = s.scalar(select(IdempotencyKey.job_id).where(IdempotencyKey.tenant == tenant,
                                                                  IdempotencyKey.key == key))
        return None if job_id is None else self.job(job_id)

    def abandon(self, job_id: str, reason: str, at: float) -> None:
        """A recorded job that never reached the queue: failed with `reason`, its idempotency key freed (a retry
        with that key makes a new job)."""
        self.end(job_id, "failed", reason, at, free_key=True)

    def end(self, job_id: str, state: str, error: str, at: float, free_key: bool = False) -> Job | None:
        """End a job that only the database holds (Redis lost it, or never had it) in `state`, its idempotency key
        freed with `free_key`, in one transaction; the job as ended, or None when it had ended already (or is
        unknown)."""
        with Session(self.engine) as s, s.begin():
            row = s.get(JobRow, job_id)
            if row is None or row.state in [str(x) for x in FINAL]:
                return None
            job = _job(row).with_fields(state=state, error=error, finished=at)
            row.state, row.error, row.finished, row.rev = state, error, utc(at), job.rev
            row.record = job.model_dump(mode="json")
            if free_key:
                s.execute(delete(IdempotencyKey).where(IdempotencyKey.job_id == job_id))
            return job

    def unfinished(self) -> list[Job]:
        """Every job accepted and not ended (queued or running), oldest first: what the queue must hold."""
        with Session(self.engine) as s:
            rows = s.scalars(select(JobRow).where(JobRow.state.not_in([str(x) for x in FINAL]))
                             .order_by(JobRow.created)).all()
            return [_job(r) for r in rows]

    # -- revoked keys and batches ---------------------------------------------------------------------------
    def revoke(self, key_hash: str, at: float) -> None:
        statement = (sqlite_insert if self.sqlite else pg_insert)(RevokedKey).values(key_hash=key_hash,
                                                                                     revoked=utc(at))
        with Session(self.engine) as s, s.begin():
            s.execute(statement.on_conflict_do_nothing(index_elements=[RevokedKey.key_hash]))

    def revoked(self) -> set[str]:
        """The sha256 of every revoked key."""
        with Session(self.engine) as s:
            return set(s.scalars(select(RevokedKey.key_hash)).all())

    def is_revoked(self, key_hash: str) -> bool:
        with Session(self.engine) as s:
            return s.get(RevokedKey, key_hash) is not None

    def save_batch(self, batch_id: str, tenant: str, jobs: list[str], created: float) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(BatchRow(id=batch_id, tenant=tenant, jobs=jobs, created=utc(created)))

    def batch(self, batch_id: str) -> dict | None:
        with Session(self.engine) as s:
            row = s.get(BatchRow, batch_id)
            return None if row is None else {"id": row.id, "tenant": row.tenant, "jobs": list(row.jobs),
                                             "created": epoch(row.created)}

    def job(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job's last recorded state (only when it is `tenant`'s, when given: one query either way)."""
        where = [JobRow.id == job_id] + ([JobRow.tenant == tenant] if tenant is not None else [])
        with Session(self.engine) as s:
            row = s.scalars(select(JobRow).where(*where)).first()
            return None if row is None else _job(row)

    def jobs(self, tenant: str, offset: int, limit: int) -> tuple[list[str], int]:
        """(ids of this tenant's jobs, newest first, one page; how many it has)."""
        with Session(self.engine) as s:
            ids = s.scalars(select(JobRow.id).where(JobRow.tenant == tenant)
                            .order_by(JobRow.created.desc(), JobRow.id).offset(offset).limit(limit)).all()
            total = s.scalar(select(func.count()).select_from(JobRow).where(JobRow.tenant == tenant))
        return list(ids), int(total or 0)

    def expired(self, before: float) -> list[Job]:
        """Ended jobs that finished before `before` (Unix seconds) and whose files are still kept."""
        with Session(self.engine) as s:
            rows = s.scalars(select(JobRow).where(JobRow.finished < utc(before), JobRow.purged.is_(None),
                                                  JobRow.state.in_([str(x) for x in FINAL]))).all()
            return [_job(r) for r in rows]

    # -- corrections ----------------------------------------------------------------------------------------
    def add_correction(self, correction: dict, audit: dict) -> None:
        """Record a correction (the fields of CorrectionRow, `created` in Unix seconds) and its audit event in one
        transaction."""
        with Session(self.engine) as s, s.begin():
            s.add(CorrectionRow(**(correction | {"created": utc(correction["created"])})))
            self.audit(**audit, session=s)

    def corrections(self, tenant: str, *, job_id: str | None = None, model: str | None = None) -> list[dict]:
        """This tenant's corrections (of one job, or of one model's jobs), oldest first."""
        where = [CorrectionRow.tenant == tenant]
        if job_id:
            where.append(CorrectionRow.job_id == job_id)
        if model:
            where.append(CorrectionRow.model == model)
        with Session(self.engine) as s:
            rows = s.scalars(select(CorrectionRow).where(*where).order_by(CorrectionRow.created,
                                                                          CorrectionRow.id)).all()
            columns = [c.name for c in CorrectionRow.__table__.columns]
            return [{c: getattr(r, c) for c in columns} | {"created": epoch(r.created)} for r in rows]

    # -- retraining and the model registry -------------------------------------------------------------------
    def add_training(self, row: dict, audit: dict) -> None:
        """Record a queued retraining (the fields of TrainingRow, `created` in Unix seconds) and its audit event."""
        with Session(self.engine) as s, s.begin():
            s.add(TrainingRow(**(row | {"created": utc(row["created"]), "state": "queued"})))
            self.audit(**audit, session=s)

    def training(self, training_id: str, tenant: str | None = None) -> dict | None:
        where = [TrainingRow.id == training_id] + ([TrainingRow.tenant == tenant] if tenant is not None else [])
        with Session(self.engine) as s:
            row = s.scalars(select(TrainingRow).where(*where)).first()
            return None if row is None else _plain(row)

    def trainings(self, tenant: str, model: str) -> list[dict]:
        """This tenant's retrainings of `model`, newest first."""
        with Session(self.engine) as s:
            rows = s.scalars(select(TrainingRow).where(TrainingRow.tenant == tenant, TrainingRow.model == model)
                             .order_by(TrainingRow.created.desc(), TrainingRow.id)).all()
            return [_plain(r) for r in rows]

    def active_trainings(self) -> list[dict]:
        """Every tenant's retrainings that are queued or running, oldest first (the operations page)."""
        with Session(self.engine) as s:
            rows = s.scalars(select(TrainingRow).where(TrainingRow.state.in_(("queued", "running")))
                             .order_by(TrainingRow.created, TrainingRow.id)).all()
            return [_plain(r) for r in rows]

    def claim_training(self, training_id: str, worker: str, stale_before: float, now: float) -> dict | None:
        """Start a queued retraining, or take over a running one whose worker has not beaten since `stale_before`
        (it died); the row as claimed, or None when it is running elsewhere or has ended (a redelivered copy)."""
        stale = (TrainingRow.state == "running") & (TrainingRow.beat.is_(None) | (TrainingRow.beat < utc(stale_before)))
        with Session(self.engine) as s, s.begin():
            done = s.execute(update(TrainingRow).where(TrainingRow.id == training_id,
                                                       (TrainingRow.state == "queued") | stale)
                             .values(state="running", worker=worker, started=utc(now), beat=utc(now),
                                     attempts=TrainingRow.attempts + 1))
            if done.rowcount != 1:
                return None
        return self.training(training_id)

    def beat_training(self, training_id: str, worker: str, now: float) -> bool:
        """The running worker's sign of life; False when another worker has taken the training over."""
        with Session(self.engine) as s, s.begin():
            done = s.execute(update(TrainingRow).where(TrainingRow.id == training_id, TrainingRow.worker == worker,
                                                       TrainingRow.state == "running").values(beat=utc(now)))
            return done.rowcount == 1

    def finish_training(self, training_id: str, worker: str, *, state: str, finished: float, error: str = "",
                        version: dict | None = None, outcome: dict | None = None, audit: dict | None = None) -> bool:
        """End a retraining held by `worker`; with `version` (the fields of ModelVersionRow), record the new
        version, and when `outcome["promoted"]`, make it live, in the same transaction. False when the worker no
        longer holds it (its outcome is dropped)."""
        with Session(self.engine) as s, s.begin():
            done = s.execute(update(TrainingRow).where(TrainingRow.id == training_id, TrainingRow.worker == worker,
                                                       TrainingRow.state == "running")
                             .values(state=state, finished=utc(finished), error=error,
                                     version=(version or {}).get("version", ""), outcome=outcome or {}))
            if done.rowcount != 1:  # nothing was changed
                return False
            if version is not None:
                outcome = outcome or {}
                promoted = bool(outcome.get("promoted"))
                status = "rejected" if outcome.get("judged") and not promoted else "candidate"
                s.add(ModelVersionRow(**(version | {"created": utc(version["created"]), "status": status})))
                s.flush()
                if promoted:
                    self._make_live(s, version["tenant"], version["model"], version["version"], "rule", finished)
            if audit is not None:
                self.audit(**audit, session=s)
            return True

    def fail_training(self, training_id: str, finished: float, error: str) -> None:
        """End a retraining that never reached a worker (it could not be queued)."""
        with Session(self.engine) as s, s.begin():
            s.execute(update(TrainingRow).where(TrainingRow.id == training_id, TrainingRow.state == "queued")
                      .values(state="failed", finished=utc(finished), error=error))

    def versions(self, tenant: str, model: str) -> list[dict]:
        """This tenant's versions of `model`, oldest first."""
        with Session(self.engine) as s:
            rows = s.scalars(select(ModelVersionRow).where(ModelVersionRow.tenant == tenant,
                                                           ModelVersionRow.model == model)
                             .order_by(ModelVersionRow.created, ModelVersionRow.id)).all()
            return [_plain(r) for r in rows]

    def live_version(self, tenant: str, model: str) -> dict | None:
        """The version of `model` this tenant's jobs run on; None: the base bundle."""
        with Session(self.engine) as s:
            row = s.scalars(select(ModelVersionRow).where(ModelVersionRow.tenant == tenant,
                                                          ModelVersionRow.model == model,
                                                          ModelVersionRow.status == "live")).first()
            return None if row is None else _plain(row)

    def promote(self, tenant: str, model: str, version: str | None, actor: str, at: float, detail: dict) -> None:
        """Make `version` live for this tenant (None: back to the base bundle); the one live before is retired.
        The caller has checked the rule; the audit event records who and why."""
        with Session(self.engine) as s, s.begin():
            self._make_live(s, tenant, model, version, actor, at)
            self.audit(tenant, actor, "promote", detail=detail, at=at, session=s)

    @staticmethod
    def _make_live(s: Session, tenant: str, model: str, version: str | None, actor: str, at: float) -> None:
        mine = (ModelVersionRow.tenant == tenant) & (ModelVersionRow.model == model)
        s.execute(update(ModelVersionRow).where(mine, ModelVersionRow.status == "live").values(status="retired"))
        if version is not None:
            s.execute(update(ModelVersionRow).where(mine, ModelVersionRow.version == version)
                      .values(status="live", promoted=utc(at), promoted_by=actor))

    # -- audit ----------------------------------------------------------------------------------------------
    def audit(self, tenant: str, actor: str, action: str, job_id: str | None = None, detail: dict | None = None,
              at: float | None = None, session: Session | None = None) -> None:
        with self._session(session) as s:
            s.add(AuditEvent(at=utc(at) or datetime.now(UTC), tenant=tenant, actor=actor, action=action,
                             job_id=job_id, detail=detail or {}))

    def trail(self, tenant: str, *, job_id: str | None = None, action: str | None = None, since: float | None = None,
              offset: int = 0, limit: int = 100) -> tuple[list[dict], int]:
        """(this tenant's audit events, oldest first, one page; how many match)."""
        where = [AuditEvent.tenant == tenant]
        if job_id:
            where.append(AuditEvent.job_id == job_id)
        if action:
            where.append(AuditEvent.action == action)
        if since is not None:
            where.append(AuditEvent.at >= utc(since))
        with Session(self.engine) as s:
            rows = s.scalars(select(AuditEvent).where(*where).order_by(AuditEvent.at, AuditEvent.id)
                             .offset(offset).limit(limit)).all()
            total = s.scalar(select(func.count()).select_from(AuditEvent).where(*where))
            return [{"at": epoch(r.at), "actor": r.actor, "action": r.action, "job_id": r.job_id,
                     "detail": r.detail} for r in rows], int(total or 0)

    @contextlib.contextmanager
    def _session(self, session: Session | None) -> Iterator[Session]:
        if session is not None:
            yield session
            return
        with Session(self.engine) as s, s.begin():
            yield s


def _plain(row) -> dict:
    """A registry row as a dict; times in Unix seconds."""
    out = {c.name: getattr(row, c.name) for c in row.__table__.columns}
    return {k: epoch(v) if isinstance(v, datetime) else v for k, v in out.items()}


def _job(row: JobRow) -> Job:
    return Job.model_validate(row.record | {"purged": epoch(row.purged)})


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for a writer
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(connection=None):
    """Alembic's configuration for service/migrations/, on `connection` when given."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg
