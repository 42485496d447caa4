"""A small Python client of the service, and the batch submission behind `isl submit`.

    from service.client import Client
    c = Client("http://isl.hospital:8000", api_key)
    job = c.submit("scan.nii.gz")            # or a .zip / a folder of DICOM files
    job = c.wait(job["id"])                  # polls until succeeded, failed or cancelled
    c.download(job["id"], "mask.nii.gz")     # checksum verified against the report

Torch-free and dependency-light (httpx), so hospital scripts can use it on any machine."""
from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx

from imaging.files import atomic_write_bytes, atomic_write_text
from jobstore.records import FINAL, RESULT_FORMATS, JobState


class ServiceError(Exception):
    """The service refused a request; the message carries its status and reason."""


class Client:
    def __init__(self, server: str, api_key: str, timeout: float = 60.0):
        self.http = httpx.Client(base_url=server.rstrip("/"), headers={"X-API-Key": api_key}, timeout=timeout)

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:300]
            raise ServiceError(f"{r.request.method} {r.request.url.path}: {r.status_code} {detail}")
        return r

    def correct(self, job_id: str, path: str | Path, note: str = "") -> dict:
        """Send a radiologist's correction of the job's mask (NIfTI label map on its grid, or DICOM SEG)."""
        with open(path, "rb") as fh:
            r = self.http.post(f"/v1/jobs/{job_id}/correction", files={"file": (Path(path).name, fh)},
                               data={"note": note})
        return self._check(r).json()

    def agreement(self, model: str, png: str | Path | None = None, group_by: str | None = None) -> dict:
        """The model's agreement report (split by a metadata key with `group_by`); with `png`, its Bland-Altman
        plot saved there too."""
        params = {"group_by": group_by} if group_by else {}
        report = self._check(self.http.get(f"/v1/models/{model}/agreement", params=params)).json()
        if png is not None:
            r = self._check(self.http.get(f"/v1/models/{model}/agreement", params={"format": "png"}))
            atomic_write_bytes(Path(png), r.content)
        return report

    def retrain(self, model: str, **options) -> dict:
        """Queue a retraining of `model` on its base data plus your corrections (options: see RetrainOptions)."""
        return self._check(self.http.post(f"/v1/models/{model}/retrain", json=options)).json()

    def training(self, model: str, training_id: str) -> dict:
        return self._check(self.http.get(f"/v1/models/{model}/trainings/{training_id}")).json()

    def wait_training(self, model: str, training_id: str, poll: float = 5.0, timeout: float | None = None) -> dict:
        """Polls a retraining until it has succeeded or failed."""
        t0 = time.monotonic()
        while True:
            row = self.training(model, training_id)
            if row["state"] in ("succeeded", "failed"):
                return row
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"retraining {training_id} still {row['state']} after {timeout} s")
            time.sleep(poll)

    def versions(self, model: str) -> dict:
        """The model's versions for your tenant, their lineage and figures, and which one is live."""
        return self._check(self.http.get(f"/v1/models/{model}/versions")).json()

    def promote(self, model: str, version: str, force: bool = False, reason: str = "") -> dict:
        return self._check(self.http.post(f"/v1/models/{model}/promote",
                                          json={"version": version, "force": force, "reason": reason})).json()

    def submit(self, path: str | Path | list, *, model: str | None = None, atlases: int | None = None,
               priority: int = 5, idempotency_key: str | None = None, metadata: dict[str, str] | None = None) -> dict:
        """Upload a NIfTI file, a .zip of a DICOM series or a folder of DICOM files, or, for a model of several
        sequences, a list of NIfTI or zip files, one per sequence in the model's order; returns the job."""
        if isinstance(path, list):
            files = [Path(p) for p in path]
        else:
            path = Path(path)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not files:
            raise ServiceError(f"{path}: nothing to upload")
        fields = {"model": model, "atlases": atlases, "priority": priority}
        data = {k: str(v) for k, v in fields.items() if v is not None}
        if metadata:
            data["metadata"] = json.dumps(metadata)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        handles = [open(p, "rb") for p in files]
        try:
            r = self.http.post("/v1/jobs", files=[("files", (p.name, h)) for p, h in zip(files, handles)], data=data,
                               headers=headers)
        finally:
            for h in handles:
                h.close()
        return self._check(r).json()

    def get(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def wait(self, job_id: str, poll: float = 1.0, timeout: float | None = None) -> dict:
        t0 = time.monotonic()
        while True:
            job = self.get(job_id)
            if job["state"] in FINAL:
                return job
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)

    def report(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/report")).json()

    def download(self, job_id: str, dest: str | Path, format: str = "nifti") -> Path:
        """Save the result atomically after checking its sha256 against the report."""
        dest = Path(dest)
        r = self._check(self.http.get(f"/v1/jobs/{job_id}/result", params={"format": format}))
        expected = self.report(job_id)["files"][RESULT_FORMATS[format]]["sha256"]
        if hashlib.sha256(r.content).hexdigest() != expected:
            raise ServiceError(f"job {job_id}: the downloaded result does not match its checksum")
        atomic_write_bytes(dest, r.content)
        return dest

    def cancel(self, job_id: str) -> dict:
        return self._check(self.http.delete(f"/v1/jobs/{job_id}")).json()


def _fingerprint(paths: list[Path], options: dict) -> str:
    """Same input and options -> same idempotency key, so a re-run never queues a case twice."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    files = [q for path in paths for q in (sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir()
                                           else [path])]
    for p in files:
        with open(p, "rb") as fh:
            hashlib.file_digest(fh, lambda: h)  # streams the file into the running digest
    return h.hexdigest()


def case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


SEQUENCE = re.compile(r"^(?P<case>.+)_(?P<seq>\d{4})$")  # nnU-Net raw: CASE_0000, CASE_0001...


def group_cases(paths: list[Path], sequences: bool) -> dict[str, list[Path]]:
    """Case name -> its input paths. With `sequences`, the files CASE_0000.nii.gz, CASE_0001.nii.gz... (or .zip) are
    one case of several sequences, in suffix order; each must be numbered from 0 without a gap."""
    cases: dict[str, list[Path]] = {}
    for p in paths:
        name = case_name(p)
        if sequences:
            m = SEQUENCE.match(name)
            if not m:
                raise ServiceError(f"{p}: with --sequences every file is named CASE_0000, CASE_0001... (one per "
                                   "sequence, nnU-Net's raw layout)")
            cases.setdefault(m["case"], []).append(p)
        elif name in cases:
            raise ServiceError(f"two inputs are both named {name!r}; rename one")
        else:
            cases[name] = [p]
    for name, files in cases.items():
        files.sort(key=lambda p: SEQUENCE.match(case_name(p))["seq"] if sequences else "")
        numbers = [int(SEQUENCE.match(case_name(p))["seq"]) for p in files] if sequences else [0]
        if numbers != list(range(len(files))):
            raise ServiceError(f"case {name}: sequences {[f'{n:04d}' for n in numbers]}; expected 0000 to "
                               f"{len(files) - 1:04d} without a gap or a repeat")
    return cases


FORMAT_FILES = {"dicom-seg": "seg.dcm", "rtstruct": "rtstruct.dcm"}


def submit_batch(paths: list[str], server: str, api_key: str, out: str | Path, *, parallel: int = 4,
                 model: str | None = None, atlases: int | None = None, priority: int = 5,
                 timeout: float | None = None, progress: bool = True, formats: tuple[str, ...] = (),
                 sequences: bool = False) -> dict:
    """Upload every case (at most `parallel` at once), wait, download mask + report into OUT/<case>/, and each of
    `formats` ("dicom-seg": seg.dcm, "rtstruct": rtstruct.dcm) that the job has (DICOM inputs; a case without one
    still succeeds, its `error` naming what it lacks and the report's reason).
    Resumable: a case whose result is already in OUT is skipped; an interrupted one is found again by its
    idempotency key. `sequences`: the inputs are named CASE_0000, CASE_0001... and each case sends one file per
    sequence (see group_cases). Returns {case: {"state", "job", "error"}}."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = {"model": model, "atlases": atlases, "priority": priority}
    cases = group_cases([Path(p) for p in paths], sequences)
    client = Client(server, api_key)
    lock = threading.Lock()
    summary: dict[str, dict] = {}
    bar = tqdm(total=len(cases), unit="case", disable=not progress, file=sys.stderr)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(_one_case, client, out / n, p, options, sequences, formats, timeout): n
                   for n, p in cases.items()}
        for f in as_completed(futures):
            name = futures[f]
            try:
                result = f.result()
            except (ServiceError, httpx.HTTPError, TimeoutError) as exc:
                result = {"state": JobState.FAILED.value, "job": "", "error": str(exc)}
            with lock:
                summary[name] = result
                bar.update(1)
                bar.set_postfix_str(f"{name}: {result['state']}")
    bar.close()
    return dict(sorted(summary.items()))


def _one_case(client: Client, folder: Path, paths: list[Path], options: dict, sequences: bool,
              formats: tuple[str, ...], timeout: float | None) -> dict:
    """One case of `submit_batch`: skipped when its result is in `folder`, else submitted (found again by its
    idempotency key), waited for and downloaded; the report is written last, its presence marking the case done."""
    if (folder / "report.json").is_file() and (folder / "mask.nii.gz").is_file():
        done = json.loads((folder / "report.json").read_text())
        return {"state": "skipped", "job": done.get("job_id", ""), "error": ""}
    if missing := [str(p) for p in paths if not p.exists()]:
        return {"state": JobState.FAILED.value, "job": "", "error": f"{', '.join(missing)} does not exist"}
    key = _fingerprint(paths, options)
    path = paths if sequences else paths[0]
    job = client.submit(path, **options, idempotency_key=key)
    if job["state"] in (JobState.FAILED, JobState.CANCELLED):  # an earlier run's job ended badly: try anew
        job = client.submit(path, **options, idempotency_key=f"{key}:after:{job['id']}")
    job = client.wait(job["id"], timeout=timeout)
    if job["state"] != JobState.SUCCEEDED:
        return {"state": job["state"], "job": job["id"], "error": job["error"]}
    folder.mkdir(exist_ok=True)
    client.download(job["id"], folder / "mask.nii.gz")
    report = client.report(job["id"]) | {"job_id": job["id"]}
    lacking = [f for f in formats if RESULT_FORMATS[f] not in report["files"]]
    for f in formats:
        if f not in lacking:
            client.download(job["id"], folder / FORMAT_FILES[f], format=f)
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2))  # last: its presence marks it done
    why = (report.get("dicom_exports") or {}).get("not_written_because") or "the job has none"
    return {"state": JobState.SUCCEEDED.value, "job": job["id"],
            "error": f"no {', '.join(lacking)} result: {why}" if lacking else ""}
