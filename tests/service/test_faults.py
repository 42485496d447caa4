"""Faults, against real components: a private redis-server (append-only file, fsync per write), the API and
two `isl worker` processes (Celery prefork), killed, stopped and restarted while jobs run.

The broker's visibility timeout is 2 s here, far below a job's length, so every job of this module is also
redelivered while it runs: the lease (jobstore/lease.py) must keep each one to a single run throughout."""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from jobstore.records import FINAL, JobState
from worker.localstack import LocalStack, wait_until

pytestmark = pytest.mark.slow
KEY = "fault-tenant-key-1"


@pytest.fixture(scope="module")
def stack(tiny_bundle, phantom_dataset, tmp_path_factory):  # conftest.py's FIXTURE_NEEDS: redis, subprocess
    env = {"ISL_VISIBILITY_TIMEOUT_S": "2", "ISL_LEASE_S": "3", "ISL_MAX_DELIVERIES": "3"}
    with LocalStack(tmp_path_factory.mktemp("faults"), tiny_bundle.parent, tiny_bundle.name, phantom_dataset,
                    {"ops": KEY}, workers=2, extra_env=env, appendonly=True) as s:
        try:
            yield s
        finally:
            print(s.logs())


@pytest.fixture(scope="module")
def store(stack):
    return stack.store()


def scan(phantom_dataset, i=0) -> Path:
    return sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))[i]


def submit(stack, path) -> str:
    with httpx.Client(headers={"X-API-Key": KEY}, timeout=60) as c, open(path, "rb") as fh:
        r = c.post(stack.url + "/v1/jobs", files={"files": (path.name, fh)})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_state(store, job_id, states, timeout=240) -> dict:
    return wait_until(lambda: (j := store.get(job_id)).state in states and j, timeout, f"job {job_id} in {states}")


def wait_computing(store, job_id, timeout=120) -> dict:
    """Until the job is past loading the model, inside the engine."""
    return wait_until(lambda: (j := store.get(job_id)).state == JobState.RUNNING and j.stage not in
                      ("starting", "loading model") and j, timeout, f"job {job_id} to compute")


def one_result(stack, job_id) -> None:
    """Exactly one stored result and no half-written output beside it."""
    folder = Path(stack.env["ISL_STORAGE_ROOT"]) / "jobs" / job_id
    assert sorted(p.name for p in folder.iterdir()) == ["input", "output"], list(folder.iterdir())
    assert (folder / "output" / "mask.nii.gz").is_file()


def succeeded_once(job: dict) -> None:
    outcomes = [a.outcome for a in job.attempts]
    assert job.state == JobState.SUCCEEDED and outcomes.count(JobState.SUCCEEDED) == 1, job.attempts
    assert outcomes[-1] == JobState.SUCCEEDED and all(o == "its worker stopped" for o in outcomes[:-1]), outcomes


def node(job: dict) -> str:
    return job.worker.split("@")[0]


def test_a_job_longer_than_the_visibility_timeout_runs_once(stack, store, phantom_dataset):
    job_id = submit(stack, scan(phantom_dataset))
    job = wait_state(store, job_id, FINAL)
    assert job.finished - job.started > 2 * int(stack.env["ISL_VISIBILITY_TIMEOUT_S"]), job
    succeeded_once(job)
    assert len(job.attempts) == 1 and job.deliveries == 1
    # the broker did hand the job out again while it ran; the copies were acknowledged without running
    assert store.duplicates(job_id) >= 1
    one_result(stack, job_id)


def test_kill_9_of_a_worker_mid_job_ten_times_loses_and_duplicates_nothing(stack, store, phantom_dataset):
    ids = []
    for k in range(10):
        job_id = submit(stack, scan(phantom_dataset, k % 2))
        victim = node(wait_computing(store, job_id))
        stack.kill(victim, signal.SIGKILL)  # the worker and its pool process, as when a node dies
        stack.start_worker(victim, wait=True)
        ids.append(job_id)
    jobs = [wait_state(store, i, FINAL) for i in ids]
    lost = [j.id for j in jobs if j.state != "succeeded"]
    duplicated = [j.id for j in jobs if [a.outcome for a in j.attempts].count("succeeded") != 1]
    print(json.dumps({"kills": 10, "lost": len(lost), "duplicated": len(duplicated),
                      "attempts": [len(j.attempts) for j in jobs]}))
    assert lost == [] and duplicated == []
    with httpx.Client(headers={"X-API-Key": KEY}) as c:
        metrics = c.get(stack.url + "/metrics").text
    stopped = [line for line in metrics.splitlines() if line.startswith('isl_job_events_total{event="worker_stopped"}')]
    assert stopped and float(stopped[0].split()[-1]) == 10, stopped  # every kill seen, once
    for j in jobs:
        succeeded_once(j)
        assert len(j.attempts) >= 2  # it was really interrupted, then run again
        one_result(stack, j.id)


