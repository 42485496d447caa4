"""Load benchmark on this machine: the operators' locust scenario (benchmarks/locustfile.py) against a real
local stack (redis-server, `isl serve`, 2 `isl worker`s; worker/localstack.py) on small phantom jobs, then
the curve of job latency as the queue grows: the wait the API estimated at submission vs the real wait.
Prints JSON (and writes it with --json).

    python -m benchmarks.load_bench --json benchmarks/results/load_bench.json
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import ROOT, add_options, emit, stamped, tiny_model
from jobstore.records import JobState

KEY = {"load": "load-test-secret-key"}


def curve(rows: list[dict], width: int = 5) -> list[dict]:
    """Mean estimated and real wait per band of queue positions at submission (-1: taken at once)."""
    bands = {}
    for r in rows:
        if r["estimated_wait_s"] is not None:
            bands.setdefault(max(0, r["position"]) // width, []).append(r)
    return [{"positions": f"{b * width}-{b * width + width - 1}", "jobs": len(rs),
             "estimated_wait_s": round(float(np.mean([r["estimated_wait_s"] for r in rs])), 1),
             "real_wait_s": round(float(np.mean([r["real_wait_s"] for r in rs])), 1),
             "latency_s": round(float(np.mean([r["latency_s"] for r in rs])), 1)} for b, rs in sorted(bands.items())]


def run_locust(stack, scan: Path, args, work: Path, log: Path) -> tuple[dict, float, float]:
    """The locust scenario against the stack: per-route request figures, and the run's start and end."""
    env = {"ISL_API_KEY": KEY["load"], "ISL_LOAD_SCAN": str(scan), "ISL_LOAD_UPLOADERS": str(args.uploaders),
           "ISL_LOAD_UPLOAD_EVERY_S": str(args.upload_every), "ISL_LOAD_JOBS_LOG": str(log)}
    t0 = time.time()
    locust = [str(Path(sys.executable).parent / "locust"), "-f", str(ROOT / "benchmarks" / "locustfile.py")]
    run = subprocess.run([*locust, "--host", stack.url, "--headless", "-u", str(args.users), "-r", str(args.users),
                          "-t", f"{int(args.minutes * 60)}s", "--csv", str(work / "locust"), "--only-summary"],
                         env={**stack.env, **env}, capture_output=True, text=True)
    t1 = time.time()
    print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
    requests = {}
    with open(work / "locust_stats.csv") as fh:
        for row in csv.DictReader(fh):
            requests[row["Name"]] = {
                "count": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                "per_s": round(float(row["Requests/s"]), 2), "p50_ms": float(row["50%"]),
                "p95_ms": float(row["95%"]), "p99_ms": float(row["99%"]),
                "max_ms": round(float(row["Max Response Time"]), 1)}
    return {"requests": requests, "errors": requests["Aggregated"]["failures"], "locust_exit": run.returncode}, t0, t1


def drain(url: str, submitted: list[dict], since: float) -> dict[str, dict]:
    """Every submitted job once it has ended (waiting up to 30 minutes for the queue to drain)."""
    jobs = {}
    with httpx.Client(headers={"X-API-Key": KEY["load"]}, timeout=60) as c:
        while len(jobs) < len(submitted) and time.time() - since < 1800:
            for s in submitted:
                if s["id"] not in jobs:
                    j = c.get(f"{url}/v1/jobs/{s['id']}").json()
                    if JobState(j["state"]).final:
                        jobs[s["id"]] = j
            time.sleep(1)
    return jobs


def wait_figures(submitted: list[dict], jobs: dict[str, dict], t0: float, t1: float) -> dict:
    """Jobs per minute, and each job's real wait against the wait the API estimated at its submission."""
    ok = [j for j in jobs.values() if j["state"] == JobState.SUCCEEDED]
    out = {"jobs": {"submitted": len(submitted), "succeeded": len(ok), "failed_or_lost": len(submitted) - len(ok),
                    "per_minute_during_run": round(len([j for j in ok if j["finished"] <= t1]) / ((t1 - t0) / 60), 2),
                    "per_minute_to_drain": round(len(jobs) / ((max(j["finished"] for j in jobs.values()) - t0) / 60),
                                                 2)}}
    rows = []
    for s in submitted:
        j = jobs.get(s["id"])
        if j and j["started"]:
            # position None: a worker had taken it before the upload's response was made
            rows.append({"position": s["position"] if s["position"] is not None else -1,
                         "estimated_wait_s": s["estimated_wait_s"],
                         "real_wait_s": round(j["started"] - j["created"], 1),
                         "latency_s": round(j["finished"] - j["created"], 1)})
    rows.sort(key=lambda r: r["position"])
    out["queue_curve_by_position"] = curve(rows)
    out["queue_curve"] = rows
    est = np.array([r["estimated_wait_s"] for r in rows if r["estimated_wait_s"] is not None], float)
    real = np.array([r["real_wait_s"] for r in rows if r["estimated_wait_s"] is not None], float)
    if len(est):
        out["estimate_vs_real"] = {"jobs": len(est),
                                   "median_abs_error_s": round(float(np.median(np.abs(est - real))), 1),
                                   "median_ratio_estimate_to_real": round(float(np.median((est + 1) / (real + 1))), 2),
                                   "max_position": int(max(r["position"] for r in rows))}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--uploaders", type=int, default=10)
    ap.add_argument("--upload-every", type=float, default=20, help="seconds between one uploader's uploads")
    ap.add_argument("--minutes", type=float, default=2)
    ap.add_argument("--workers", type=int, default=2)
    add_options(ap, json=None)
    args = ap.parse_args(argv)

    import torch

    from worker.localstack import LocalStack

    work, data, scans = tiny_model("isl-load-")
    scan = scans[0]
    log = work / "jobs.jsonl"
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads, no GPU; locust, API, Redis and "
                      f"{args.workers} workers share it",
           "scenario": {"users": args.users, "uploaders": args.uploaders, "pollers": args.users - args.uploaders,
                        "upload_every_s": args.upload_every, "seconds": args.minutes * 60,
                        "jobs": "tiny phantom bundle, 1 CPU thread per worker", "scan_bytes": scan.stat().st_size}}
    with LocalStack(work / "stack", work / "models", "tiny", data, KEY, workers=args.workers) as stack:
        # one job first, so that the API has a job duration to estimate waits from
        with httpx.Client(headers={"X-API-Key": KEY["load"]}, timeout=60) as c:
            first = c.post(stack.url + "/v1/jobs", files={"files": (scan.name, scan.read_bytes())}).json()["id"]
            while c.get(f"{stack.url}/v1/jobs/{first}").json()["state"] != JobState.SUCCEEDED:
                time.sleep(0.5)
        figures, t0, t1 = run_locust(stack, scan, args, work, log)
        out.update(figures)
        # the queue drains; then every job's real wait against its estimate
        submitted = [json.loads(line) for line in log.read_text().splitlines()]
        jobs = drain(stack.url, submitted, t1)
    out.update(wait_figures(submitted, jobs, t0, t1))
    emit(stamped(out), args.json, indent=1)


if __name__ == "__main__":
    main()
