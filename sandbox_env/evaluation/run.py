"""Where and how samples get graded: endpoints (in-process or servers), retries, failover, progress.

Each endpoint gets `workers` concurrent gradings, pulling from one shared queue, so a fast
server takes more work and a dead one takes none. An endpoint that fails at the transport level
(connection refused, 5xx) goes into a half-open state: one request at a time, with backoff,
until one succeeds; after `MAX_ENDPOINT_FAILURES` failed bursts it is dropped for the run. A
sample whose attempt failed for infrastructure reasons (a transport error, or a `Grading` with
`status="infra_error"`) is queued again, to whichever endpoint is free, at most `retries` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandbox_env.errors import ConfigError, PolicyNotFoundError, SandboxEnvError, error_from_dict
from sandbox_env.evaluation.files import Sample, result_row
from sandbox_env.models import BatchItem, BatchRequest, Grading

if TYPE_CHECKING:
    from sandbox_env.grading.tasks import Task

log = logging.getLogger(__name__)

MAX_ENDPOINT_FAILURES = 5  # failed bursts in a row before a server is dropped for the run
MAX_BUSY_BOUNCES = 1000  # 503 replies one sample may get before that counts as a failed attempt
HTTP_TIMEOUT_S = 900.0  # a grading may run many tests; the server enforces each test's limit
BATCH_WINDOW_S = 0.02  # how long a remote grading waits for others to share its batch request


class EndpointDown(Exception):
    """The endpoint could not grade (transport error, 5xx, or an exception in-process)."""


class EndpointBusy(Exception):
    """The endpoint is at capacity (503): try again later, elsewhere if possible."""


class Rejected(Exception):
    """The endpoint refused this request itself (4xx): retrying it cannot help."""


@dataclass
class Endpoint:
    """One place that grades: `grade(task, submission, policy) -> Grading`."""

    label: str
    grade: Callable[[Task, str, str | None], Any]
    droppable: bool = True  # the in-process manager is never dropped for failures in a row
    backoff_s: float = 0.5  # first wait after a failure; doubles with each failure in a row
    info: dict[str, Any] = field(default_factory=dict)
    failures: int = 0
    last_failure: float = float("-inf")
    resume_at: float = 0.0
    dead: str | None = None  # why the endpoint was dropped for the rest of the run
    probe: asyncio.Lock = field(default_factory=asyncio.Lock)

    def failed(self, request_started: float, why: str) -> None:
        # Requests already in flight when the endpoint broke fail together: count them once.
        if request_started < self.last_failure:
            return
        self.failures += 1
        self.last_failure = time.monotonic()
        if self.droppable and self.failures >= MAX_ENDPOINT_FAILURES:
            self.drop(why)
            log.error("dropping %s after %d failures in a row: %s", self.label, self.failures, why)
        else:
            self.resume_at = self.last_failure + min(8.0, self.backoff_s * 2 ** (self.failures - 1))
            log.warning("%s failed (%d in a row): %s", self.label, self.failures, why)

    def drop(self, why: str) -> None:
        self.dead = f"{self.label}: {why}"


@dataclass
class Job:
    """One sample on its way to a verdict; `attempts` counts infrastructure failures."""

    sample: Sample
    task: Task
    submission: str
    attempts: int = 0
    bounces: int = 0
    last_error: str | None = None
    done: bool = False


class Scheduler:
    """Runs jobs on endpoints until each has a verdict or has used up its retries."""

    def __init__(self, endpoints: list[Endpoint], workers: int, *, policy: str | None, retries: int,
                 retry_delay_s: float, on_result: Callable[[dict[str, Any]], None]) -> None:
        self.endpoints = endpoints
        for ep in endpoints:
            ep.backoff_s = max(retry_delay_s, 0.01)
        self.workers = max(1, workers)
        self.policy = policy
        self.retries = max(0, retries)
        self.retry_delay_s = retry_delay_s
        self.on_result = on_result
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.outstanding: set[int] = set()
        self.jobs: dict[int, Job] = {}
        self.finished = asyncio.Event()

    async def run(self, work: list[tuple[Sample, Task, str]]) -> None:
        for sample, task, submission in work:
            job = Job(sample, task, submission)
            self.jobs[sample.index] = job
            self.outstanding.add(sample.index)
            self.queue.put_nowait(job)
        if not self.outstanding:
            return
        workers = [asyncio.create_task(self._worker(ep), name=f"eval-{ep.label}-{i}")
                   for ep in self.endpoints for i in range(self.workers)]
        finished = asyncio.create_task(self.finished.wait())
        try:
            pending: set[asyncio.Future[Any]] = {finished, *workers}
            while not self.finished.is_set() and not all(w.done() for w in workers):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not finished and not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]  # a bug of ours: surface it
            if not self.finished.is_set():  # every endpoint was dropped
                why = "no endpoint left: " + "; ".join(ep.dead or ep.label for ep in self.endpoints)
                for index in list(self.outstanding):
                    job = self.jobs[index]
                    self._finish(job, None, job.last_error or why)
        finally:
            finished.cancel()
            for task in workers:
                task.cancel()
            await asyncio.gather(finished, *workers, return_exceptions=True)

    async def _worker(self, ep: Endpoint) -> None:
        while not ep.dead:
            if ep.failures:  # half-open: one probe at a time, after the backoff
                async with ep.probe:
                    if ep.failures and not ep.dead:
                        await asyncio.sleep(max(0.0, ep.resume_at - time.monotonic()))
                        await self._attempt(ep, await self._next())
                continue
            job = await self._next()
            if ep.failures:
                self.queue.put_nowait(job)  # the endpoint broke while we waited: probe first
                await asyncio.sleep(0)
                continue
            await self._attempt(ep, job)

    async def _next(self) -> Job:
        while True:
            job = await self.queue.get()
            if not job.done:
                return job

    async def _attempt(self, ep: Endpoint, job: Job) -> None:
        if ep.dead:  # dropped while this worker waited for a job: let the others take it
            self.queue.put_nowait(job)
            return
        started = time.monotonic()
        try:
            grading = await ep.grade(job.task, job.submission, self.policy)
        except EndpointBusy:
            job.bounces += 1
            if job.bounces > MAX_BUSY_BOUNCES:
                self._retry(job, f"{ep.label}: at capacity {job.bounces} times")
            else:
                self.queue.put_nowait(job)
            await asyncio.sleep(0.2)
            return
        except Rejected as exc:
            self._finish(job, None, str(exc))
            return
        except (asyncio.CancelledError, ConfigError):
            raise  # a bad option (e.g. a policy the server does not have): the whole run is moot
        except Exception as exc:  # noqa: BLE001 - EndpointDown, or any failure of the sandbox stack
            why = str(exc) or type(exc).__name__
            ep.failed(started, why)
            self._retry(job, f"{ep.label}: {why}")
            return
        if ep.failures:
            log.info("%s answers again", ep.label)
        ep.failures = 0
        if grading.status == "infra_error":
            why = f"{ep.label}: {grading.error or 'infrastructure error'}"
            if grading.retryable:
                self._retry(job, why)
            else:  # e.g. the backend cannot run programs, the image is missing: so will every sample
                log.error("dropping %s: %s", ep.label, why)
                ep.drop(grading.error or "infrastructure error")
                self._finish(job, None, why)
        else:
            self._finish(job, grading, None)

    def _retry(self, job: Job, why: str) -> None:
        job.attempts += 1
        job.last_error = why
        if job.attempts > self.retries:
            log.error("%s (%s): sandbox_error after %d attempts: %s", job.sample.where,
                      job.sample.task_id, job.attempts, why)
            self._finish(job, None, why)
            return
        log.warning("%s (%s): attempt %d failed, retrying: %s", job.sample.where, job.sample.task_id,
                    job.attempts, why)
        loop = asyncio.get_running_loop()
        loop.call_later(self.retry_delay_s * job.attempts, self.queue.put_nowait, job)

    def _finish(self, job: Job, grading: Grading | None, error: str | None) -> None:
        if job.done:
            return
        job.done = True
        attempts = job.attempts + (grading is not None)
        self.on_result(result_row(job.sample, grading, attempts=attempts, error=error))
        self.outstanding.discard(job.sample.index)
        if not self.outstanding:
            self.finished.set()


@contextlib.asynccontextmanager
async def embedded_endpoint(backend: str, policy: str | None, workers: int) -> AsyncIterator[list[Endpoint]]:
    """A `EpisodeManager` in this process, grading on at most `workers` kernels at once.

    The manager keeps the kernels that graded in a stash (one per worker) and grades on them
    again (clean slate guaranteed by `run_program`). A warm pool would only boot containers that
    are never used, stealing CPU from the gradings: the first grading of each worker boots its
    kernel instead.
    """
    from sandbox_env.manager import EpisodeManager
    from sandbox_env.settings import Settings

    settings = Settings(backend=backend, policy=policy or "default", pool_size=0, grader_stash=workers,
                        max_sessions=max(32, 2 * workers))
    manager = EpisodeManager(settings)
    resolved = manager.policy(policy)  # an unknown policy fails here, before anything starts
    await manager.start()
    try:
        async def grade(task: Task, submission: str, policy_name: str | None) -> Grading:
            return await manager.grade(task, submission, policy=policy_name)

        info = {"policy": resolved.model_dump(mode="json"), "image": await _image(backend, resolved)}
        yield [Endpoint(f"embedded:{backend}", grade, droppable=False, info=info)]
    finally:
        await manager.shutdown()


async def _image(backend: str, policy: Any) -> dict[str, Any] | None:
    """The sandbox image and its id, so a summary says exactly what ran the code."""
    if backend != "docker":
        return None
    from sandbox_env.kernels.docker.containers import default_image
    from sandbox_env.kernels.docker.daemon import get_client

    name = policy.image or default_image()
    try:
        image = await asyncio.to_thread(get_client().images.get, name)
        return {"name": name, "id": image.id}
    except Exception:  # noqa: BLE001 - informational only
        return {"name": name, "id": None}


@contextlib.asynccontextmanager
async def remote_endpoints(servers: list[str], token: str | None = None) -> AsyncIterator[list[Endpoint]]:
    """One endpoint per server URL, all sharing one keep-alive HTTP client; each grades through
    `POST /grade/batch` (`BatchSender`).

    `token` (default: `SANDBOX_ENV_TOKEN`) goes to every server as `Authorization: Bearer`.
    """
    import httpx

    token = os.environ.get("SANDBOX_ENV_TOKEN", "") if token is None else token
    headers = {"Authorization": f"Bearer {token}"} if token else None
    timeout = httpx.Timeout(HTTP_TIMEOUT_S, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None),
                                 headers=headers) as client:
        senders = [BatchSender(client, url.rstrip("/")) for url in servers]
        try:
            yield [Endpoint(sender.base, sender.grade) for sender in senders]
        finally:
            for sender in senders:
                await sender.close()


class BatchSender:
    """The gradings the workers ask of one server at about the same time, sent as one
    `POST /grade/batch`; each worker gets its own item's Grading as its line arrives. A failure
    of the whole request (transport, 5xx, 4xx) fails each of its items as `/grade`'s would."""

    def __init__(self, client: Any, base: str) -> None:
        self.client = client
        self.base = base
        self.pending: list[tuple[Task, str, str | None, asyncio.Future[Grading]]] = []
        self.flush: asyncio.TimerHandle | None = None
        self.sending: set[asyncio.Task[None]] = set()

    async def grade(self, task: Task, submission: str, policy: str | None) -> Grading:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Grading] = loop.create_future()
        self.pending.append((task, submission, policy, future))
        if self.flush is None:  # the other workers' requests of this moment go along
            self.flush = loop.call_later(BATCH_WINDOW_S, self._send_pending)
        return await future

    def _send_pending(self) -> None:
        self.flush = None
        by_policy: dict[str | None, list[tuple[Task, str, str | None, asyncio.Future[Grading]]]] = {}
        for entry in self.pending:
            if not entry[3].done():
                by_policy.setdefault(entry[2], []).append(entry)
        self.pending = []
        for policy, entries in by_policy.items():
            task = asyncio.get_running_loop().create_task(self._send(policy, entries))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

    async def _send(self, policy: str | None, entries: list[tuple[Task, str, str | None, asyncio.Future[Grading]]]) -> None:
        from sandbox_env.client.batch import stream_batch

        futures = [future for *_, future in entries]
        request = BatchRequest(items=[BatchItem(task=t.model_dump(mode="json"), submission=s) for t, s, _, _ in entries],
                               policy=policy)
        try:
            async for line in stream_batch(self.client, f"{self.base}/grade/batch", request):
                if line.index is None or futures[line.index].done():
                    continue
                if line.grading is not None:
                    futures[line.index].set_result(line.grading)
                elif line.error is not None:
                    futures[line.index].set_exception(_endpoint_error(self.base, error_from_dict(line.error), policy))
        except SandboxEnvError as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(_endpoint_error(self.base, exc, policy))
        finally:
            for future in futures:
                if not future.done():
                    future.set_exception(EndpointDown("the batch ended without this item's result"))

    async def close(self) -> None:
        if self.flush is not None:
            self.flush.cancel()
        for task in list(self.sending):
            task.cancel()
        await asyncio.gather(*self.sending, return_exceptions=True)


def _endpoint_error(base: str, exc: SandboxEnvError, policy: str | None) -> Exception:
    """What a failed `/grade` means for the run: retry elsewhere, wait, or stop."""
    status = exc.details.get("status")
    if status is None or status == 200:  # not reached, or not a Grading
        return EndpointDown(exc.message)
    if status in (429, 503):
        return EndpointBusy()
    if status in (401, 403):  # the same for every sample: stop the run
        return ConfigError(f"{base} refused the token: {exc.message}; set SANDBOX_ENV_TOKEN or pass --token")
    if status >= 500:
        return EndpointDown(f"HTTP {status}: {exc.message[:300]}")
    if exc.code == PolicyNotFoundError.code:  # the same for every sample: stop the run
        return PolicyNotFoundError(f"{base}: {exc.message}", policy=policy)
    return Rejected(f"{base} refused the request: HTTP {status}: {exc.message[:500]}")
