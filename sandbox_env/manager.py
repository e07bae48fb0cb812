"""Owns every live episode, the session limit, and one warm kernel pool per policy."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from sandbox_env import languages
from sandbox_env.episode import Episode
from sandbox_env.errors import (
    CapacityError,
    ConfigError,
    DrainingError,
    PolicyNotFoundError,
    QuotaError,
    TaskError,
    TaskNotFoundError,
)
from sandbox_env.grading.driver import (
    PYTEST_BUDGET_TESTS,
    STARTUP_S,
    choose_reward,
    compile_budget,
    grade,
    task_language,
)
from sandbox_env.grading.rewards import reward_policy
from sandbox_env.grading.tasks import (
    StdioTests,
    Task,
    humaneval_tasks,
    load_tasks,
    parse_task,
    test_count,
)
from sandbox_env.history import Records
from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.demand import MB, MemoryBudget, StartLatency
from sandbox_env.kernels.pool import KernelPool
from sandbox_env.kernels.registry import load_kernel_class
from sandbox_env.models import Grading
from sandbox_env.policy import Policy, load_policy
from sandbox_env.settings import Settings

log = logging.getLogger(__name__)
# Managers alive per backend in this process: backend-wide setup and teardown (orphan sweeps)
# run for the first and the last only, so one manager never removes another's sandboxes.
_LIVE_MANAGERS: dict[type[Kernel], int] = {}


class OneShot:
    """A kernel lent for one-shot work (`EpisodeManager.one_shot`); `keep = False`: close it after."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.keep = True


