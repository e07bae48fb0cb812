"""Owns every live episode, the session limit, and one warm kernel pool per policy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from sandbox_env.episode import Episode
from sandbox_env.errors import CapacityError, PolicyNotFoundError
from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.pool import KernelPool
from sandbox_env.kernels.registry import load_kernel_class
from sandbox_env.policy import Policy, load_policy
from sandbox_env.settings import Settings

log = logging.getLogger(__name__)


class SessionManager:
    """Capacity counts every open episode, WebSocket sessions and stateless HTTP calls alike."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.kernel_class: type[Kernel] = load_kernel_class(self.settings.backend)
        self.default_policy: Policy = load_policy(self.settings.policy)
        self.episodes: dict[int, Episode] = {}
        self._pools: dict[str, KernelPool] = {}
        self._policies: dict[str, Policy] = {self.default_policy.name: self.default_policy}
        self._reaper: asyncio.Task[None] | None = None
        self.draining = False
        self.runtime_report: dict[str, Any] = {}
        self.started_at = time.time()

    @property
    def active(self) -> int:
        return len(self.episodes)

    @property
    def capacity(self) -> int:
        return self.settings.max_sessions

    def ready(self) -> bool:
        return not self.draining and self.active < self.capacity

    async def start(self) -> None:
        self.runtime_report = await self.kernel_class.setup_backend()
        if self.runtime_report:
            log.info("backend %s: %s", self.settings.backend, self.runtime_report)
        await self._pool(self.default_policy.name).start()
        if self.settings.session_timeout_s:
            self._reaper = asyncio.create_task(self._reap_idle(self.settings.session_timeout_s))

    async def shutdown(self) -> None:
        self.draining = True
        if self._reaper is not None:
            self._reaper.cancel()
        episodes = list(self.episodes.values())
        self.episodes.clear()
        await asyncio.gather(*(ep.close() for ep in episodes), return_exceptions=True)
        await asyncio.gather(*(pool.close() for pool in self._pools.values()), return_exceptions=True)
        await self.kernel_class.teardown_backend()

    async def open_episode(self) -> Episode:
        """Take a session slot; the episode gets its kernel at its first reset."""
        if not self.ready():
            raise CapacityError(self.active, self.capacity)
        episode = Episode(self._acquire, backend=self.settings.backend)
        self.episodes[id(episode)] = episode
        return episode

    async def close_episode(self, episode: Episode) -> None:
        self.episodes.pop(id(episode), None)
        await episode.close()

    @contextlib.asynccontextmanager
    async def stateless(self) -> AsyncIterator[Episode]:
        """A throwaway episode for one HTTP call (OpenEnv's stateless /reset and /step)."""
        episode = await self.open_episode()
        try:
            yield episode
        finally:
            await self.close_episode(episode)

    def find(self, episode_id: str) -> Episode | None:
        return next((ep for ep in self.episodes.values() if ep.id == episode_id), None)

    def policy(self, name: str | None) -> Policy:
        """Resolve a policy a client asked for; only names, never paths."""
        name = name or self.default_policy.name
        allowed = self.settings.allowed_policies
        if "/" in name or name.endswith(".toml") or (allowed is not None and name not in allowed):
            raise PolicyNotFoundError(f"policy {name!r} is not available on this server", policy=name)
        if name not in self._policies:
            self._policies[name] = load_policy(name)
        return self._policies[name]

    def pool_stats(self) -> dict[str, dict[str, int]]:
        return {name: {"ready": p.ready_count, "size": p.size, "cold_starts": p.cold_starts}
                for name, p in self._pools.items()}

    async def _acquire(self, policy_name: str | None) -> Kernel:
        policy = self.policy(policy_name)
        pool = self._pool(policy.name)
        await pool.start()
        return await pool.acquire()

    def _pool(self, name: str) -> KernelPool:
        if name not in self._pools:
            policy = self._policies[name]
            options: dict[str, Any] = {}
            if self.settings.workdir_root:
                options["workdir_root"] = self.settings.workdir_root
            self._pools[name] = KernelPool(lambda: self.kernel_class(policy, **options),
                                           self.settings.pool_size)
        return self._pools[name]

    async def _reap_idle(self, timeout_s: float) -> None:
        while True:
            await asyncio.sleep(max(timeout_s / 4, 1.0))
            cutoff = time.monotonic() - timeout_s
            for key, episode in list(self.episodes.items()):
                if episode.last_active < cutoff:
                    log.info("closing idle episode %s", episode.id)
                    self.episodes.pop(key, None)
                    await episode.close()
