"""The durable records (jobstore/database.py): the Alembic migrations on SQLite and on a real PostgreSQL server, job
history and audit events beside Redis, what happens while the database is away, the retention policy, and the
whole service keeping its records when Redis loses its data and the API restarts."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from kit import KEYS, PostgresServer, client, private_postgres, scan, submit, wait_final
from sqlalchemy import text

from jobstore.database import Records
from jobstore.records import InputFile, JobOptions, JobState
from jobstore.store import JobStore
from jobstore.tables import Base
from service.retention import purge_expired
from service.settings import hash_key
from service.storage import Storage
from worker.localstack import LocalStack, wait_until

HEAD = "0005"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
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
    records.upgrade("0003")  # the revision before head, with a correction as it wrote one
    with records.engine.begin() as c:
        c.execute(text("INSERT INTO corrections (id, job_id, tenant, model, model_version, actor, created, source, "
                       "folder, label_sha256, summary, note) VALUES (:id, :job, 'alpha', 'm', 'm-1', 'key:abc', :t, "
                       "'nifti', 'corrections/x', :sha, '{}', '')"),
                  {"id": "c" * 32, "job": "a" * 32, "t": "2026-11-02 10:00:00+00:00", "sha": "0" * 64})
    records.upgrade()
    assert records.revision() == HEAD
    assert _schema_diff(records) == []  # the models and the migrations describe one schema
    old = records.job("a" * 32)
    assert old is not None and old.state == JobState.SUCCEEDED and old.purged is None
    assert [c.id for c in records.corrections("alpha", model="m")] == ["c" * 32]
    assert records.versions("alpha", "m") == [] and records.live_version("alpha", "m") is None  # 0004's registry
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


@pytest.mark.parametrize("with_database", [True, False])
def test_one_idempotency_key_makes_one_job_however_many_threads_race(redis_url, tmp_path, monkeypatch,
                                                                     with_database):
    """Check-and-create is one step: the database's primary key decides (with a database), else one Redis script;
    16 threads at once, each slowed by 20 ms before it creates and, with a database, inside its transaction between
    the job's row and the key's, make one job, and every thread is handed it."""
    from concurrent.futures import ThreadPoolExecutor

    records = Records(f"sqlite:///{tmp_path / 'isl.db'}") if with_database else None
    if records is not None:
        records.upgrade()
        save = records.save_job
        monkeypatch.setattr(records, "save_job", lambda job, session=None: (time.sleep(0.02), save(job, session)))
    store = JobStore(redis_url, records)
    create = store.create

    def slowly(*a, **kw):
        time.sleep(0.02)
        return create(*a, **kw)

    with ThreadPoolExecutor(16) as pool:
        made = list(pool.map(lambda _: slowly("alpha", [], JobOptions(model="m"), "scan-7"), range(16)))
    assert len({job.id for job, _ in made}) == 1 and sum(created for _, created in made) == 1
    assert store.queue_depth() == 1
    if records is not None:
        assert len(records.unfinished()) == 1
        redis.Redis.from_url(redis_url).flushall()  # Redis forgets the key; the database does not
        assert store.create("alpha", [], JobOptions(model="m"), "scan-7")[0].id == made[0][0].id


def test_revocations_and_unfinished_jobs_outlive_redis(redis_url, tmp_path):
    """A revoked key stays revoked when Redis comes back empty; a queued job Redis lost is restored and sent once
    (a second sweep sends nothing); one whose input is gone ends failed with the reason."""
    records = Records(f"sqlite:///{tmp_path / 'isl.db'}")
    records.upgrade()
    store = JobStore(redis_url, records)
    store.revoke("ab" * 32)
    kept, gone = _job(store), _job(store)
    redis.Redis.from_url(redis_url).flushall()
    assert store.revoked("ab" * 32) and not store.revoked("cd" * 32)
    assert store.get(kept.id).state == JobState.QUEUED and store.position(kept.id) is None  # the database's view
    sent = []
    assert store.restore_lost(lambda i, p: sent.append(i), lambda i: i == kept.id, older_than_s=60) == []  # too new
    assert store.restore_lost(lambda i, p: sent.append(i), lambda i: i == kept.id, older_than_s=0) == [kept.id]
    assert store.restore_lost(lambda i, p: sent.append(i), lambda i: i == kept.id, older_than_s=0) == []
    assert sent == [kept.id] and store.position(kept.id) == 0
    assert store.get(kept.id).stage == "requeued: the queue lost it"
    assert store.get(gone.id).state == JobState.FAILED and "no longer on disk" in store.get(gone.id).error


@pytest.mark.postgres
def test_records_wait_in_redis_while_the_database_is_away(redis_url):
    from sqlalchemy.exc import OperationalError

    with private_postgres() as pg:
        assert isinstance(pg, PostgresServer)
        records = Records(pg.url)
        records.upgrade()
        store = JobStore(redis_url, records)
        job = _job(store)
        pg.stop()
        with pytest.raises(OperationalError):  # no job is accepted that the database does not know (the API: 503)
            _job(store)
        assert store.queue_depth() == 1
        store.audit("alpha", "key:abc", "submit", job.id)  # what happens to an accepted job waits in Redis
        store.update(job.id, state=JobState.CANCELLED, finished=time.time())
        assert store.pending_records() == 2  # one job history (written once, as it now is), one event
        assert store.events()["history_deferred"] >= 1 and store.events()["audit_deferred"] == 1
        pg.start()
        assert store.sync_records() == 2 and store.pending_records() == 0
        assert records.job(job.id).state == JobState.CANCELLED
        events, _ = records.trail("alpha")
        assert [(e.action, e.job_id) for e in events] == [("submit", job.id)]
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
    assert [(e.actor, e.job_id, e.detail["retention_days"]) for e in events] == [("retention", old.id, 7)]
    assert purge_expired(store, storage, 7) == []  # once


@pytest.mark.redis
@pytest.mark.subprocess
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


@pytest.fixture(scope="module")
def registry_bundle(phantom_dataset, tmp_path_factory) -> Path:
    """A tiny bundle trained on 4 phantoms (2 held out), so that 2 cases are left that neither it nor its retrained
    versions train on: the promotion rule judges on them."""
    import torch

    from isl.training.train import BundleTrainConfig, train_bundle

    out = tmp_path_factory.mktemp("registry") / "tiny"
    cfg = BundleTrainConfig(holdout=2, cases=4, validation=0, configure=False, name="tiny")
    cfg.training.iterations, cfg.registration.iterations = 30, 20
    train_bundle(phantom_dataset, out, cfg, torch.device("cpu"), progress=lambda m: None)
    return out


def _corrected(c, base: str, job_id: str, folder: Path) -> dict:
    """The job's mask with a block of label 1 drawn in, sent back as its correction."""
    import SimpleITK as sitk

    (folder / "mask.nii.gz").write_bytes(c.get(f"{base}/v1/jobs/{job_id}/result").content)
    mask = sitk.ReadImage(str(folder / "mask.nii.gz"))
    corrected = sitk.GetArrayFromImage(mask)
    corrected[2:5, 2:6, 2:6] = 1
    image = sitk.GetImageFromArray(corrected)
    image.CopyInformation(mask)
    sitk.WriteImage(image, str(folder / "corrected.nii.gz"))
    with open(folder / "corrected.nii.gz", "rb") as fh:
        made = c.post(f"{base}/v1/jobs/{job_id}/correction", files={"file": ("c.nii.gz", fh)})
    assert made.status_code == 201, made.text
    return made.json()


