"""The durable records (service/db.py): the Alembic migrations on SQLite and on a real PostgreSQL server, job
history and audit events beside Redis, what happens while the database is away, the retention policy, and the
whole service keeping its records when Redis loses its data and the API restarts."""
import signal
import time

import httpx
import pytest
from kit import KEYS, PostgresServer, client, private_postgres, scan, submit, wait_final
from sqlalchemy import text

from service.db import Base, Records
from service.jobs import JobStore
from service.records import InputFile, JobOptions, JobState
from service.retention import purge_expired
from service.settings import hash_key
from service.storage import Storage
from worker.localstack import LocalStack, wait_until

HEAD = "0003"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'isl.db'}"
    else:
        with private_postgres() as pg:
            yield pg.url


def _schema_diff(records: Records) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with records.engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)


def test_migrations_from_an_empty_database_and_from_the_previous_revision(database, tmp_path):
    records = Records(database)
    assert records.revision() is None
    records.upgrade("0001")  # the previous schema, with a job as it wrote one
    with records.engine.begin() as c:
        c.execute(text("INSERT INTO jobs (id, tenant, state, model, received_by, created, error, record) VALUES "
                       "(:id, 'alpha', 'succeeded', 'm', 'upload', :t, '', :rec)"),
                  {"id": "a" * 32, "t": "2026-11-01 10:00:00+00:00",
                   "rec": '{"id": "' + "a" * 32 + '", "tenant": "alpha", "state": "succeeded", "created": 1.0, '
                          '"options": {"model": "m"}}'})
    records.upgrade()
    assert records.revision() == HEAD
    assert _schema_diff(records) == []  # the models and the migrations describe one schema
    old = records.job("a" * 32)
    assert old is not None and old.state == JobState.SUCCEEDED and old.purged is None
    records.audit("alpha", "key:abc", "download", "a" * 32, {"format": "nifti"})
    assert records.trail("alpha")[1] == 1 and records.trail("beta")[1] == 0
    records.upgrade()  # at head already: nothing to do, nothing lost
    assert records.job("a" * 32) is not None
    records.close()
    fresh = Records(database.replace("isl.db", "empty.db")) if database.startswith("sqlite") else None
    if fresh is not None:  # from empty straight to head
        fresh.upgrade()
        assert fresh.revision() == HEAD and _schema_diff(fresh) == []
        fresh.close()


def _job(store: JobStore, tenant="alpha"):
    job, _ = store.create(tenant, [InputFile(kind="nifti", path="image.nii.gz", bytes=10)], JobOptions(model="m"))
    return job


def test_job_history_follows_each_change_of_state_and_outlives_redis(redis_url, tmp_path):
    import redis

    records = Records(f"sqlite:///{tmp_path / 'isl.db'}")
    records.upgrade()
    store = JobStore(redis_url, records)
    job = _job(store)
    assert records.job(job.id).state == JobState.QUEUED
    store.update(job.id, stage="registration", progress=0.3)  # live state only: not history
    store.deliver(job.id, 3, "h:1", 30)
    assert records.job(job.id).state == JobState.RUNNING
    store.finish(job.id, "h:1", state=JobState.SUCCEEDED, finished=time.time(), progress=1.0)
    assert records.job(job.id).state == JobState.SUCCEEDED
    final = store.get(job.id)
    records.save_job(final.model_copy(update={"rev": final.rev - 1, "state": JobState.RUNNING}))  # a late writer
    assert records.job(job.id).state == JobState.SUCCEEDED  # an older record never overwrites a newer one
    assert store.get_owned(job.id, "alpha").id == job.id and store.get_owned(job.id, "beta") is None
    redis.Redis.from_url(redis_url).flushall()  # Redis loses its data
    assert store.get(job.id).state == JobState.SUCCEEDED
    assert store.get_owned(job.id, "alpha").state == JobState.SUCCEEDED and store.get_owned(job.id, "beta") is None
    jobs, total = store.list("alpha", 0, 10)
    assert [j.id for j in jobs] == [job.id] and total == 1
    assert store.list("beta", 0, 10) == ([], 0)


