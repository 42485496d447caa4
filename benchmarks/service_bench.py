"""Service benchmarks on one machine: submit-to-start latency on an idle queue, GET /v1/jobs/{id} at a fixed
request rate, jobs per minute with 1 and 2 workers, and the service's overhead as a share of job time.
Prints JSON (and writes it with --json).

    python -m benchmarks.service_bench --json benchmarks/results/service_bench.json

Small synthetic jobs: a tiny bundle trained for a few seconds on seeded phantoms (as in the tests), one CPU
thread per worker. Everything runs as real processes: redis-server, `isl serve`, `isl worker` (LocalStack).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import add_options, emit, stamped, tiny_model
from jobstore.records import JobState

KEY = {"bench": "bench-secret-key"}


def pct(values, q) -> float:
    return round(float(np.percentile(values, q)), 4) if len(values) else float("nan")


def submit(c: httpx.Client, url: str, path: Path) -> str:
    r = c.post(url + "/v1/jobs", files={"files": (path.name, path.read_bytes())})
    r.raise_for_status()
    return r.json()["id"]


def wait_all(c: httpx.Client, url: str, ids: list[str], timeout: float = 900) -> list[dict]:
    t0, done = time.monotonic(), {}
    while len(done) < len(ids):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{len(ids) - len(done)} jobs unfinished after {timeout} s")
        for i in ids:
            if i not in done:
                job = c.get(f"{url}/v1/jobs/{i}").json()
                if JobState(job["state"]).final:
                    done[i] = job
        time.sleep(0.2)
    return [done[i] for i in ids]


async def poll_at_rate(url: str, job_id: str, rate: float, seconds: float) -> dict:
    latencies, errors, late = [], 0, 0
    async with httpx.AsyncClient(headers={"X-API-Key": KEY["bench"]}, timeout=10,
                                 limits=httpx.Limits(max_connections=64)) as c:
        async def one():
            nonlocal errors
            t = time.perf_counter()
            try:
                r = await c.get(f"{url}/v1/jobs/{job_id}")
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - t)

        tasks, start = [], time.perf_counter()
        for k in range(int(rate * seconds)):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.05:
                late += 1
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {"requests": len(ms), "target_rate": rate, "achieved_rate": round(len(ms) / elapsed, 1), "errors": errors,
            "sent_late": late, "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "max_ms": round(max(ms), 2)}


def throughput(c, url, cases, n_jobs) -> dict:
    t0 = time.time()
    ids = [submit(c, url, cases[k % len(cases)]) for k in range(n_jobs)]
    jobs = wait_all(c, url, ids)
    span = max(j["finished"] for j in jobs) - t0
    return {"jobs": n_jobs, "succeeded": sum(j["state"] == JobState.SUCCEEDED for j in jobs), "seconds": round(span, 2),
            "jobs_per_minute": round(60 * n_jobs / span, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-jobs", type=int, default=20)
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--rate-seconds", type=float, default=15)
    ap.add_argument("--throughput-jobs", type=int, default=16)
    add_options(ap, json=None)
    args = ap.parse_args(argv)

    import torch

    from worker.localstack import LocalStack

    work, data, scans = tiny_model("isl-bench-")
    cases = scans[:2]
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads, no GPU",
           "jobs": "tiny phantom bundle (30 training iterations), 1 CPU thread per worker"}
    with LocalStack(work / "stack", work / "models", "tiny", data, KEY, workers=1) as stack:
        url = stack.url
        with httpx.Client(headers={"X-API-Key": KEY["bench"]}, timeout=60) as c:
            # submit-to-start latency on an idle queue, and the service's share of each job's time
            waits, overhead = [], []
            for k in range(args.latency_jobs):
                job = wait_all(c, url, [submit(c, url, cases[k % 2])])[0]
                report = c.get(f"{url}/v1/jobs/{job['id']}/report").json()
                waits.append(job["started"] - job["created"])
                span = job["finished"] - job["created"]
                overhead.append(1 - report["seconds"]["total"] / span)
            out["submit_to_start_seconds"] = {"n": len(waits), "median": pct(waits, 50), "p99": pct(waits, 99)}
            out["service_overhead_share_of_job_time"] = {
                "median": pct(overhead, 50), "p99": pct(overhead, 99),
                "what": "1 - engine seconds (read..write) / (finished - created)"}
            print(json.dumps(out), flush=True)
            out["get_job_at_rate"] = asyncio.run(poll_at_rate(url, job["id"], args.rate, args.rate_seconds))
            print(json.dumps(out["get_job_at_rate"]), flush=True)
            one = throughput(c, url, cases, args.throughput_jobs)
            stack.start_worker("w2")
            stack.wait_for_workers(2)
            two = throughput(c, url, cases, args.throughput_jobs)
            out["throughput"] = {"1_worker": one, "2_workers": two,
                                 "ratio_2_over_1": round(two["jobs_per_minute"] / one["jobs_per_minute"], 2)}
    emit(stamped(out), args.json)


if __name__ == "__main__":
    main()