def _refined_with(c, base: str, path: Path) -> dict:
    """The report of a job of `path` refined with every atlas on offer."""
    with open(path, "rb") as fh:
        new = c.post(f"{base}/v1/jobs", files={"files": ("s.nii.gz", fh)}, data={"atlases": "64"}).json()
    assert wait_final(base, new["id"])["state"] == "succeeded"
    return c.get(f"{base}/v1/jobs/{new['id']}/report").json()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.subprocess
def test_on_postgresql_the_loop_of_corrections_retraining_and_promotion_survives_a_restart_of_every_process(
        registry_bundle, phantom_dataset, tmp_path):
    """The compose deployment's shape (PostgreSQL, Redis with its append-only file, API, a worker consuming both the
    refinement and the `train` queues): a job and its correction; the next job selects the corrected case as an
    atlas; `isl retrain` queues a retraining that makes a new version from the base data and the correction, judged
    against its parent on cases neither trained on and promoted by the rule; the next job runs on it without a
    worker restart. Then the database, Redis, the API and the worker all stopped and started again: the job, its
    correction, the audit trail, the agreement report and the registry are all still there, and jobs still run on
    the promoted version. A version the rule rejected goes live only with force and a reason; back to the base."""
    name = registry_bundle.name
    with private_postgres() as pg, LocalStack(tmp_path / "stack", registry_bundle.parent, name, phantom_dataset,
                                              KEYS, extra_env={"ISL_DATABASE_URL": pg.url}, appendonly=True,
                                              queues="isl,train") as stack:
        base = stack.url
        job_id = submit(base, scan(phantom_dataset)).json()["id"]
        assert wait_final(base, job_id)["state"] == "succeeded"
        with client() as c:
            made = _corrected(c, base, job_id, tmp_path)
            first = c.get(f"{base}/v1/models/{name}/versions").json()
            parent = first["live"]
            assert first["versions"] == [] and first["base"] == {"version": parent, "status": "live"}
            qa = _refined_with(c, base, scan(phantom_dataset, 1))["qa"]
            assert qa["atlases_from_corrections"] == [f"correction:{made['id']}"]
        env = {"ISL_API_KEY": KEYS["alpha"], "PATH": "/usr/bin:/bin"}
        run = subprocess.run([sys.executable, "-m", "worker.cli", "retrain", "--model", name, "--server", base,
                              "--iterations", "60", "--reg-iterations", "20", "--wait", "--timeout", "300"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr + stack.logs()
        trained = json.loads(run.stdout)
        assert trained["state"] == "succeeded" and trained["parent_version"] == parent, trained
        outcome = trained["outcome"]
        assert outcome["judged"] and outcome["promoted"] and outcome["cases"] == 2, outcome
        assert outcome["mean_dice"] >= outcome["parent_mean_dice"]
        with client() as c:
            listed = c.get(f"{base}/v1/models/{name}/versions").json()
            assert listed["live"] == trained["version"] != parent and listed["base"]["status"] == "base"
            version = listed["versions"][0]
            assert (version["parent"], version["status"], version["promoted_by"]) == (parent, "live", "rule")
            assert version["data"]["corrections"] == [made["id"]] and version["data"]["base_cases"] == 4
            assert version["figures"]["judged_cases"] == ["phantom_006", "phantom_007"]
            assert c.get(f"{base}/v1/models").json()["models"][name]["live"] == trained["version"]
            with client("beta") as other:  # another tenant's registry: its own, still on the base bundle
                assert other.get(f"{base}/v1/models/{name}/versions").json()["live"] == parent
            report = _refined_with(c, base, scan(phantom_dataset, 1))
            assert report["model_version"] == trained["version"]  # picked up without a worker restart
            assert report["qa"]["atlases_from_corrections"] == [f"correction:{made['id']}"]
            before = (c.get(f"{base}/v1/audit").json(), c.get(f"{base}/v1/models/{name}/agreement").json(),
                      c.get(f"{base}/v1/models/{name}/versions").json())
            png = c.get(f"{base}/v1/models/{name}/agreement", params={"format": "png"})
            assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        actions = [(e["actor"], e["action"]) for e in before[0]["events"]]
        assert ("rule", "promote") in actions and actions.count(("key:" + hash_key(KEYS["alpha"])[:12], "retrain")) == 1
        for proc in ("api", "w1"):
            stack.kill(proc, signal.SIGTERM, wait=120)
        stack.kill("redis", signal.SIGTERM)
        pg.stop()
        pg.start()
        stack.start_redis()
        stack.start_api()
        stack.start_worker("w1", wait=True)
        with client() as c:
            assert c.get(f"{base}/v1/jobs/{job_id}").json()["state"] == "succeeded"
            assert [x["id"] for x in c.get(f"{base}/v1/jobs/{job_id}/corrections").json()["corrections"]] == [
                made["id"]]
            after = (c.get(f"{base}/v1/audit").json(), c.get(f"{base}/v1/models/{name}/agreement").json(),
                     c.get(f"{base}/v1/models/{name}/versions").json())
            assert after == before
            assert _refined_with(c, base, scan(phantom_dataset, 0))["model_version"] == trained["version"]
            _promotions(c, base, name, pg.url, parent, trained["version"])


def _promotions(c, base: str, name: str, database: str, parent: str, live: str) -> None:
    """A version the rule rejected: refused without force, refused with force but no reason, live with both (and
    audited as forced); then back to the base bundle."""
    records = Records(database)
    try:
        records.add_training({"id": "f" * 32, "tenant": "alpha", "model": name, "actor": "test", "created": 1.0,
                              "parent_version": live, "options": {}},
                             {"tenant": "alpha", "actor": "test", "action": "retrain"})
        assert records.claim_training("f" * 32, "test:1", 0.0, 2.0) is not None
        rejected = {"id": "f" * 32, "tenant": "alpha", "model": name, "version": f"{name}-rejected", "parent": live,
                    "folder": "models/none", "created": 3.0, "data": {}, "figures": {"promoted": False,
                                                                                     "reason": "worse"}}
        assert records.finish_training("f" * 32, "test:1", state="succeeded", finished=3.0, version=rejected,
                                       outcome={"judged": True, "promoted": False, "reason": "worse"})
    finally:
        records.close()
    url = f"{base}/v1/models/{name}/promote"
    r = c.post(url, json={"version": f"{name}-rejected"})
    assert r.status_code == 409 and "did not pass the promotion rule (worse)" in r.json()["detail"], r.text
    assert c.post(url, json={"version": f"{name}-rejected", "force": True}).status_code == 422
    assert c.post(url, json={"version": "no-such-version"}).status_code == 404
    r = c.post(url, json={"version": f"{name}-rejected", "force": True, "reason": "reviewed by hand"})
    assert r.status_code == 200 and c.get(f"{base}/v1/models/{name}/versions").json()["live"] == f"{name}-rejected"
    statuses = {v["version"]: v["status"] for v in c.get(f"{base}/v1/models/{name}/versions").json()["versions"]}
    assert statuses == {live: "retired", f"{name}-rejected": "live"}
    assert c.post(url, json={"version": parent}).status_code == 200
    assert c.get(f"{base}/v1/models/{name}/versions").json()["live"] == parent
    forced = c.get(f"{base}/v1/audit", params={"action": "promote"}).json()["events"]
    assert [(e["detail"]["version"], e["detail"]["forced"]) for e in forced if e["actor"] != "rule"] == [
        (f"{name}-rejected", True), (parent, False)]


def test_a_retraining_runs_once_and_a_silent_workers_one_is_taken_over(database):
    """The registry's claim on a retraining: one worker claims it, a redelivered copy does not; a worker that has
    not beaten for three leases loses it to another, whose outcome alone is recorded; promotion makes one version
    live per tenant and model and retires the one before."""
    records = Records(database)
    records.upgrade()
    row = {"id": "b" * 32, "tenant": "alpha", "model": "m", "actor": "key:x", "created": 100.0,
           "parent_version": "m-base", "options": {"iterations": 5}}
    records.add_training(row, {"tenant": "alpha", "actor": "key:x", "action": "retrain"})
    assert records.training("b" * 32, "beta") is None and records.training("b" * 32, "alpha").state == "queued"
    claimed = records.claim_training("b" * 32, "host:1", stale_before=90.0, now=101.0)
    assert (claimed.worker, claimed.attempts) == ("host:1", 1)
    assert records.claim_training("b" * 32, "host:2", stale_before=95.0, now=102.0) is None  # beat at 101: alive
    assert records.beat_training("b" * 32, "host:1", 110.0)
    claimed = records.claim_training("b" * 32, "host:2", stale_before=111.0, now=200.0)
    assert (claimed.worker, claimed.attempts) == ("host:2", 2)  # a worker would give up past ISL_MAX_DELIVERIES
    assert not records.beat_training("b" * 32, "host:1", 201.0)  # the first worker learns it lost it
    version = {"id": "b" * 32, "tenant": "alpha", "model": "m", "version": "m-new", "parent": "m-base",
               "folder": "models/alpha/m/x", "created": 300.0, "data": {"corrections": ["c"]}, "figures": {}}
    assert not records.finish_training("b" * 32, "host:1", state="succeeded", finished=300.0, version=version,
                                       outcome={"judged": True, "promoted": True})
    assert records.versions("alpha", "m") == []
    assert records.finish_training("b" * 32, "host:2", state="succeeded", finished=300.0, version=version,
                                   outcome={"judged": True, "promoted": True})
    assert records.live_version("alpha", "m").version == "m-new" and records.live_version("beta", "m") is None
    assert records.claim_training("b" * 32, "host:3", stale_before=4e9, now=400.0) is None  # ended: not run again
    records.promote("alpha", "m", None, "key:x", 500.0, {"version": "m-base"})
    assert records.live_version("alpha", "m") is None
    assert [v.status for v in records.versions("alpha", "m")] == ["retired"]
    records.close()


def test_a_queued_job_whose_message_the_broker_lost_is_sent_again(redis_url):
    """A queued job of which the broker holds no message (a failover lost it between kombu's pop and its record of
    the delivery) is found by the sweep and sent again; one whose message waits, or is delivered, is not."""
    from service.queue import Queue
    from service.settings import Settings

    store, queue = JobStore(redis_url), Queue(Settings(redis_url=redis_url, queue="q"))
    kept, lost = _job(store), _job(store)
    queue.send(kept.id, 0)
    queue.send(lost.id, 5)  # kombu's queue of priorities 3-5: "q\x06\x163"
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert (r.llen("q"), r.llen("q\x06\x163")) == (1, 1)
    sent = []
    assert store.resend_lost_messages("q", lambda i, p: sent.append(i), older_than_s=0) == [] and sent == []
    r.delete("q\x06\x163")  # the broker loses that message
    assert store.resend_lost_messages("q", lambda i, p: sent.append(i), older_than_s=60) == []  # too recent
    assert store.resend_lost_messages("q", queue.send, older_than_s=0) == [lost.id]
    assert r.llen("q\x06\x163") == 1
    assert store.resend_lost_messages("q", lambda i, p: sent.append(i), older_than_s=0) == []
    message = r.rpop("q")  # delivered: kombu keeps it in its hash of unacknowledged messages
    r.hset("unacked", "tag-1", json.dumps([json.loads(message), "", "q"]))
    assert store.resend_lost_messages("q", lambda i, p: sent.append(i), older_than_s=0) == [] and sent == []


@pytest.mark.postgres
def test_a_database_that_is_away_is_a_503_within_seconds_and_redis_serves_what_it_holds(redis_url, tmp_path):
    """PostgreSQL stopped under the API: an upload is 503 with Retry-After within seconds (no job is accepted that
    the database does not know), a job Redis holds is still served, /readyz says the database is down."""
    import gzip

    import nibabel as nib
    import numpy as np
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    models = tmp_path / "models" / "tiny"
    models.mkdir(parents=True)
    (models / "bundle.json").write_text(json.dumps({"version": "1", "labels": {"1": "organ"}}))
    volume = gzip.compress(nib.Nifti1Image(np.random.default_rng(0).normal(100, 10, (16,) * 3).astype(np.float32),
                                           np.eye(4)).to_bytes())
    with private_postgres() as pg:
        app = create_app(Settings(redis_url=redis_url, storage_root=tmp_path / "storage", models_dir=models.parent,
                                  default_model="tiny", database_url=pg.url, min_free_mb=0,
                                  api_keys=f"alpha:{hash_key(KEYS['alpha'])}"))
        c = TestClient(app, headers={"X-API-Key": KEYS["alpha"]})
        job_id = c.post("/v1/jobs", files={"files": ("a.nii.gz", volume)}).json()["id"]
        pg.stop()
        t0 = time.monotonic()
        r = c.post("/v1/jobs", files={"files": ("a.nii.gz", volume)})
        refused_s = time.monotonic() - t0
        assert r.status_code == 503 and r.headers["retry-after"] and "database" in r.json()["detail"], r.text
        print(json.dumps({"upload_503_with_database_away_s": round(refused_s, 3)}))
        assert refused_s < 30, refused_s  # not hung: connect_timeout 3 s, pool_timeout 5 s, and a busy machine's slack
        assert c.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
        t0 = time.monotonic()
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["down"] == ["database"] and time.monotonic() - t0 < 30
        assert app.state.store.queue_depth() == 1
        assert not any((tmp_path / "storage" / "staging").iterdir())  # the refused upload left nothing
