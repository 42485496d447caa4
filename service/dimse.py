"""`isl dicom-listener`: a DICOM C-STORE SCP (pynetdicom) for PACS and routers that speak DIMSE, not DICOMweb.

An association is accepted only from a calling AE title that ISL_DIMSE_CALLING_AETS gives to a tenant, and only
for image storage (CT, MR, their enhanced multi-frame forms) in an uncompressed transfer syntax; anything else is
refused at negotiation, so the sender sees it. Each instance is on disk (written whole, fsynced, renamed into
place) before its C-STORE is answered with success, under

    <storage root>/dimse/incoming/<tenant>/<series instance UID>/<SOP instance UID>.dcm

A series is complete once no association that delivered it is still open and none of its instances arrived for
ISL_DIMSE_QUIET_S; it is then claimed (renamed to dimse/claimed/<tenant>/<series UID>.<n>/dicom) and becomes a
job as a STOW-RS series does (read in the limited child, recorded, its files moved into the job, queued), with
`dimse` set so that the worker sends the results back by C-STORE. A series that cannot be read becomes a failed
job whose error says why, visible to its tenant like any other. Nothing received is lost on a restart: incoming
series are on disk and get a whole quiet time again from the restart (their sender may resume); a claimed series
is recorded under the same idempotency key, so it never becomes two jobs. A broker that cannot be reached leaves
the job recorded and unsent: the workers' sweep sends it (jobstore/lease.py `requeue_orphans`). Instances of a
series that arrive after it was claimed form a new series folder, hence a new job.

When the default model takes several sequences (T1, FLAIR...), the unit is the study, not the series: instances are
kept under their study instance UID, and a quiet study becomes one job whose series are assigned to the model's
sequences by their descriptions (imaging.dicom.assign_series); a study that holds no series or several for a
sequence becomes a failed job that lists its series."""
from __future__ import annotations

