"""The pools at `/metrics` of a real server on loopback (the fake backend: the pool's kernels are
real for its purposes): kernels ready, in use, the target, kernel start times, the footprint and
the memory budget, one series per policy, read back with Prometheus's own parser."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sandbox_env.kernels.demand import MB

POLICY_MB = 512  # policies/default.toml: the fake kernels' footprint (they cannot weigh themselves)


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, by name and labels."""
    reply = await http.get("/metrics")
    assert reply.status_code == 200, reply.text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


async def until_scraped(http: httpx.AsyncClient, name: str, value: float, timeout_s: float = 30.0) -> dict[Any, float]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        samples = await scrape(http)
        if samples.get((name, (("policy", "default"),))) == value:
            return samples
        assert asyncio.get_running_loop().time() < deadline, f"{name} never {value}: {samples}"
        await asyncio.sleep(0.05)


def default(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"policy": "default", **labels}.items())))]


async def test_metrics_report_the_pool(live_server_factory: Callable[..., Any], ws_session: Any,
                                       wait_active: Any) -> None:
    server = live_server_factory(backend="fake", pool_size=2, pool_memory_mb=3 * POLICY_MB)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30) as http:
        samples = await until_scraped(http, "sandbox_env_pool_ready_kernels", 2)
        assert default(samples, "sandbox_env_pool_in_use_kernels") == 0
        assert default(samples, "sandbox_env_pool_target_kernels") == 2
        assert default(samples, "sandbox_env_pool_kernel_memory_bytes") == POLICY_MB * MB
        assert samples[("sandbox_env_pool_memory_budget_bytes", ())] == 3 * POLICY_MB * MB
        starts = default(samples, "sandbox_env_kernel_start_seconds_count")
        assert starts >= 2 and default(samples, "sandbox_env_kernel_start_seconds_bucket", le="+Inf") == starts
        assert default(samples, "sandbox_env_kernel_start_seconds_sum") >= 0

        async with ws_session(server) as first, ws_session(server) as second:
            await first.reset()
            await second.reset()
            samples = await scrape(http)
            assert default(samples, "sandbox_env_pool_in_use_kernels") == 2
            assert default(samples, "sandbox_env_kernels_handed_out_total", source="fresh") == 2
            assert default(samples, "sandbox_env_pool_target_kernels") <= 3  # the budget: 3 kernels
        await wait_active(server, 0)
        samples = await until_scraped(http, "sandbox_env_pool_in_use_kernels", 0)
        assert default(samples, "sandbox_env_kernel_start_seconds_count") >= starts
        assert {labels for name, labels in samples if name.startswith("sandbox_env_pool_")} <= {
            (("policy", "default"),), ()}  # one series per policy, nothing per tenant or episode
