"""What only the workers read, on top of the settings both sides share (service/settings.py); the same `ISL_`
environment variables (every one: docs/settings.md, made from these classes by `python -m worker.reference`)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from service.settings import Settings


class WorkerSettings(Settings):
    atlas_dir: Path | None = Field(None, description="dataset folder holding the bundles' atlas cases")
    device: str = Field("auto", description="worker device: auto, cpu or cuda")
    max_deliveries: int = Field(3, ge=1, description="a job delivered this many times without finishing ends failed")
    job_time_limit_s: int = Field(1800, ge=1, description="hard time limit of one job; it then ends failed with the "
                                                          "reason")
    lease_s: int = Field(30, ge=2, description="a running job's lease, renewed by its worker; a job whose worker died "
                                               "is requeued this long after")
    worker_max_memory_mb: int = Field(16000, ge=0, description="a worker process whose resident memory passes this "
                                                               "after a job is replaced (0: never)")
    stow_url: str = Field("", description="DICOMweb STOW-RS endpoint (…/studies) that DICOM SEG results of DICOM "
                                          "inputs are pushed to; empty: none")
    stow_api_key: str = Field("", description="sent as X-API-Key with each push, when set")
    dimse_destinations: str = Field("", description="tenant=AET@host:port,...: where the DICOM results of a job "
                                                    "received by `isl dicom-listener` are sent back by C-STORE")
    dimse_send: str = Field("dicom_seg,rtstruct", description="which results are sent back by C-STORE: dicom_seg, "
                                                              "rtstruct or both, comma-separated")
    push_attempts: int = Field(3, ge=1, description="tries of each push (STOW-RS, C-STORE) before it is given up; "
                                                    "the job then says why")
    corrections_as_atlases: bool = Field(True, description="a radiologist's correction joins the atlas bank of its "
                                                           "model for its tenant at once: the next refinement of "
                                                           "that tenant can select it")
    train_time_limit_s: int = Field(6 * 3600, ge=60, description="hard time limit of one retraining (queue "
                                                                 "ISL_TRAIN_QUEUE); it then ends failed")
    push_retry_s: float = Field(2.0, ge=0, description="wait before the second try of a push, doubled after each")

    @field_validator("dimse_destinations")
    @classmethod
    def _destinations(cls, v: str) -> str:
        from worker.tasks.dimse import destinations

        destinations(v)  # a malformed entry stops the worker at start, named
        return v

    @field_validator("dimse_send")
    @classmethod
    def _send(cls, v: str) -> str:
        kinds = [k.strip() for k in v.split(",") if k.strip()]
        if not kinds or set(kinds) - {"dicom_seg", "rtstruct"}:
            raise ValueError(f"ISL_DIMSE_SEND {v!r}: give dicom_seg, rtstruct or both, comma-separated")
        return ",".join(kinds)