def test_records_wait_in_redis_while_the_database_is_away(redis_url):
    with private_postgres() as pg:
        assert isinstance(pg, PostgresServer)
        records = Records(pg.url)
        records.upgrade()
        store = JobStore(redis_url, records)
        pg.stop()
        job = _job(store)  # the job is accepted all the same
        store.audit("alpha", "key:abc", "submit", job.id)
        store.update(job.id, state=JobState.CANCELLED, finished=time.time())
        assert store.pending_records() == 2  # one job history (written once, as it now is), one event
        assert store.events()["history_deferred"] >= 1 and store.events()["audit_deferred"] == 1
        pg.start()
        assert store.sync_records() == 2 and store.pending_records() == 0
        assert records.job(job.id).state == JobState.CANCELLED
        events, _ = records.trail("alpha")
        assert [(e["action"], e["job_id"]) for e in events] == [("submit", job.id)]
        records.close()


def test_retention_deletes_inputs_and_results_and_keeps_the_record(redis_url, tmp_path):
    records = Records(f"sqlite:///{tmp_path / 'isl.db'}")
    records.upgrade()
    store, storage = JobStore(redis_url, records), Storage(tmp_path / "storage")
    now = time.time()
    old, recent, running = _job(store), _job(store), _job(store)
    for job, ended in ((old, now - 10 * 86400), (recent, now - 86400)):
        (storage.job_dir(job.id) / "output").mkdir(parents=True)
        (storage.job_dir(job.id) / "output" / "mask.nii.gz").write_bytes(b"x")
        store.update(job.id, state=JobState.SUCCEEDED, finished=ended)
    store.update(running.id, state=JobState.RUNNING, started=now - 20 * 86400)
    assert purge_expired(store, storage, 0) == []  # 0: kept for ever
    assert purge_expired(store, storage, 7) == [old.id]
    assert not storage.job_dir(old.id).exists() and storage.job_dir(recent.id).exists()
    assert store.get(old.id).purged is not None and records.job(old.id).purged is not None
    assert records.job(recent.id).purged is None and records.job(running.id).purged is None
    events, _ = records.trail("alpha", action="purge")
    assert [(e["actor"], e["job_id"], e["detail"]["retention_days"]) for e in events] == [("retention", old.id, 7)]
    assert purge_expired(store, storage, 7) == []  # once


def test_the_service_keeps_history_audit_and_retention_across_a_redis_loss_and_an_api_restart(
        tiny_bundle, phantom_dataset, tmp_path):
    """A real stack (SQLite, the embedded default): the audit trail of a submission and its downloads; Redis
    killed and started empty and the API restarted, and the job, its result and its trail are all still there;
    then the workers' retention sweep deletes its files (ISL_RETENTION_DAYS of 20 s) and the result is 410."""
    env = {"ISL_RETENTION_DAYS": str(20 / 86400), "ISL_RETENTION_SWEEP_S": "1"}
    with LocalStack(tmp_path / "stack", tiny_bundle.parent, tiny_bundle.name, phantom_dataset, KEYS,
                    extra_env=env) as stack:
        base = stack.url
        assert httpx.get(base + "/readyz").json()["database"] is True
        job_id = submit(base, scan(phantom_dataset)).json()["id"]
        assert wait_final(base, job_id)["state"] == "succeeded"
        with client() as c:
            mask = c.get(f"{base}/v1/jobs/{job_id}/result").content
            c.get(f"{base}/v1/jobs/{job_id}/report").raise_for_status()
        stack.kill("redis", signal.SIGKILL)  # no persistence: Redis comes back empty
        stack.start_redis()
        stack.kill("api", signal.SIGTERM)
        stack.start_api()
        with client() as c:
            job = c.get(f"{base}/v1/jobs/{job_id}").json()
            assert job["state"] == "succeeded" and job["purged"] is None, job
            assert job_id in [j["id"] for j in c.get(base + "/v1/jobs").json()["jobs"]]
            assert c.get(f"{base}/v1/jobs/{job_id}/result").content == mask
            trail = c.get(base + "/v1/audit", params={"job_id": job_id}).json()
        actor = f"key:{hash_key(KEYS['alpha'])[:12]}"
        assert [(e["actor"], e["action"], e["detail"].get("format")) for e in trail["events"]] == [
            (actor, "submit", None), (actor, "download", "nifti"), (actor, "download", "report"),
            (actor, "download", "nifti")], trail
        with client("beta") as c:
            assert c.get(f"{base}/v1/jobs/{job_id}").status_code == 404
            assert c.get(base + "/v1/audit", params={"job_id": job_id}).json()["total"] == 0
        with client() as c:
            wait_until(lambda: c.get(f"{base}/v1/jobs/{job_id}").json()["purged"], 90, "the retention sweep")
            r = c.get(f"{base}/v1/jobs/{job_id}/result")
            assert r.status_code == 410 and "retention" in r.json()["detail"], r.text
            assert c.get(base + "/v1/audit", params={"action": "purge"}).json()["events"][0]["actor"] == "retention"
        assert not (tmp_path / "stack" / "storage" / "jobs" / job_id).exists()


