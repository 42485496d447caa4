"""Prometheus metrics. Workers run in other processes (and hosts), so what they know lives in Redis and is
read at scrape time through the job store: jobs by state, queue depth, stage durations, fault events, worker
heartbeats."""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jobstore.store import JobStore

CONTENT_TYPE = CONTENT_TYPE_LATEST
REGISTRY = CollectorRegistry()
UPLOADED = Counter("isl_uploaded_bytes", "bytes of scans accepted by POST /v1/jobs", registry=REGISTRY)
EVENTS = ("fault handling: duplicate_delivery_refused, worker_stopped, requeued, sent_by_sweep, poisoned, "
          "history_deferred, audit_deferred")


class _RedisCollector:
    store: JobStore | None = None
    queue = "isl"

    def collect(self):
        if self.store is None:
            return
        jobs = GaugeMetricFamily("isl_jobs", "jobs by state", labels=["state"])
        for state, n in self.store.counts().items():
            jobs.add_metric([state.value], n)
        yield jobs
        depth = GaugeMetricFamily("isl_queue_depth", "jobs waiting for a worker, per queue", labels=["queue"])
        depth.add_metric([self.queue], self.store.queue_depth())
        yield depth
        yield from self._stages()
        events = CounterMetricFamily("isl_job_events", EVENTS, labels=["event"])
        for name, n in sorted(self.store.events().items()):
            events.add_metric([name], float(n))
        yield events
        beats = GaugeMetricFamily("isl_worker_heartbeat_age_seconds", "seconds since each worker's last heartbeat",
                                  labels=["worker"])
        for name, t in self.store.workers().items():
            beats.add_metric([name], max(0.0, time.time() - t))
        yield beats
        yield GaugeMetricFamily("isl_records_pending", "job histories and audit events the database refused, "
                                                       "waiting in Redis for the workers' sweep",
                                value=self.store.pending_records())

    def _stages(self):
        stage = GaugeMetricFamily("isl_stage_seconds_total", "seconds spent per engine stage, all jobs",
                                  labels=["stage"])
        count = GaugeMetricFamily("isl_stage_runs_total", "jobs that ran each stage", labels=["stage"])
        for name, totals in self.store.stage_seconds().items():
            if "sum" in totals:
                stage.add_metric([name], totals["sum"])
            if "count" in totals:
                count.add_metric([name], totals["count"])
        yield stage
        yield count


_COLLECTOR = _RedisCollector()
REGISTRY.register(_COLLECTOR)


def render(store: JobStore, queue: str) -> bytes:
    _COLLECTOR.store, _COLLECTOR.queue = store, queue
    return generate_latest(REGISTRY)
