"""What is stored about a job and a batch: typed records and the job state enum, the one place where the states
are spelled. The JSON they dump to (in Redis) keeps the field names of the untyped records written before, so
that those still read."""
from __future__ import annotations

import re
import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL


# result formats (?format= on the result route) -> the file of the job's result that holds each
RESULT_FORMATS = {"nifti": "mask", "dicom-seg": "dicom_seg", "rtstruct": "rtstruct"}
FINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


def now() -> float:
    return round(time.time(), 3)


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputFile(_Record):
    """One stored file of a job's input (path relative to the job's input folder)."""

    name: str | None = None
    kind: str
    path: str
    bytes: int = 0
    sha256: str = ""


UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"  # a DICOM UID: digits and dots, at most 64 characters


def is_uid(value: str) -> bool:
    return len(value) <= 64 and re.match(UID_PATTERN, value) is not None


class JobOptions(_Record):
    model: str
    atlases: int | None = None
    priority: int = 5
    stow: bool = False  # a DICOMweb job: push its DICOM SEG to ISL_STOW_URL
    dimse: bool = False  # a job received over DIMSE: send its results back by C-STORE (ISL_DIMSE_DESTINATIONS)
    series_uid: str | None = None  # which DICOM series of the input, when it holds several
    sequence_series: dict[str, str] = Field(default_factory=dict)  # a DICOM study: sequence -> its series UID
    metadata: dict[str, str] = Field(default_factory=dict)  # case metadata (e.g. age_band): agreement subgroups


class ResultFile(_Record):
    path: str
    sha256: str


class JobResult(_Record):
    files: dict[str, ResultFile]
    model_version: Any = None


class Attempt(_Record):
    """One run of a job by one worker process; `outcome` stays None while it runs (or when its worker died)."""

    worker: str = ""
    holder: str = ""
    started: float
    ended: float | None = None
    outcome: str | None = None


class Job(_Record):
    id: str
    tenant: str
    state: JobState = JobState.QUEUED
    stage: str = ""
    progress: float = 0.0
    error: str = ""
    created: float
    started: float | None = None
    finished: float | None = None
    inputs: list[InputFile] = Field(default_factory=list)
    options: JobOptions
    result: JobResult | None = None
    deliveries: int = 0
    cancel_requested: bool = False
    worker: str = ""
    holder: str = ""
    push: str = ""
    attempts: list[Attempt] = Field(default_factory=list)
    purged: float | None = None  # when the retention policy deleted its input and results (Unix seconds)
    rev: int = 0  # bumped by every write of the record (jobstore/store.py): the database keeps the newest

    @property
    def received_by(self) -> str:
        """How its input came: upload (/v1/jobs, batches), dicomweb (STOW-RS) or dimse (C-STORE)."""
        return "dimse" if self.options.dimse else "dicomweb" if self.options.stow else "upload"

    def with_fields(self, **fields) -> Job:
        """A validated copy with `fields` replaced (models or plain values) and the next revision."""
        return Job.model_validate(self.model_dump() | fields | {"rev": self.rev + 1})


class Batch(_Record):
    id: str
    tenant: str
    jobs: list[str]
    created: float


class RetrainOptions(BaseModel):
    """What a retraining may change from its parent's training (POST /v1/models/{name}/retrain, `isl retrain`;
    isl/training/retrain.py says what each does)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int | None = Field(None, ge=1, le=100_000, description="segmentation training iterations (default: "
                                                                       "the parent's)")
    reg_iterations: int | None = Field(None, ge=1, le=100_000, description="registration training iterations "
                                                                           "(default: the parent's)")
    warm_start: bool = Field(True, description="start from the parent's networks (else from random weights)")
    configure: bool | None = Field(None, description="search the refinement settings again (default: as the parent "
                                                     "was trained)")
    configure_minutes: float | None = Field(None, gt=0, le=600, description="budget of that search (default: the "
                                                                            "parent's)")
    judge_cases: int = Field(10, ge=1, le=100, description="at most this many unseen cases judge the new version")
    margin: float = Field(0.0, ge=0, le=1, description="promotion: the new version's mean Dice may be at most this "
                                                       "much under its parent's")
