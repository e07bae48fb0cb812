"""Batch grading: many submissions graded on the manager's slots, shared fairly between batches.

`FairGate` decides whose grading takes the next free slot: the tenants waiting take turns
(round-robin), and so do the batches of one tenant, so a 1000-item batch cannot starve another
client's 5-item one. Slots are the manager's own (capacity, `tenant_max_sessions`,
`tenant_max_gradings`): an item waits for one, it never fails for want of one.

`run_batch` grades a batch's distinct items (identical task, submission and reward: graded
once) with at most `parallel` of them in flight, and yields each result as it finishes. Closing
the iterator (the client went away) cancels the gradings still waiting or running.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from sandbox_env.errors import (
    CapacityError,
    ConfigError,
    DrainingError,
    KernelError,
    KernelUnavailableError,
    QuotaError,
    SandboxEnvError,
    TaskError,
)
from sandbox_env.grading.rewards import reward_policy
from sandbox_env.grading.tasks import Task
from sandbox_env.manager import EpisodeManager
from sandbox_env.models import BatchItem, Grading

log = logging.getLogger(__name__)

RETRY_S = 0.05  # how soon waiters try again when slots are held by work outside the gate


class FairGate:
    """Hands the manager's free grading slots to waiting batch items, one at a time, taking
    tenants in turn and, within a tenant, its batches in turn."""

    def __init__(self, manager: EpisodeManager) -> None:
        self.manager = manager
        # tenant -> batch key -> waiters (first come first served within one batch)
        self._waiting: dict[str, dict[int, collections.deque[asyncio.Future[None]]]] = {}
        self._turns: list[str] = []  # tenants in the order they get their next turn
        self._pump_handle: asyncio.Handle | None = None
        self.granted = 0  # turns handed out since start

    async def wait(self, tenant: str, batch: int) -> None:
        """Return when `tenant`'s item of `batch` may start its grading (at once if it may now and
        nobody waits); raises DrainingError when the server drains."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batches = self._waiting.setdefault(tenant, {})
        batches.setdefault(batch, collections.deque()).append(future)
        if tenant not in self._turns:
            self._turns.append(tenant)
        self.kick()
        try:
            await future
        finally:
            if not future.done():  # cancelled while waiting: out of the queue
                future.cancel()
            self._forget(tenant, batch, future)

    def kick(self) -> None:
        """Look for a free slot soon (a slot was freed, or a waiter came)."""
        if self._pump_handle is None:
            self._pump_handle = asyncio.get_running_loop().call_soon(self._pump)

    @property
    def waiting(self) -> int:
        return sum(len(q) for batches in self._waiting.values() for q in batches.values())

    def _pump(self) -> None:
        """Grant one slot, then look again once that grading has taken it (its counters move as it
        starts: granting several at once would promise the same slot twice)."""
        self._pump_handle = None
        loop = asyncio.get_running_loop()
        for tenant in list(self._turns):
            try:
                self.manager.admit_grading(tenant)
            except DrainingError as exc:
                self._fail_all(exc)
                return
            except QuotaError:
                continue  # this tenant is at its quota: the next one may go
            except CapacityError:
                break  # no slot for anyone
            if self._grant(tenant):
                if tenant in self._turns:  # still waiting: its next turn after everyone else's
                    self._turns.remove(tenant)
                    self._turns.append(tenant)
                self._pump_handle = loop.call_soon(self._pump)
                return
        if self.waiting:  # slots held by episodes or other tenants: try again shortly
            self._pump_handle = loop.call_later(RETRY_S, self._pump)

    def _grant(self, tenant: str) -> bool:
        batches = self._waiting.get(tenant, {})
        for key in list(batches):
            queue = batches.pop(key)
            while queue and queue[0].done():
                queue.popleft()
            if not queue:
                continue
            queue.popleft().set_result(None)
            self.granted += 1
            if queue:
                batches[key] = queue  # to the end: this tenant's other batches go first
            self._tidy(tenant)
            return True
        self._tidy(tenant)
        return False

    def _forget(self, tenant: str, batch: int, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant, {}).get(batch)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._waiting[tenant][batch]
        self._tidy(tenant)

    def _tidy(self, tenant: str) -> None:
        if tenant in self._waiting and not self._waiting[tenant]:
            del self._waiting[tenant]
        if tenant not in self._waiting and tenant in self._turns:
            self._turns.remove(tenant)

    def _fail_all(self, exc: SandboxEnvError) -> None:
        for batches in self._waiting.values():
            for queue in batches.values():
                for future in queue:
                    if not future.done():
                        future.set_exception(exc)


