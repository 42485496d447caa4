"""The operators' load scenario (benchmarks/locustfile.py) runs against the real service (the session
`stack`), briefly: no request fails, and every job it queued completes with the API's wait estimate recorded.
The committed figures come from benchmarks/load_bench.py (50 users, 2 minutes, 2 workers)."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kit import KEYS, scan, wait_final

ROOT = Path(__file__).resolve().parents[2]


def test_locust_scenario_runs_clean_against_the_service(stack, phantom_dataset, tmp_path):
    locust = shutil.which("locust", path=str(Path(sys.executable).parent))
    if locust is None:
        pytest.skip("locust is not installed (pip install -e '.[test]')")
    env = {**stack.env, "ISL_API_KEY": KEYS["alpha"], "ISL_LOAD_SCAN": str(scan(phantom_dataset)),
           "ISL_LOAD_UPLOADERS": "2", "ISL_LOAD_UPLOAD_EVERY_S": "6", "ISL_LOAD_JOBS_LOG": str(tmp_path / "jobs.jsonl")}
    out = subprocess.run([locust, "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--host", stack.url, "--headless",
                          "-u", "8", "-r", "8", "-t", "15s", "--csv", str(tmp_path / "run"), "--only-summary"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "run_stats.csv"))}
    assert int(rows["Aggregated"]["Failure Count"]) == 0 and int(rows["Aggregated"]["Request Count"]) > 50, rows
    assert int(rows["POST /v1/jobs"]["Request Count"]) >= 4 and "GET /v1/jobs/{id}" in rows
    jobs = [json.loads(line) for line in (tmp_path / "jobs.jsonl").read_text().splitlines()]
    # position None: a worker had already taken the job when the upload was answered
    assert len(jobs) >= 4 and all("estimated_wait_s" in j and "position" in j for j in jobs)
    assert all(wait_final(stack.url, j["id"])["state"] == "succeeded" for j in jobs)