import io
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from jobstore.errors import STORE_AWAY
from jobstore.records import InputFile, JobOptions, JobState, is_uid, now
from jobstore.store import open_store
from service import metrics
from service.intake import model_sequences
from service.queue import BROKER_AWAY, Queue
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger("isl.dimse")
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def image_contexts() -> list:
    """The presentation contexts the listener supports: image storage SOP classes that the engine reads, in the
    uncompressed transfer syntaxes (a sender holding compressed images transcodes them or is told no)."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import build_context
    from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, EnhancedMRImageStorage, MRImageStorage

    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    return [build_context(c, syntaxes) for c in
            (CTImageStorage, EnhancedCTImageStorage, MRImageStorage, EnhancedMRImageStorage)]


class Listener:
    """The C-STORE SCP and its series-completion loop. `start()` serves in background threads; `stop()` ends
    both; `serve_forever()` is what the CLI runs."""

    def __init__(self, settings: Settings, host: str = "0.0.0.0"):
        self.settings, self.host = settings, host
        self.tenants = settings.tenants_by_calling_aet()
        if not self.tenants:
            raise ValueError("no calling AE title is allowed (ISL_DIMSE_CALLING_AETS is empty): set "
                             "tenant:AET|AET,... for the PACS and routers that may send")
        keyed = set(settings.tenants_by_key_hash().values())
        if unknown := sorted(set(self.tenants.values()) - keyed):
            raise ValueError(f"ISL_DIMSE_CALLING_AETS names tenants without an API key in ISL_API_KEYS: {unknown}; "
                             "they could never see their jobs")
        root = Path(settings.storage_root) / "dimse"
        self.incoming, self.claimed, self.tmp = root / "incoming", root / "claimed", root / "tmp"
        for d in (self.incoming, self.claimed, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.glob("*.part"):  # instances a crash interrupted before they were acknowledged
            stale.unlink(missing_ok=True)
        for folder in self.incoming.glob("*/*"):  # a sender cut off by the restart gets a whole quiet time again
            os.utime(folder)
        self.store = open_store(settings.redis_url, settings.database())
        self.storage, self.queue = Storage(settings.storage_root), Queue(settings)
        try:  # a model of several sequences takes a study per job; any other, a series
            self.sequences = model_sequences(settings, settings.default_model)
        except (OSError, ValueError) as exc:
            log.warning("default model %s unreadable (%s): each series becomes a job", settings.default_model, exc)
            self.sequences = []
        self.unit = "study" if len(self.sequences) > 1 else "series"
        self._lock = threading.Lock()  # between an instance landing in a series folder and that folder's claim
        self._open: dict[tuple[str, str], set[int]] = {}  # (tenant, series) -> open associations delivering it
        self._stop = threading.Event()
        self._server = self._thread = None

    # --- receiving -------------------------------------------------------------------------------------------
    def on_store(self, event) -> int:
        """One C-STORE: the instance on disk under its tenant and series before success is answered."""
        tenant = self.tenants.get(event.assoc.requestor.ae_title.strip())
        if tenant is None:  # not reachable: the association was refused
            return CANNOT_UNDERSTAND
        if shutil.disk_usage(self.tmp).free < self.settings.min_free_mb * (1 << 20):
            log.error("C-STORE from %s refused: the storage has less than %d MB free", tenant,
                      self.settings.min_free_mb)
            return OUT_OF_RESOURCES
        try:
            data = event.encoded_dataset(include_meta=True)
            study, series, sop = _uids(data, self.unit == "study")
            if self.unit == "study":
                series = study  # the folder of a model of several sequences: the whole study
        # broad on purpose: an untrusted data set may fail to parse in any way; it is answered, not raised
        except Exception as exc:  # noqa: BLE001
            log.warning("C-STORE from %s refused: %s", event.assoc.requestor.ae_title, exc)
            return CANNOT_UNDERSTAND
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            with self._lock:
                folder = self.incoming / tenant / series
                if not folder.is_dir():
                    folder.mkdir(parents=True)
                    _fsync_dir(folder.parent)
                os.replace(tmp, folder / f"{sop}.dcm")
                _fsync_dir(folder)
                os.utime(folder)  # the series' last arrival, even when the instance replaced a copy of itself
                self._open.setdefault((tenant, series), set()).add(id(event.assoc))
        except OSError as exc:
            log.error("C-STORE from %s: could not store %s: %s", event.assoc.requestor.ae_title, sop, exc)
            tmp.unlink(missing_ok=True)
            return OUT_OF_RESOURCES
        return SUCCESS

    # --- completing ------------------------------------------------------------------------------------------
    def on_association_end(self, event) -> None:
        """An association released or aborted: the series it delivered may complete once quiet."""
        with self._lock:
            for key in list(self._open):
                self._open[key].discard(id(event.assoc))
                if not self._open[key]:
                    del self._open[key]

    def complete_quiet_series(self) -> list[str]:
        """Claim every series that no open association is delivering and that was quiet for ISL_DIMSE_QUIET_S,
        and turn each claimed series (those left by a restart included) into a job; the ids of the jobs made."""
        cutoff = time.time() - self.settings.dimse_quiet_s
        for folder in sorted(self.incoming.glob("*/*")):
            with self._lock:
                key = (folder.parent.name, folder.name)
                if folder.is_dir() and key not in self._open and folder.stat().st_mtime <= cutoff:
                    target = self.claimed / folder.parent.name / f"{folder.name}.{uuid.uuid4().hex[:12]}"
                    target.mkdir(parents=True)
                    os.replace(folder, target / "dicom")
                    _fsync_dir(target)
                    _fsync_dir(folder.parent)
        made = []
        for claimed in sorted(self.claimed.glob("*/*")):
            try:
                made.append(self.make_job(claimed.parent.name, claimed))
            # broad on purpose: whatever stops one series (Redis or the database away, its untrusted files, a full
            # disk) leaves it claimed for the next round, and the others go on
            except Exception:  # noqa: BLE001
                log.exception("series %s not made a job yet; tried again next round", claimed.name)
        return made

    def make_job(self, tenant: str, claimed: Path) -> str:
        """A claimed series as a job (queued, or failed with the reason when it cannot be read); the folder is
        gone afterwards. Idempotent: a claim queued before a restart is not queued twice."""
        from service.validate import Invalid, validate, validate_study

        files = sorted((claimed / "dicom").glob("*.dcm"))
        if not files:  # a claim interrupted between its folder and its rename: nothing in it
            shutil.rmtree(claimed)
            return ""
        series = claimed.name.rsplit(".", 1)[0]
        inputs = [InputFile(name=f"{series}/{f.stem}", kind="dicom", path=f"dicom/{f.name}", bytes=f.stat().st_size,
                            sha256=Storage.sha256(f)) for f in files]
        options = JobOptions(model=self.settings.default_model, dimse=True)
        key = f"dimse:{claimed.name}"
        detail = {f"{self.unit}_uid": series, "instances": len(files)}
        try:
            if self.unit == "study":
                validate_study(claimed / "dicom", self.sequences, {})
            else:
                validate(claimed / "dicom")
        except Invalid as exc:
            job, created = self.store.create(tenant, inputs, options, key)
            if created:
                self.store.audit(tenant, "dimse", "submit", job.id, detail)
            if job.state == JobState.QUEUED:  # (a crash may have come between the record and this)
                self.store.mark_sent(job.id)
                self.store.update(job.id, state=JobState.FAILED, finished=now(),
                                  error=f"{self.unit} {series} received over DIMSE was refused before queueing: "
                                        f"{exc}")
                log.warning("%s %s from tenant %s refused: %s", self.unit, series, tenant, exc)
            shutil.rmtree(claimed)
            return job.id
        job, created = self.store.create(tenant, inputs, options, key)
        if created:
            self.store.audit(tenant, "dimse", "submit", job.id, detail)
        target = self.storage.job_dir(job.id) / "input"
        if not target.exists():  # (recorded before a crash: its input not yet moved in)
            target.parent.mkdir(parents=True, exist_ok=True)
            claimed.rename(target)
        shutil.rmtree(claimed, ignore_errors=True)  # what is left of a claim recorded before a restart
        if created or job.state == JobState.QUEUED:
            try:
                self.queue.send(job.id, options.priority)
                self.store.mark_sent(job.id)
            except (*BROKER_AWAY, *STORE_AWAY) as exc:  # recorded and unsent: the workers' sweep sends it
                log.warning("job %s recorded but not sent (%s); the workers' sweep will send it", job.id, exc)
        metrics.UPLOADED.inc(sum(i.bytes for i in inputs))
        log.info("%s %s from tenant %s (%d instances) is job %s", self.unit, series, tenant, len(files), job.id)
        return job.id

    def _complete_loop(self) -> None:
        period = min(1.0, self.settings.dimse_quiet_s / 4)
        while not self._stop.wait(period):
            try:
                self.complete_quiet_series()
            # broad on purpose: this thread completes every series; one bad round must not end it (the series stay
            # on disk and are tried again)
            except Exception:  # noqa: BLE001
                log.exception("completing received series failed; retried in %.1f s", period)

    # --- running ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.settings.dimse_ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = sorted(self.tenants)
        ae.supported_contexts = image_contexts()
        self._server = ae.start_server((self.host, self.settings.dimse_port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self.on_store),
                                                     (evt.EVT_RELEASED, self.on_association_end),
                                                     (evt.EVT_ABORTED, self.on_association_end),
                                                     (evt.EVT_CONN_CLOSE, self.on_association_end)])
        self._thread = threading.Thread(target=self._complete_loop, name="series-completion", daemon=True)
        self._thread.start()
        log.info("listening as %s on %s:%d for %s", self.settings.dimse_ae_title, self.host,
                 self.settings.dimse_port, ", ".join(sorted(self.tenants)))

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(10)

    def serve_forever(self) -> None:
        import signal

        self.start()
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            while not self._stop.wait(1):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()


def _fsync_dir(folder: Path) -> None:
    """A rename or a new entry in `folder` survives a power loss once this returns."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _uids(data: bytes, by_study: bool = False) -> tuple[str, str, str]:
    """(study, series and SOP instance UIDs) of an encoded instance, those that name the folder and the file checked
    to be UIDs (the study's only `by_study`)."""
    import pydicom

    names = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(names))
    values = tuple(str(ds.get(name, "")).strip() for name in names)
    for name, value in zip(names, values):
        if (name != "StudyInstanceUID" or by_study) and not is_uid(value):
            raise ValueError(f"{name} {value!r} is not a UID")
    return values