def test_a_poison_job_ends_failed_after_n_deliveries_and_the_others_complete(stack, store, phantom_dataset):
    """The job's worker process dies every time it runs it (as under the kernel's OOM killer)."""
    poison = submit(stack, scan(phantom_dataset, 0))
    others = [submit(stack, scan(phantom_dataset, 1)) for _ in range(3)]
    kills, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 300:
        job = store.get(poison)
        if job.state in FINAL:
            break
        if job.state == JobState.RUNNING and job.holder and job.stage not in ("starting",):
            killed = job.holder
            try:
                os.kill(int(killed.rpartition(":")[2]), signal.SIGKILL)
                kills += 1
                wait_until(lambda h=killed: (j := store.get(poison)).holder != h or j.state != JobState.RUNNING,
                           60, "the poison job to be taken again")
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    job = store.get(poison)
    assert job.state == "failed" and "3 times" in job.error, job
    assert kills == 3 and job.deliveries == 3
    assert all(wait_state(store, i, FINAL).state == JobState.SUCCEEDED for i in others)


def test_sigterm_lets_the_running_job_finish(stack, store, phantom_dataset):
    job_id = submit(stack, scan(phantom_dataset))
    victim = node(wait_computing(store, job_id))
    proc = stack.named[victim]
    os.kill(proc.pid, signal.SIGTERM)  # what `docker stop` sends the worker's main process
    assert proc.wait(120) == 0  # a warm shutdown: it waited for the job
    job = store.get(job_id)
    succeeded_once(job)
    assert len(job.attempts) == 1 and node(job) == victim
    stack.start_worker(victim, wait=True)


def test_redis_restarted_with_20_queued_and_2_running_loses_nothing(stack, store, phantom_dataset):
    ids = [submit(stack, scan(phantom_dataset, k % 2)) for k in range(22)]
    wait_until(lambda: sum(store.get(i).state == "running" and store.get(i).stage not in ("starting", "loading model")
                           for i in ids) == 2, 120, "two running jobs")
    stack.kill("redis", signal.SIGKILL)  # no shutdown save: only the append-only file remains
    stack.start_redis()
    jobs = [wait_state(store, i, FINAL, timeout=600) for i in ids]
    assert [j.state for j in jobs] == ["succeeded"] * 22, [(j.id, j.state, j.error) for j in jobs]
    for j in jobs:
        succeeded_once(j)
        one_result(stack, j.id)


def test_api_restarted_while_jobs_run_loses_nothing(stack, store, phantom_dataset):
    ids = [submit(stack, scan(phantom_dataset, k % 2)) for k in range(4)]
    seen = {i: [] for i in ids}
    refused = 0

    def poll() -> bool:
        nonlocal refused
        with httpx.Client(headers={"X-API-Key": KEY}, timeout=5) as c:
            for i in ids:
                try:
                    state = c.get(f"{stack.url}/v1/jobs/{i}").json()["state"]
                except httpx.TransportError:
                    refused += 1
                    return False
                if not seen[i] or seen[i][-1] != state:
                    seen[i].append(state)
        return all(s[-1] in FINAL for s in seen.values())

    wait_until(lambda: poll() or any("running" in s for s in seen.values()), 120, "a job to start")
    stack.kill("api", signal.SIGKILL)
    assert not poll() and refused >= 1  # the API is down: clients see connection errors, not wrong states
    stack.start_api()
    wait_until(poll, 300, "every job to end, seen through the restarted API")
    order = ["queued", "running", "succeeded"]
    for i, states in seen.items():
        assert states[-1] == "succeeded", (i, states)
        assert states == sorted(states, key=order.index), (i, states)  # never backwards
        succeeded_once(store.get(i))