def test_on_postgresql_corrections_and_records_survive_a_restart_of_every_process(tiny_bundle, phantom_dataset,
                                                                                    tmp_path):
    """The compose deployment's shape (PostgreSQL, Redis with its append-only file, API, worker): a job and its
    correction; then the database, Redis, the API and the worker all stopped and started again; the job, its
    correction, the audit trail and the agreement report are all still there, and the tenant's next job still
    selects the corrected case as an atlas."""
    import SimpleITK as sitk

    with private_postgres() as pg, LocalStack(tmp_path / "stack", tiny_bundle.parent, tiny_bundle.name,
                                              phantom_dataset, KEYS, extra_env={"ISL_DATABASE_URL": pg.url},
                                              appendonly=True) as stack:
        base = stack.url
        job_id = submit(base, scan(phantom_dataset)).json()["id"]
        assert wait_final(base, job_id)["state"] == "succeeded"
        with client() as c:
            (tmp_path / "mask.nii.gz").write_bytes(c.get(f"{base}/v1/jobs/{job_id}/result").content)
            mask = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
            corrected = sitk.GetArrayFromImage(mask)
            corrected[2:5, 2:6, 2:6] = 1
            image = sitk.GetImageFromArray(corrected)
            image.CopyInformation(mask)
            sitk.WriteImage(image, str(tmp_path / "corrected.nii.gz"))
            with open(tmp_path / "corrected.nii.gz", "rb") as fh:
                made = c.post(f"{base}/v1/jobs/{job_id}/correction", files={"file": ("c.nii.gz", fh)})
            assert made.status_code == 201, made.text
            before = (c.get(f"{base}/v1/audit").json(), c.get(f"{base}/v1/models/{tiny_bundle.name}/agreement").json())
        for name in ("api", "w1"):
            stack.kill(name, signal.SIGTERM, wait=120)
        stack.kill("redis", signal.SIGTERM)
        pg.stop()
        pg.start()
        stack.start_redis()
        stack.start_api()
        stack.start_worker("w1", wait=True)
        with client() as c:
            assert c.get(f"{base}/v1/jobs/{job_id}").json()["state"] == "succeeded"
            assert [x["id"] for x in c.get(f"{base}/v1/jobs/{job_id}/corrections").json()["corrections"]] == [
                made.json()["id"]]
            after = (c.get(f"{base}/v1/audit").json(), c.get(f"{base}/v1/models/{tiny_bundle.name}/agreement").json())
            assert after == before
            with open(scan(phantom_dataset, 1), "rb") as fh:
                new = c.post(f"{base}/v1/jobs", files={"files": ("s.nii.gz", fh)}, data={"atlases": "64"}).json()
            assert wait_final(base, new["id"])["state"] == "succeeded"
            qa = c.get(f"{base}/v1/jobs/{new['id']}/report").json()["qa"]
        assert qa["atlases_from_corrections"] == [f"correction:{made.json()['id']}"]
