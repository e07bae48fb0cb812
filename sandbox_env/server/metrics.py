"""Prometheus metrics of one server instance, served at `/metrics`.

Each app gets its own `CollectorRegistry`: several servers in one process (tests, embedded
benchmarks) would otherwise collide on metric names in the global registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from sandbox_env.episode import Episode
    from sandbox_env.manager import EpisodeManager
    from sandbox_env.models import CodeAction, CodeObservation

log = logging.getLogger(__name__)

# Steps range from sub-millisecond prints to multi-minute evaluation runs.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0, 300.0)


class ServerMetrics:
    """The server's counters; gauges read the manager at scrape time so they are never stale."""

    def __init__(self, manager: Callable[[], EpisodeManager | None]) -> None:
        self._manager = manager
        self.registry = CollectorRegistry(auto_describe=True)
        self.episodes_active = Gauge(
            "sandbox_env_episodes_active", "Episodes (sessions) currently open",
            registry=self.registry)
        self.episodes_active.set_function(lambda: self._read("active"))
        self.capacity = Gauge(
            "sandbox_env_capacity", "Maximum number of concurrent episodes",
            registry=self.registry)
        self.capacity.set_function(lambda: self._read("capacity"))
        self.step_seconds = Histogram(
            "sandbox_env_step_seconds", "Server-side duration of a step, kernel roundtrip included",
            buckets=STEP_BUCKETS, registry=self.registry)
        self.executions = Counter(
            "sandbox_env_executions", "Executed steps by outcome status",
            labelnames=("status",), registry=self.registry)
        self.errors = Counter(
            "sandbox_env_errors", "Service errors returned to clients, by error code",
            labelnames=("code",), registry=self.registry)
        self.capacity_rejections = Counter(
            "sandbox_env_capacity_rejections", "Sessions refused because the server was full",
            registry=self.registry)
        self.registry.register(KernelCollector(manager))

    def _read(self, attribute: str) -> float:
        manager = self._manager()
        if manager is None:
            return 0.0
        try:
            return float(getattr(manager, attribute))
        except Exception:  # a scrape must never fail because of the manager
            log.debug("metrics: cannot read manager.%s", attribute, exc_info=True)
            return 0.0

    def observe_step(self, observation: CodeObservation, seconds: float) -> None:
        """Record one finished step (any outcome the code produced)."""
        self.step_seconds.observe(seconds)
        status = observation.status
        self.executions.labels(status=status.value if status is not None else "unknown").inc()

    def observe_error(self, code: str) -> None:
        self.errors.labels(code=code).inc()
        if code == "capacity_reached":
            self.capacity_rejections.inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class KernelCollector(Collector):
    """The pools, read at scrape time, one series per policy (the labels are policies, reasons and
    fixed words, never tenants): kernels ready, in use and aimed at, kernel start times, kernels
    handed out fresh or recycled, kernels closed instead of recycled, by reason
    (`kernels.base.REFUSALS`), and ready kernels closed once demand no longer needed them."""

    def __init__(self, manager: Callable[[], EpisodeManager | None]) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        handed = CounterMetricFamily("sandbox_env_kernels_handed_out", "Kernels handed to episodes and "
                                     "gradings: fresh (never used) or recycled", labels=("policy", "source"))
        refused = CounterMetricFamily("sandbox_env_recycle_refusals", "Kernels closed after their episode "
                                      "instead of recycled, by reason", labels=("policy", "reason"))
        gauges = {key: GaugeMetricFamily(f"sandbox_env_pool_{name}", text, labels=("policy",)) for key, name, text in (
            ("ready", "ready_kernels", "Started kernels waiting for an episode"),
            ("in_use", "in_use_kernels", "Kernels handed out and not yet released or closed"),
            ("target", "target_kernels", "Kernels the pool keeps ready: its floor (pool_size), more while "
                                         "resets come faster than kernels start, within the memory budget"),
            ("kernel_bytes", "kernel_memory_bytes", "Memory one ready kernel is taken to hold: measured, else "
                                                    "its policy's limit (0: not known yet)"))}
        idle_closed = CounterMetricFamily("sandbox_env_pool_idle_closed", "Ready kernels closed because "
                                          "demand no longer needed them", labels=("policy",))
        starts = HistogramMetricFamily("sandbox_env_kernel_start_seconds", "How long starting a kernel took "
                                       "(the pool's refills and cold starts)", labels=("policy",))
        budget = GaugeMetricFamily("sandbox_env_pool_memory_budget_bytes", "Memory the ready kernels of all "
                                   "pools may hold together (pool_memory_mb)")
        manager = self._manager()
        if manager is not None:
            for policy, stats in manager.pool_stats().items():
                for source in ("fresh", "recycled"):
                    handed.add_metric((policy, source), stats[source])
                for key, family in gauges.items():
                    family.add_metric((policy,), stats[key])
                idle_closed.add_metric((policy,), stats["idle_closed"])
            for policy, reasons in manager.recycle_refusals().items():
                for reason, count in sorted(reasons.items()):
                    refused.add_metric((policy, reason), count)
            for policy, latency in manager.start_latencies().items():
                bounds = [*map(str, latency.buckets), "+Inf"]
                cumulative = [sum(latency.counts[:i + 1]) for i in range(len(bounds))]
                starts.add_metric((policy,), list(zip(bounds, cumulative, strict=True)), latency.sum)
            budget.add_metric((), manager.pool_budget.total_bytes)
        yield handed
        yield refused
        yield from gauges.values()
        yield idle_closed
        yield starts
        yield budget


async def timed_step(metrics: ServerMetrics, episode: Episode, action: CodeAction, *,
                     timeout_s: float | None = None) -> CodeObservation:
    """Run one step and record its duration and outcome; every transport goes through here."""
    started = time.perf_counter()
    observation = await episode.step(action, timeout_s=timeout_s)
    metrics.observe_step(observation, time.perf_counter() - started)
    return observation
