"""Prometheus metrics at /metrics.

Request latency and predict batch sizes are observed in the API process. Jobs by status and job
durations are read from the database at scrape time: the job rows are the truth, and the workers
are separate short-lived processes whose in-memory counters would be lost.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.db import session_factory
from app.core.models import Job, JobStatus

DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)


class JobCollector:
    def __init__(self, database_url: str):
        self.database_url = database_url

    def collect(self):
        with session_factory(self.database_url)() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            bucket_columns = [func.sum(case((Job.duration_s <= b, 1), else_=0)) for b in DURATION_BUCKETS]
            durations = session.execute(
                select(Job.method, Job.status, func.count(), func.sum(Job.duration_s), *bucket_columns)
                .where(Job.duration_s.is_not(None)).group_by(Job.method, Job.status)).all()
        jobs = GaugeMetricFamily("coft_jobs", "Jobs by status", labels=["status"])
        for job_status in JobStatus:
            jobs.add_metric([job_status.value], counts.get(job_status, 0))
        yield jobs
        histogram = HistogramMetricFamily("coft_job_duration_seconds", "Run time of finished jobs",
                                          labels=["method", "status"])
        for method, job_status, count, total, *cumulative in durations:
            buckets = [(str(b), int(c or 0)) for b, c in zip(DURATION_BUCKETS, cumulative)] + [("+Inf", count)]
            histogram.add_metric([method, JobStatus(job_status).value], buckets, total or 0.0)
        yield histogram


class Metrics:
    """One registry per app, so two apps in one process (tests) do not collide."""

    def __init__(self, database_url: str):
        self.registry = CollectorRegistry()
        self.request_latency = Histogram("coft_http_request_duration_seconds", "HTTP request latency",
                                         ["method", "route", "status"], registry=self.registry)
        self.predict_batch = Histogram("coft_predict_batch_size", "Images per predict request", ["endpoint"],
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.forward_batch = Histogram("coft_predict_forward_batch_size", "Images per forward pass (micro-batched)",
                                       ["endpoint"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                       registry=self.registry)
        self.registry.register(JobCollector(database_url))


class LatencyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware) so streamed uploads and downloads pass through untouched.
    Labelled by route template (`/v1/jobs/{job_id}`), never the raw path, to bound cardinality."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The router records the matched route in the scope; its path is the template.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request_latency.labels(scope["method"], route, str(status[0])).observe(
                time.perf_counter() - started)


def metrics_request(request: Request) -> Metrics:
    return request.app.state.metrics