class EpisodeManager:
    """Capacity counts every open episode, WebSocket sessions and stateless HTTP calls alike."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.kernel_class: type[Kernel] = load_kernel_class(self.settings.backend)
        self.default_policy: Policy = load_policy(self.settings.policy)
        self.episodes: dict[int, Episode] = {}
        # ended episodes, exportable a while (`record_ttl_s`) within `record_total_bytes`
        self.records = Records(self.settings.record_ttl_s, self.settings.record_total_bytes)
        self._pools: dict[str, KernelPool] = {}
        self.pool_budget = MemoryBudget(self.settings.pool_memory_mb * MB)  # shared by every policy's pool
        self._policies: dict[str, Policy] = {self.default_policy.name: self.default_policy}
        self._reaper: asyncio.Task[None] | None = None
        self.draining = False
        self.runtime_report: dict[str, Any] = {}
        self.started_at = time.time()
        self.tasks: dict[str, Task] = load_tasks(self.settings.tasks) if self.settings.tasks else {}
        if self.settings.reward:
            reward_policy(self.settings.reward)  # a bad server default fails at start, not mid-episode
        # (policy, owner) -> kernels kept for that owner's next grading: no sandbox crosses tenants
        self._graders: dict[tuple[str, str], list[Kernel]] = {}
        self.grading = 0
        self.gradings: dict[str, int] = {}  # per owner (tenant)
        self._counted = False

    @property
    def active(self) -> int:
        return len(self.episodes) + self.grading

    @property
    def capacity(self) -> int:
        return self.settings.max_sessions

    def ready(self) -> bool:
        return not self.draining and self.active < self.capacity

    async def start(self) -> None:
        first = _LIVE_MANAGERS.get(self.kernel_class, 0) == 0
        _LIVE_MANAGERS[self.kernel_class] = _LIVE_MANAGERS.get(self.kernel_class, 0) + 1
        self._counted = True
        if first:
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
        stashed = [k for kernels in self._graders.values() for k in kernels]
        self._graders.clear()
        await asyncio.gather(*(k.close() for k in stashed), return_exceptions=True)
        await asyncio.gather(*(pool.close() for pool in self._pools.values()), return_exceptions=True)
        if self._counted:
            self._counted = False
            _LIVE_MANAGERS[self.kernel_class] -= 1
            if _LIVE_MANAGERS[self.kernel_class] == 0:
                await self.kernel_class.teardown_backend()

    def used(self, owner: str) -> int:
        """Session slots `owner` holds: its open episodes and its gradings in flight."""
        return len(self.owned(owner)) + self.gradings.get(owner, 0)

    def _admit(self, owner: str) -> None:
        """Raise unless a new session or grading of `owner` may start: not draining, a slot
        free, and within `owner`'s session quota (which its gradings count toward)."""
        if self.draining:
            raise DrainingError(self.active, self.capacity)
        if not self.ready():
            raise CapacityError(self.active, self.capacity)
        limit = self.settings.tenant_max_sessions
        if limit is not None and (used := self.used(owner)) >= limit:
            raise QuotaError("sessions", used, limit)

    def admit_grading(self, owner: str = "") -> None:
        """Raise unless `owner` may start a grading now (see `_admit`; also `tenant_max_gradings`).
        `grade` checks it again; callers that compile a client's task check it first."""
        self._admit(owner)
        limit = self.settings.tenant_max_gradings
        if limit is not None and (used := self.gradings.get(owner, 0)) >= limit:
            raise QuotaError("concurrent gradings", used, limit)

    async def open_episode(self, owner: str = "") -> Episode:
        """Take a session slot for `owner` (a tenant); the episode gets its kernel at its first reset."""
        self._admit(owner)
        episode = Episode(functools.partial(self._acquire, owner=owner), backend=self.settings.backend,
                          tasks=self.resolve_task, reward=self.settings.reward, owner=owner,
                          history_bytes=self.history_budget, release=functools.partial(self._release, owner=owner),
                          on_end=self.records.add, id_prefix=self.settings.id_prefix(),
                          grade_elsewhere=functools.partial(self._grade_elsewhere, owner=owner))
        self.episodes[id(episode)] = episode
        return episode

    async def close_episode(self, episode: Episode) -> None:
        self.episodes.pop(id(episode), None)
        await episode.close()

    @property
    def history_budget(self) -> int:
        """Bytes of step history one episode may keep: all of them together stay within
        `history_total_bytes`, since at most `max_sessions` episodes are open."""
        return min(self.settings.history_bytes, self.settings.history_total_bytes // self.settings.max_sessions)

    def owned(self, owner: str | None) -> list[Episode]:
        """Live episodes of one tenant (None: everyone's)."""
        return [ep for ep in self.episodes.values() if owner is None or ep.owner == owner]

    @contextlib.asynccontextmanager
    async def stateless(self, owner: str = "") -> AsyncIterator[Episode]:
        """A throwaway episode for one HTTP call (OpenEnv's stateless /reset and /step)."""
        episode = await self.open_episode(owner)
        try:
            yield episode
        finally:
            await self.close_episode(episode)

    def resolve_task(self, task_id: str | None = None, task: Any = None, policy: str | None = None) -> Task:
        """An inline task (validated, limited for `policy`: see `limit_inline`), or one of the
        server's tasks, or a HumanEval task by id."""
        if task is not None:
            if not self.settings.allow_inline_tasks:
                raise TaskError("inline tasks are turned off on this server: name one of its tasks with task_id")
            if not isinstance(task, Task):
                try:
                    task = parse_task(task, compile_sources=False)  # compiled by its grader, in the sandbox
                except ConfigError as exc:
                    raise TaskError(exc.message) from exc
            return self.limit_inline(task, self.policy(policy))
        if task_id is None:
            raise TaskError("task: give task_id or task")
        if task_id in self.tasks:
            return self.tasks[task_id]
        if task_id.startswith("HumanEval/"):
            try:
                found = humaneval_tasks().get(task_id)
            except ConfigError as exc:
                raise TaskNotFoundError(f"task {task_id!r}: {exc.message}", task_id=task_id) from exc
            if found is not None:
                return found
        raise TaskNotFoundError(f"no task {task_id!r} on this server", task_id=task_id)

    def limit_inline(self, task: Task, policy: Policy) -> Task:
        """A client's own task cannot hold a sandbox longer than the server allows: each test gets
        at most the policy's step limit, and all of them together (the grading budget, as
        `grading.grade` computes it) at most `max_grading_s`."""
        try:  # before any sandbox runs its tests (a bad spec would fail only after grading)
            reward_policy(task.reward)
        except ConfigError as exc:
            raise TaskError(exc.message) from exc
        if isinstance(task.tests, StdioTests) and task.tests.compile_timeout_s > policy.timeout_s:
            # a compile step is no longer than a step of the policy (SandboxFusion's default is 10 s too)
            task = task.model_copy(update={"tests": task.tests.model_copy(update={"compile_timeout_s": policy.timeout_s})})
        count = test_count(task) or PYTEST_BUDGET_TESTS
        # the compile step is part of the budget: the tests share what it leaves
        left = self.settings.max_grading_s - STARTUP_S - compile_budget(task)
        per_test = min(task.timeout_s or policy.timeout_s, policy.timeout_s, max(0.001, left / count))
        return task if per_test == task.timeout_s else task.model_copy(update={"timeout_s": per_test})

    async def grade(self, task: Task, submission: str, *, policy: str | None = None,
                    reward: str | None = None, owner: str = "") -> Grading:
        """One-shot grading on a warm kernel; counts toward capacity and `owner`'s session and
        grading quotas while it runs."""
        self.admit_grading(owner)
        if reward:
            try:
                reward_policy(reward)
            except ConfigError as exc:
                raise TaskError(exc.message) from exc
        async with self.one_shot(policy, owner, language=task_language(task)) as lease:
            result = await grade(lease.kernel, task, submission,
                                 reward=choose_reward(task, reward, self.settings.reward))
            lease.keep = result.status == "graded"
        return result

    async def _grade_elsewhere(self, task: Task, submission: str, policy: str, reward: str, *, owner: str) -> Grading:
        """An episode's submit of a task in another language: graded on a one-shot kernel of that
        language, counted as a grading of `owner` (the episode keeps its own session)."""
        return await self.grade(task, submission, policy=policy, reward=reward, owner=owner)

    @contextlib.asynccontextmanager
    async def one_shot(self, policy: str | None = None, owner: str = "", *,
                       language: str = languages.DEFAULT) -> AsyncIterator[OneShot]:
        """A warm kernel for one-shot work through `run_program` (a grading, a `/run_code`): the
        stashed one of (policy, owner) if alive, else one from the pool. It counts toward capacity
        and `owner`'s session and grading quotas while held. Afterwards it is stashed for the next
        one-shot (run_program leaves a clean slate: no process, no file) unless the holder set
        `keep = False`, it died, or the server drains; on an exception it is closed. A `language`
        other than Python takes a kernel of that language's pool (`language_policy`);
        `LanguageUnavailableError` if this backend's sandboxes lack its toolchain."""
        self.admit_grading(owner)
        chosen = self.language_policy(self.policy(policy), language)
        if language != languages.DEFAULT:
            await self.check_language(language)
        name = chosen.name
        self.grading += 1
        self.gradings[owner] = self.gradings.get(owner, 0) + 1
        kernel: Kernel | None = None
        try:
            stash = self._graders.setdefault((name, owner), [])
            while stash and kernel is None:
                candidate = stash.pop()
                if candidate.is_alive():
                    kernel = candidate
                else:
                    await candidate.close()
            if kernel is None:
                kernel = await self._take(chosen, owner)
            lease = OneShot(kernel)
            yield lease
        except BaseException:
            if kernel is not None:
                await kernel.close()
            raise
        finally:
            self.grading -= 1
            self.gradings[owner] -= 1
            if not self.gradings[owner]:
                del self.gradings[owner]
        if not lease.keep or not kernel.is_alive() or self.draining:
            await kernel.close()
        elif len(stash) < self.settings.grader_stash:
            stash.append(kernel)
        elif not self._release(kernel, owner):
            await kernel.close()

    def find(self, key: str, owner: str | None) -> list[Episode]:
        """Live episodes of `owner` (None: everyone's) that `key` names: the one whose session_id
        it is (the server makes those, unique), else every one whose episode_id it is (clients
        choose those: several episodes may share one)."""
        mine = self.owned(owner)
        by_session = [ep for ep in mine if ep.session_id == key]
        return by_session or [ep for ep in mine if ep.id == key]

    def policy(self, name: str | None) -> Policy:
        """Resolve a policy a client asked for; only names, never paths."""
        name = name or self.default_policy.name
        allowed = self.settings.allowed_policies
        if allowed is None:  # only the server's own: a policy an operator adds opens to no one
            allowed = [self.default_policy.name]
        if "/" in name or name.endswith(".toml") or ("*" not in allowed and name not in allowed):
            raise PolicyNotFoundError(f"policy {name!r} is not available on this server", policy=name)
        if name not in self._policies:
            self._policies[name] = load_policy(name)
        return self._policies[name]

    def pool_stats(self) -> dict[str, dict[str, int]]:
        """Per policy: kernels ready, in use, the pool's target (`size`: its floor), hand-outs;
        `kernel_bytes`: what one ready kernel is taken to hold (0: not known yet)."""
        return {name: {"ready": p.ready_count, "in_use": p.in_use, "target": p.target, "size": p.size,
                       "ceiling": p.ceiling, "cold_starts": p.cold_starts, "returning": p.returning,
                       "idle_closed": p.idle_closed, "kernel_bytes": p.footprint.bytes or 0,
                       "fresh": p.handed_out["fresh"], "recycled": p.handed_out["recycled"]}
                for name, p in self._pools.items()}

    def start_latencies(self) -> dict[str, StartLatency]:
        """Per policy: how long its pool's kernel starts took."""
        return {name: p.latency for name, p in self._pools.items()}

    def recycle_refusals(self) -> dict[str, dict[str, int]]:
        """Per policy: how many kernels were closed instead of recycled after an episode, by reason."""
        return {name: dict(p.refusals) for name, p in self._pools.items()}

    def language_policy(self, policy: Policy, language: str) -> Policy:
        """`policy` for kernels holding `language`'s toolchain (its image, on Docker): the same
        limits under the name `<policy>+<language>`, so its kernels get a pool of their own."""
        if language == languages.DEFAULT:
            return policy
        name = f"{policy.name}+{language}"
        if name not in self._policies:
            self._policies[name] = policy.model_copy(update={"name": name, "language": language})
        return self._policies[name]

    async def check_language(self, language: str) -> None:
        """Raise `LanguageUnavailableError` (naming how to add it) unless this server runs `language`."""
        await self.kernel_class.check_language(languages.get(language))

    async def _acquire(self, policy_name: str | None, owner: str = "") -> Kernel:
        return await self._take(self.policy(policy_name), owner)

    async def _take(self, policy: Policy, owner: str) -> Kernel:
        pool = self._pool(policy.name)
        await pool.start()
        return await pool.acquire(owner)

    def _release(self, kernel: Kernel, owner: str = "") -> bool:
        """`owner`'s episode or grading is done with `kernel`: back to its pool, which recycles it
        in the background for `owner` only (or closes it). False: its backend does not recycle,
        the caller closes it."""
        if not kernel.recycles:
            return False
        self._pool(kernel.policy.name).release(kernel, owner)
        return True

    def _pool(self, name: str) -> KernelPool:
        if name not in self._pools:
            policy = self._policies[name]
            config = self.kernel_class.config_class.from_settings(self.settings)
            self._pools[name] = KernelPool(lambda: self.kernel_class(policy, config), self.settings.pool_size,
                                           budget=self.pool_budget)
        return self._pools[name]

    async def _reap_idle(self, timeout_s: float) -> None:
        while True:
            await asyncio.sleep(max(timeout_s / 4, 1.0))
            cutoff = time.monotonic() - timeout_s
            for key, episode in list(self.episodes.items()):
                if episode.last_active < cutoff and not episode.busy:
                    log.info("closing idle episode %s", episode.id)
                    self.episodes.pop(key, None)
                    try:
                        await episode.close()
                    except Exception:  # one bad close must not end reaping for good
                        log.exception("closing idle episode %s failed", episode.id)
