"""Prometheus metrics (prometheus-client), served at /metrics. Labels stay small: kinds,
statuses, providers, models and moderation categories, never user ids. Each App has its own
registry, so that two apps in one process (tests, benchmarks) count apart."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .core.models import JobRecord
from .core.money import Money, SpendAlert

log = logging.getLogger("easel.budget")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
FAST_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """The core's Observer, counting into a prometheus registry."""

    def __init__(self, policy: Any = None) -> None:
        self.policy = policy  # how amounts are shown (policy.money), in alert logs
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("easel_jobs", "Jobs finished", ["kind", "status", "provider", "model"], registry=r)
        self.generation = Histogram("easel_generation_seconds", "Time in the generator",
                                    ["provider", "model"], buckets=SECONDS, registry=r)
        self.job_time = Histogram("easel_job_seconds", "A job from request to record",
                                  ["kind", "status"], buckets=SECONDS, registry=r)
        self.ack = Histogram("easel_discord_ack_seconds", "A Discord interaction to its acknowledgement",
                             buckets=FAST_SECONDS, registry=r)
        self.spend = Counter("easel_spend_usd", "What members were charged", ["provider", "model"], registry=r)
        self.provider_errors = Counter("easel_provider_errors", "Failed generator calls", ["provider", "kind"],
                                       registry=r)
        self.blocks = Counter("easel_moderation_blocks", "Moderation blocks", ["stage", "category"], registry=r)
        self.image_screen = Histogram("easel_image_screen_seconds", "Screening one output image",
                                      buckets=FAST_SECONDS, registry=r)
        self.alerts = Counter("easel_spend_alerts", "Spend alerts (a cap's 50, 80, 100%)", ["cap", "threshold"],
                              registry=r)
        # Called with each spend alert, from a worker thread (the Discord bot posts them).
        self.alert_listeners: list[Callable[[SpendAlert], None]] = []

    # ---- the core's Observer -------------------------------------------------------------------

    def job_finished(self, job: JobRecord) -> None:
        provider, model = job.provider or "none", job.model or "none"
        self.jobs.labels(str(job.kind), str(job.status), provider, model).inc()
        if job.finished_at is not None:
            self.job_time.labels(str(job.kind), str(job.status)).observe(max(0.0, job.finished_at - job.created_at))
        if "generate" in job.timings:
            self.generation.labels(provider, model).observe(job.timings["generate"] / 1000)
        if "screen_image" in job.timings:
            self.image_screen.observe(job.timings["screen_image"] / 1000)
        if job.cost_micros:
            self.spend.labels(provider, model).inc(job.cost_micros / 1e6)

    def provider_failed(self, provider: str, kind: str) -> None:
        self.provider_errors.labels(provider, kind).inc()

    def blocked(self, stage: str, category: str) -> None:
        self.blocks.labels(stage, category).inc()

    def spend_alert(self, alert: SpendAlert) -> None:
        self.alerts.labels("daily" if alert.cap == "daily" else "guild", str(alert.threshold)).inc()
        log.warning("%s", alert.describe(getattr(self.policy, "money", None) or Money()))
        for listener in list(self.alert_listeners):
            try:
                listener(alert)
            except Exception:  # a listener's failure must not fail the job that was charged
                log.exception("a spend alert listener failed")

    # ---- the live state ---------------------------------------------------------------------------

    def watch(self, load: Callable[[], dict[str, tuple[int, int]]], breakers: Callable[[], dict[str, str]]) -> None:
        """Queue depth and running jobs per generator, and circuit breakers, read when scraped."""
        self.registry.register(_Live(load, breakers))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    def __init__(self, load: Callable[[], dict[str, tuple[int, int]]], breakers: Callable[[], dict[str, str]]):
        self._load, self._breakers = load, breakers

    def collect(self) -> Iterable[Any]:
        depth = GaugeMetricFamily("easel_queue_depth", "Jobs waiting for a generator slot", labels=["provider"])
        running = GaugeMetricFamily("easel_running_jobs", "Jobs in a generator now", labels=["provider"])
        for provider, (waiting, now) in sorted(self._load().items()):
            depth.add_metric([provider], waiting)
            running.add_metric([provider], now)
        circuit = GaugeMetricFamily("easel_circuit_open", "1 while a provider's breaker is open", labels=["provider"])
        for provider, state in sorted(self._breakers().items()):
            circuit.add_metric([provider], 1.0 if state == "open" else 0.0)
        return [depth, running, circuit]
