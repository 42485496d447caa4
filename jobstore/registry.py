"""Radiologists' corrections and the model registry in the database: each tenant's retraining jobs (claimed, beaten
and ended by one worker at a time), the versions they make (lineage, validation figures, status) and which one is
live. A part of `Records` (jobstore/database.py); what it hands back are the typed records of jobstore/rows.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobstore.rows import Correction, ModelVersion, Training, fields, typed
from jobstore.tables import CorrectionRow, ModelVersionRow, TrainingRow, utc

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


class Registry:
    """A part of `Records` (jobstore/database.py), whose engine and audit it uses."""

    engine: Engine

    # -- corrections ----------------------------------------------------------------------------------------
    def add_correction(self, correction: Correction, audit: dict) -> None:
        """Record a correction and its audit event (the arguments of `audit`) in one transaction."""
        with Session(self.engine) as s, s.begin():
            s.add(CorrectionRow(**(fields(correction) | {"created": utc(correction.created)})))
            self.audit(**audit, session=s)

    def corrections(self, tenant: str, *, job_id: str | None = None, model: str | None = None) -> list[Correction]:
        """This tenant's corrections (of one job, or of one model's jobs), oldest first."""
        where = [CorrectionRow.tenant == tenant]
        if job_id:
            where.append(CorrectionRow.job_id == job_id)
        if model:
            where.append(CorrectionRow.model == model)
        with Session(self.engine) as s:
            rows = s.scalars(select(CorrectionRow).where(*where).order_by(CorrectionRow.created,
                                                                          CorrectionRow.id)).all()
            return [typed(Correction, r) for r in rows]

    # -- retraining and the model registry -------------------------------------------------------------------
    def add_training(self, row: dict, audit: dict) -> None:
        """Record a queued retraining (the fields of TrainingRow, `created` in Unix seconds) and its audit event."""
        with Session(self.engine) as s, s.begin():
            s.add(TrainingRow(**(row | {"created": utc(row["created"]), "state": "queued"})))
            self.audit(**audit, session=s)

    def training(self, training_id: str, tenant: str | None = None) -> Training | None:
        where = [TrainingRow.id == training_id] + ([TrainingRow.tenant == tenant] if tenant is not None else [])
        with Session(self.engine) as s:
            row = s.scalars(select(TrainingRow).where(*where)).first()
            return None if row is None else typed(Training, row)

    def trainings(self, tenant: str, model: str) -> list[Training]:
        """This tenant's retrainings of `model`, newest first."""
        with Session(self.engine) as s:
            rows = s.scalars(select(TrainingRow).where(TrainingRow.tenant == tenant, TrainingRow.model == model)
                             .order_by(TrainingRow.created.desc(), TrainingRow.id)).all()
            return [typed(Training, r) for r in rows]

    def active_trainings(self) -> list[Training]:
        """Every tenant's retrainings that are queued or running, oldest first (the operations page)."""
        with Session(self.engine) as s:
            rows = s.scalars(select(TrainingRow).where(TrainingRow.state.in_(("queued", "running")))
                             .order_by(TrainingRow.created, TrainingRow.id)).all()
            return [typed(Training, r) for r in rows]

    def claim_training(self, training_id: str, worker: str, stale_before: float, now: float) -> Training | None:
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

    def versions(self, tenant: str, model: str) -> list[ModelVersion]:
        """This tenant's versions of `model`, oldest first."""
        with Session(self.engine) as s:
            rows = s.scalars(select(ModelVersionRow).where(ModelVersionRow.tenant == tenant,
                                                           ModelVersionRow.model == model)
                             .order_by(ModelVersionRow.created, ModelVersionRow.id)).all()
            return [typed(ModelVersion, r) for r in rows]

    def live_version(self, tenant: str, model: str) -> ModelVersion | None:
        """The version of `model` this tenant's jobs run on; None: the base bundle."""
        with Session(self.engine) as s:
            row = s.scalars(select(ModelVersionRow).where(ModelVersionRow.tenant == tenant,
                                                          ModelVersionRow.model == model,
                                                          ModelVersionRow.status == "live")).first()
            return None if row is None else typed(ModelVersion, row)

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
