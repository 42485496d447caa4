"""Who gets in, against the real service (the session `stack`: redis-server, `isl serve`, `isl worker`):
every route but the health probes needs a key; missing, wrong and revoked keys are refused; another tenant's
jobs are indistinguishable from jobs that do not exist, by status, body, listing and timing."""
import ast
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from kit import KEYS, client, scan, submit, wait_final

ROOT = Path(__file__).resolve().parents[2]
PROBES = {"/healthz", "/readyz"}


@pytest.fixture(scope="module")
def routes():
    """(method, path) of every route the application serves, read from its routers."""
    from service.routes import served

    return [(method, route.path) for route in served() for method in sorted(route.methods) if method != "HEAD"]


@pytest.fixture(scope="module")
def alpha_job(stack, phantom_dataset):
    job_id = submit(stack.url, scan(phantom_dataset)).json()["id"]
    assert wait_final(stack.url, job_id)["state"] == "succeeded"
    return job_id


def fill(path: str, job_id: str) -> str:
    return path.replace("{job_id}", job_id).replace("{batch_id}", job_id)


def test_every_route_but_the_probes_needs_credentials(stack, routes, alpha_job):
    assert {p for _, p in routes} >= {"/v1/jobs", "/v1/jobs/{job_id}", "/openapi.json", "/metrics", "/dicomweb/studies"}
    open_routes = []
    for method, path in routes:
        url = stack.url + fill(path, alpha_job)
        for headers in ({}, {"X-API-Key": "not-a-key"}, {"Authorization": "Bearer not-a-key"},
                        {"Authorization": "Basic YTpi"}):
            r = httpx.request(method, url, headers=headers, timeout=30)
            if r.status_code != 401:
                open_routes.append((method, path, headers, r.status_code))
            else:
                assert r.headers["www-authenticate"].startswith("Bearer") and "API key" in r.json()["detail"]
    assert {p for _, p, _, _ in open_routes} == PROBES, open_routes
    assert all(code == 200 for *_, code in open_routes), open_routes


def test_a_revoked_key_is_refused_at_once(stack):
    with client("gamma") as c:
        assert c.get(stack.url + "/v1/jobs").status_code == 200
    env = {k: v for k, v in stack.env.items() if k != "ISL_API_KEYS"}
    out = subprocess.run([sys.executable, "-m", "worker.cli", "revoke-key"], input=KEYS["gamma"] + "\n", cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with client("gamma") as c:
        for path in ("/v1/jobs", "/v1/models", "/metrics", "/openapi.json"):
            r = c.get(stack.url + path)
            assert r.status_code == 401, (path, r.status_code)
    with client("alpha") as c:  # the other tenants' keys still work
        assert c.get(stack.url + "/v1/jobs").status_code == 200


def test_another_tenants_job_looks_like_no_job(stack, alpha_job):
    missing = uuid.uuid4().hex
    with client("beta") as c:
        for method, suffix in (("GET", ""), ("GET", "/result"), ("GET", "/result?format=dicom-seg"),
                               ("GET", "/report"), ("GET", "/events"), ("DELETE", "")):
            theirs = c.request(method, f"{stack.url}/v1/jobs/{alpha_job}{suffix}")
            nothing = c.request(method, f"{stack.url}/v1/jobs/{missing}{suffix}")
            assert theirs.status_code == nothing.status_code == 404, (method, suffix, theirs.text)
            assert theirs.json()["detail"].replace(alpha_job, "ID") == nothing.json()["detail"].replace(missing, "ID")
            assert set(theirs.headers) == set(nothing.headers)
        assert alpha_job not in c.get(stack.url + "/v1/jobs?limit=200").text
        assert c.get(f"{stack.url}/v1/batches/{alpha_job}").status_code == 404
    with client("alpha") as c:  # and the job was not touched by the refused cancel
        assert c.get(f"{stack.url}/v1/jobs/{alpha_job}").json()["state"] == "succeeded"


def test_existence_does_not_show_in_response_time(stack, alpha_job):
    """Interleaved requests for another tenant's job and for no job: the same work (one lookup), so the
    same time, within what this shared machine's noise allows."""
    missing = uuid.uuid4().hex
    times = {"theirs": [], "nothing": []}
    with client("beta") as c:
        for _ in range(5):
            c.get(f"{stack.url}/v1/jobs/{missing}")
        for _ in range(200):
            for name, job_id in (("theirs", alpha_job), ("nothing", missing)):
                t0 = time.perf_counter()
                assert c.get(f"{stack.url}/v1/jobs/{job_id}").status_code == 404
                times[name].append(time.perf_counter() - t0)
    a, b = statistics.median(times["theirs"]), statistics.median(times["nothing"])
    print(f"median 404 for another tenant's job {a * 1e3:.2f} ms, for no job {b * 1e3:.2f} ms")
    assert abs(a - b) < max(0.0005, 0.15 * min(a, b)), (a, b)


@pytest.mark.subprocess
def test_checkpoints_load_with_weights_only_and_a_pickle_payload_runs_nothing(tmp_path):
    """Every torch.load in the code says weights_only=True; a checkpoint carrying code is refused unrun."""
    calls = []
    packages = ("imaging", "segmentation", "registration", "isl", "worker", "service")
    sources = [p for package in packages for p in (ROOT / package).rglob("*.py")]
    assert any(p.name == "checkpoint.py" for p in sources)  # where the one torch.load lives
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                    getattr(node.func.value, "id", "") == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                calls.append((path.name, isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value))
    assert calls and all(ok for _, ok in calls), calls
    marker = tmp_path / "pwned"
    code = f"""
import os, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"kind": "isl-segmentation", "state_dict": Payload()}}, "{tmp_path / 'evil.pt'}")
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    assert not marker.exists()
    from imaging.errors import BundleError
    from segmentation.bundle import SegmentationModel

    with pytest.raises(BundleError, match="not a loadable checkpoint"):
        SegmentationModel.load(tmp_path / "evil.pt")
    assert not marker.exists()


class _Payload:
    """Unpickling this creates `marker`: proof that a pickled message's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_worker_and_the_service_refuse_pickled_messages(tmp_path):
    """The real Celery applications (the worker's, and the service's sender) decode a message the way a
    consumer does (kombu, with the app's accept_content): a pickled body is refused unread, JSON is read."""
    import pickle

    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import dumps, loads, prepare_accept_content

    from service.queue import Queue
    from service.settings import Settings
    from worker.tasks import app as worker_app

    marker = tmp_path / "pwned"
    body = pickle.dumps(_Payload(marker))
    for app in (worker_app, Queue(Settings()).app):
        accept = prepare_accept_content(app.conf.accept_content)  # as Celery's consumer does
        with pytest.raises(ContentDisallowed):
            loads(body, "application/x-python-serialize", "binary", accept=accept)
        assert not marker.exists()
        content_type, encoding, data = dumps([["0" * 32], {}, {}], app.conf.task_serializer)
        assert loads(data, content_type, encoding, accept=accept) == [["0" * 32], {}, {}]
    pickle.loads(body)  # the payload does run when unpickled: the refusal above is what kept it out
    assert marker.exists()