@dataclasses.dataclass
class Unit:
    """One distinct grading of a batch and the indices of the items it answers."""

    indices: list[int]
    task: Task | None
    submission: str
    reward: str | None
    error: SandboxEnvError | None = None  # why it cannot be graded (its task, its reward policy)


def plan(manager: EpisodeManager, items: list[BatchItem], policy: str | None, reward: str | None) -> list[Unit]:
    """The batch's distinct gradings, in the order of their first item; identical items (the same
    task, submission and reward policy) share one. A task or reward policy the server refuses
    makes a unit that carries the error instead."""
    units: dict[str, Unit] = {}
    for index, item in enumerate(items):
        chosen = item.reward or reward
        task_key = json.dumps(item.task, sort_keys=True) if item.task is not None else f"id:{item.task_id}"
        key = hashlib.sha256(json.dumps([task_key, item.submission, chosen]).encode()).hexdigest()
        if key in units:
            units[key].indices.append(index)
            continue
        unit = Unit([index], None, item.submission, chosen)
        try:
            if chosen:
                try:
                    reward_policy(chosen)
                except ConfigError as exc:
                    raise TaskError(exc.message) from exc
            unit.task = manager.resolve_task(item.task_id, item.task, policy)
        except SandboxEnvError as exc:
            unit.error = exc
        units[key] = unit
    return list(units.values())


@dataclasses.dataclass
class Tally:
    """What `run_batch` did, for the summary line."""

    gradings: int = 0


async def run_batch(manager: EpisodeManager, gate: FairGate, units: list[Unit], *, owner: str,
                    policy: str | None, parallel: int, tally: Tally) -> AsyncGenerator[tuple[Unit, Grading | SandboxEnvError], None]:
    """Each unit's grading (or why it has none) as it finishes: units with an error first."""
    for unit in units:
        if unit.error is not None:
            yield unit, unit.error
    todo = collections.deque(u for u in units if u.error is None)
    done: asyncio.Queue[tuple[Unit, Grading | SandboxEnvError]] = asyncio.Queue()
    batch = id(todo)

    async def worker() -> None:
        while todo:
            unit = todo.popleft()
            await done.put((unit, await _grade(manager, gate, unit, owner=owner, policy=policy, batch=batch, tally=tally)))

    workers = [asyncio.create_task(worker()) for _ in range(min(parallel, len(todo)))]
    try:
        for _ in range(len(todo)):
            yield await done.get()
    finally:  # the client went away (or the batch ended): nothing keeps grading for nobody
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def _grade(manager: EpisodeManager, gate: FairGate, unit: Unit, *, owner: str, policy: str | None,
                 batch: int, tally: Tally) -> Grading | SandboxEnvError:
    """One unit's grading once the gate lets it start; a slot taken by someone else between the
    gate's turn and the start sends it back to wait. Never raises for a failure of the service:
    that is an `infra_error` Grading."""
    assert unit.task is not None
    started = time.perf_counter()
    while True:
        try:
            await gate.wait(owner, batch)
            try:
                grading = await manager.grade(unit.task, unit.submission, policy=policy, reward=unit.reward, owner=owner)
            finally:
                gate.kick()  # a slot is free again
        except DrainingError as exc:
            return _infra(unit.task, exc.message, True, started)
        except CapacityError:
            continue  # lost the slot to work outside the gate: wait for the next one
        except KernelError as exc:
            return _infra(unit.task, exc.message, exc.retryable and not isinstance(exc, KernelUnavailableError), started)
        except SandboxEnvError as exc:
            return exc
        except Exception as exc:  # a bug of ours must not end the other items' stream
            log.exception("batch grading of %s failed", unit.task.id)
            return _infra(unit.task, f"{type(exc).__name__}: {exc}", False, started)
        tally.gradings += 1
        return grading


def _infra(task: Task, message: str, retryable: bool, started: float) -> Grading:
    return Grading(task_id=task.id, status="infra_error", reward=None, error=message, retryable=retryable,
                   wall_time_s=time.perf_counter() - started)


def describe(error: SandboxEnvError) -> dict[str, Any]:
    """A unit's error as its `error` line carries it."""
    return {**error.to_dict(), "status": error.http_status}