def test_a_job_recorded_but_never_queued_is_sent_by_the_workers(stack, store, phantom_dataset, tiny_bundle):
    """The API stopped between storing a job and queueing it: the workers' sweep sends it."""
    from service.storage import Storage

    job, _ = store.create("ops", [{"name": "scan.nii.gz", "kind": "nifti-gz", "path": "image.nii.gz"}],
                          {"model": tiny_bundle.name, "priority": 5})
    folder = Storage(Path(stack.env["ISL_STORAGE_ROOT"])).job_dir(job.id) / "input"
    folder.mkdir(parents=True)
    shutil.copy(scan(phantom_dataset), folder / "image.nii.gz")
    done = wait_state(store, job.id, FINAL, timeout=120)
    succeeded_once(done)
    assert done.started - done.created >= 10  # sent by the sweep (after 10 s here), not at once


def test_pickle_messages_are_refused_by_the_workers(stack, store, phantom_dataset):
    """The broker carries JSON only: a pickled task (the classic Celery code-execution vector) is dropped."""
    from celery import Celery

    from service.queue import TASK

    def refusals() -> int:
        logs = "".join(p.read_text() for p in Path(stack.folder).glob("w*.log"))
        return logs.count("ContentDisallowed") + logs.count("Refusing to deserialize")

    before = refusals()
    job, _ = store.create("ops", [], {"model": "tiny", "priority": 5})
    rogue = Celery("rogue", broker=stack.env["ISL_REDIS_URL"])
    rogue.conf.update(task_serializer="pickle", accept_content=["pickle"])
    rogue.send_task(TASK, args=[job.id], queue="isl", serializer="pickle")
    store.mark_sent(job.id)
    wait_until(lambda: refusals() > before, 60, "a worker to refuse the pickled message")  # the refusal, logged
    job = store.get(job.id)
    assert job.state == JobState.QUEUED and job.deliveries == 0 and store.lease_holder(job.id) is None
    assert wait_state(store, submit(stack, scan(phantom_dataset)), FINAL).state == JobState.SUCCEEDED  # still serving


def test_worker_memory_stays_bounded_over_200_failing_jobs(stack, store, tiny_bundle):
    """200 jobs whose input breaks in the worker (a truncated file that passed no check): each ends failed
    with the reason, and the worker process's resident memory does not grow with them."""
    from service.queue import Queue
    from service.storage import Storage
    from worker.tasks.settings import WorkerSettings

    settings = WorkerSettings(**{k[4:].lower(): v for k, v in stack.env.items() if k.startswith("ISL_")})
    queue, storage = Queue(settings), Storage(settings.storage_root)

    def failing_job() -> str:
        job, _ = store.create("ops", [{"name": "broken.nii.gz", "kind": "nifti-gz", "path": "image.nii.gz"}],
                              {"model": tiny_bundle.name, "priority": 5})
        (storage.job_dir(job.id) / "input").mkdir(parents=True)
        (storage.job_dir(job.id) / "input" / "image.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 200)
        queue.send(job.id)
        store.mark_sent(job.id)
        return job.id

    def rss_mb(pid: int) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    warm = [failing_job() for _ in range(20)]
    jobs = [wait_state(store, i, FINAL) for i in warm]
    assert all(j.state == "failed" and j.error for j in jobs), jobs[0]
    pids = {int(j.holder.rpartition(":")[2]) for j in jobs}
    before = {pid: rss_mb(pid) for pid in pids}
    rest = [failing_job() for _ in range(180)]
    jobs = [wait_state(store, i, FINAL) for i in rest]
    assert all(j.state == "failed" and "internal error" not in j.error for j in jobs), jobs[-1]
    after = {pid: rss_mb(pid) for pid in pids if Path(f"/proc/{pid}").exists()}
    print(json.dumps({"jobs": 200, "rss_mb_after_20": before, "rss_mb_after_200": after}))
    assert after, "the worker processes of the first jobs are gone"
    assert max(after[p] - before[p] for p in after) < 40, (before, after)
