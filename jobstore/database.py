"""Durable records in a relational database (SQLAlchemy 2; the tables are jobstore/tables.py, made and changed only by
the Alembic migrations in jobstore/migrations/): each job's history, as of its last change of state, and the audit
trail of who (tenant, key id) submitted, downloaded, cancelled, corrected, retrained and promoted, and what the
retention policy deleted, when; revoked keys and batches; with jobstore/registry.py, radiologists' corrections and
the model registry (each tenant's retrained versions of a model, their lineage and validation figures, which one is
live) and the retraining jobs that make them.

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

from sqlalchemy import create_engine, delete, event, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from jobstore.errors import STORE_AWAY
from jobstore.records import FINAL, Batch, Job
from jobstore.registry import Registry
from jobstore.rows import AuditEntry, typed
from jobstore.tables import AuditEvent, BatchRow, IdempotencyKey, JobRow, RevokedKey, epoch, utc

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_LOCK = 0x15C0DB  # the advisory lock that makes concurrent upgrades (API, workers, listener) take turns


def default_url(storage_root: Path) -> str:
    return f"sqlite:///{Path(storage_root).resolve() / 'isl.db'}"


class Records(Registry):
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
        except STORE_AWAY:  # refused, timed out, or no connection: not reachable now
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

    def batch(self, batch_id: str) -> Batch | None:
        with Session(self.engine) as s:
            row = s.get(BatchRow, batch_id)
            return None if row is None else Batch(id=row.id, tenant=row.tenant, jobs=list(row.jobs),
                                                  created=epoch(row.created))

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

    # -- audit ----------------------------------------------------------------------------------------------
    def audit(self, tenant: str, actor: str, action: str, job_id: str | None = None, detail: dict | None = None,
              at: float | None = None, session: Session | None = None) -> None:
        with self._session(session) as s:
            s.add(AuditEvent(at=utc(at) or datetime.now(UTC), tenant=tenant, actor=actor, action=action,
                             job_id=job_id, detail=detail or {}))

    def trail(self, tenant: str, *, job_id: str | None = None, action: str | None = None, since: float | None = None,
              offset: int = 0, limit: int = 100) -> tuple[list[AuditEntry], int]:
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
            return [typed(AuditEntry, r) for r in rows], int(total or 0)

    @contextlib.contextmanager
    def _session(self, session: Session | None) -> Iterator[Session]:
        if session is not None:
            yield session
            return
        with Session(self.engine) as s, s.begin():
            yield s


def _job(row: JobRow) -> Job:
    return Job.model_validate(row.record | {"purged": epoch(row.purged)})


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for a writer
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(connection=None):
    """Alembic's configuration for jobstore/migrations/, on `connection` when given."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg
