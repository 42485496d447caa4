"""Typed records of what the database hands back (jobstore/database.py, jobstore/registry.py): a correction, a
retraining, a model version, an audit event. Frozen: a caller reads them by attribute and never changes them; times
are Unix seconds, the JSON columns plain dicts (their keys are documented on the tables, jobstore/tables.py)."""
from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, TypeVar

from jobstore.tables import epoch

R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Correction:
    """A radiologist's correction of a job's mask (CorrectionRow): `folder` holds its files under the storage root;
    `summary` what it changed (per_label volumes and distances, voxels_changed, the case's metadata)."""

    id: str
    job_id: str
    tenant: str
    model: str
    model_version: str
    actor: str
    created: float
    source: str  # nifti or dicom-seg
    folder: str
    label_sha256: str
    summary: dict[str, Any]
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Training:
    """A retraining job (TrainingRow); `state`: queued, running, succeeded or failed; `outcome`: the promotion
    rule's decision once it ended."""

    id: str
    tenant: str
    model: str
    actor: str
    state: str
    created: float
    started: float | None
    finished: float | None
    beat: float | None
    worker: str
    attempts: int
    parent_version: str
    version: str
    options: dict[str, Any]
    outcome: dict[str, Any]
    error: str


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """A tenant's retrained version of a model (ModelVersionRow); `id` is the training that made it; `status`:
    candidate, live, rejected or retired."""

    id: str
    tenant: str
    model: str
    version: str
    parent: str
    folder: str
    created: float
    status: str
    data: dict[str, Any]
    figures: dict[str, Any]
    promoted: float | None
    promoted_by: str


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    """One event of a tenant's audit trail (AuditEvent, without its tenant and id)."""

    at: float
    actor: str
    action: str
    job_id: str | None
    detail: dict[str, Any]


def typed(kind: type[R], row: Any) -> R:
    """The record `kind` of a table row: its fields read from the row's attributes, times as Unix seconds."""
    values = {f.name: getattr(row, f.name) for f in dataclasses.fields(kind)}
    return kind(**{k: epoch(v) if isinstance(v, datetime) else v for k, v in values.items()})


def fields(record: Any) -> dict[str, Any]:
    """A record's fields as a dict (a shallow copy: its JSON columns are the record's own)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
