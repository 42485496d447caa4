"""Prometheus metrics. Workers run in other processes (and hosts), so what they know lives in Redis and is
read at scrape time: jobs by state, queue depth, stage durations, worker heartbeats."""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service.jobs import P, JobStore

CONTENT_TYPE = CONTENT_TYPE_LATEST
REGISTRY = CollectorRegistry()
UPLOADED = Counter("isl_uploaded_bytes", "bytes of scans accepted by POST /v1/jobs", registry=REGISTRY)


class _RedisCollector:
    store: JobStore | None = None
    queue = "isl"

    def collect(self):
        if self.store is None:
            return
        r = self.store.r
        jobs = GaugeMetricFamily("isl_jobs", "jobs by state", labels=["state"])
        for state, n in self.store.counts().items():
            jobs.add_metric([state], n)
        yield jobs
        depth = GaugeMetricFamily("isl_queue_depth", "jobs waiting for a worker, per queue", labels=["queue"])
        depth.add_metric([self.queue], r.zcard(f"{P}queued"))
        yield depth
        sums = r.hgetall(f"{P}stage_seconds")
        stage = GaugeMetricFamily("isl_stage_seconds_total", "seconds spent per engine stage, all jobs", labels=["stage"])
        count = GaugeMetricFamily("isl_stage_runs_total", "jobs that ran each stage", labels=["stage"])
        for key, value in sums.items():
            name, _, kind = key.rpartition(":")
            (stage if kind == "sum" else count).add_metric([name], float(value))
        yield stage
        yield count
        events = CounterMetricFamily("isl_job_events", "fault handling: duplicate_delivery_refused, worker_stopped, "
                                     "requeued, sent_by_sweep, poisoned", labels=["event"])
        for name, n in sorted(r.hgetall(f"{P}events").items()):
            events.add_metric([name], float(n))
        yield events
        beats = GaugeMetricFamily("isl_worker_heartbeat_age_seconds", "seconds since each worker's last heartbeat",
                                  labels=["worker"])
        for key in r.scan_iter(f"{P}worker:*"):
            t = r.get(key)
            if t:
                beats.add_metric([key[len(P) + 7:]], max(0.0, time.time() - float(t)))
        yield beats


_COLLECTOR = _RedisCollector()
REGISTRY.register(_COLLECTOR)


def render(store: JobStore, queue: str) -> bytes:
    _COLLECTOR.store, _COLLECTOR.queue = store, queue
    return generate_latest(REGISTRY)
