"""Replay: an exported episode (.ipynb) re-executed by nbclient in a fresh sandbox, each cell's
outputs compared with the recording (`notebook.verdict`): same, differs, or a new error.

nbclient drives a kernel manager and client of ours (`SandboxKernelManager`): the manager starts
an episode of the chosen backend and policy in-process (an `EpisodeManager`, no server), and the
client answers nbclient's execute requests with Jupyter messages made from each step's result,
the same way the export made the recording's outputs (`notebook.cell_outputs`). So every backend
replays alike, with the limits of the policy, and a recording and its replay compare field by field.
Needs the `replay` extra (nbclient, nbformat).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sandbox_env.episode import Episode
from sandbox_env.manager import EpisodeManager
from sandbox_env.models import CodeAction
from sandbox_env.notebook import cell_outputs, verdict
from sandbox_env.settings import Settings

LANGUAGE_INFO = {"name": "python", "file_extension": ".py", "mimetype": "text/x-python"}


def _message(kind: str, content: dict[str, Any], parent: str | None, session: str) -> dict[str, Any]:
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": kind, "session": session, "username": "sandbox-env", "version": "5.3",
              "date": datetime.datetime.now(datetime.UTC)}
    return {"header": header, "msg_id": msg_id, "msg_type": kind, "content": content, "metadata": {},
            "parent_header": {"msg_id": parent} if parent else {}, "buffers": []}


class _Channel:
    """What nbclient reads a channel with: `get_msg(timeout)`, raising queue.Empty."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.messages.get(), timeout)
        except TimeoutError:
            raise queue.Empty from None

    def put(self, msg: dict[str, Any]) -> None:
        self.messages.put_nowait(msg)


class SandboxKernelClient:
    """A kernel client over one episode: each execute request is a step; its result comes back as
    the messages a Jupyter kernel would send (busy, the outputs, idle, and the reply)."""

    allow_stdin = False

    def __init__(self, episode: Episode) -> None:
        self.episode = episode
        self.session = uuid.uuid4().hex
        self.shell_channel, self.iopub_channel = _Channel(), _Channel()
        self.execution_count = 0

    async def start_channels(self, *args: Any, **kwargs: Any) -> None:
        return None

    def stop_channels(self) -> None:
        return None

    async def wait_for_ready(self, timeout: float | None = None) -> None:
        return None

    async def is_alive(self) -> bool:
        return not self.episode.closed

    def kernel_info(self) -> str:
        reply = _message("kernel_info_reply", {"status": "ok", "language_info": LANGUAGE_INFO, "implementation": "sandbox-env",
                                               "protocol_version": "5.3"}, None, self.session)
        reply["parent_header"] = {"msg_id": reply["msg_id"]}
        self.shell_channel.put(reply)
        return str(reply["msg_id"])

    async def execute(self, code: str, silent: bool = False, store_history: bool = True, **kwargs: Any) -> str:
        request = uuid.uuid4().hex
        await self.episode.step(CodeAction(code=code))
        result = self.episode.history[-1]["result"]
        self.execution_count += 1
        result = {**result, "execution_count": result.get("execution_count") or self.execution_count}
        self.iopub_channel.put(_message("status", {"execution_state": "busy"}, request, self.session))
        self.iopub_channel.put(_message("execute_input", {"code": code, "execution_count": result["execution_count"]},
                                        request, self.session))
        for output in cell_outputs(result):
            kind = output.pop("output_type")
            self.iopub_channel.put(_message(kind, output, request, self.session))
        self.iopub_channel.put(_message("status", {"execution_state": "idle"}, request, self.session))
        exception = result.get("exception") or None
        reply: dict[str, Any] = {"status": "error" if exception else "ok", "execution_count": result["execution_count"]}
        if exception:
            reply.update(ename=exception.get("type", ""), evalue=exception.get("message", ""),
                         traceback=str(exception.get("traceback") or "").splitlines())
        self.shell_channel.put(_message("execute_reply", reply, request, self.session))
        return request


class SandboxKernelManager:
    """nbclient's kernel manager (what it calls of jupyter_client's): starts a sandboxed episode of
    `backend` under `policy` (in-process, one kernel, none kept warm) and hands out a
    `SandboxKernelClient` over it."""

    kernel_name = "python3"
    ipykernel = False

    def __init__(self, backend: str = "jupyter", policy: str | None = None) -> None:
        self.sandbox_backend, self.sandbox_policy = backend, policy
        self._manager: EpisodeManager | None = None
        self._episode: Episode | None = None
        self._client: SandboxKernelClient | None = None
        self.start_s = 0.0  # how long the sandbox took to start

    @property
    def has_kernel(self) -> bool:
        return self._episode is not None and not self._episode.closed

    async def start_kernel(self, **kwargs: Any) -> None:
        started = time.perf_counter()
        self._manager = EpisodeManager(Settings(backend=self.sandbox_backend, pool_size=0, max_sessions=1))
        await self._manager.start()
        self._episode = await self._manager.open_episode()
        await self._episode.reset(policy=self.sandbox_policy)
        self.start_s = time.perf_counter() - started

    def client(self, **kwargs: Any) -> SandboxKernelClient:
        assert self._episode is not None, "start_kernel first"
        if self._client is None:
            self._client = SandboxKernelClient(self._episode)
        return self._client

    async def is_alive(self) -> bool:
        return self.has_kernel

    async def interrupt_kernel(self) -> None:
        return None  # each step ends by itself, at the policy's limit

    async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
        if self._manager is not None:
            if self._episode is not None:
                await self._manager.close_episode(self._episode)
            await self._manager.shutdown()
        self._manager = None

    async def cleanup_resources(self, restart: bool = False) -> None:
        return None


@dataclass
class CellVerdict:
    index: int
    step: int | None
    verdict: str  # same | differs | new error
    details: list[str] = field(default_factory=list)


@dataclass
class Replay:
    cells: list[CellVerdict]
    notebook: Any  # the executed notebook (nbformat's NotebookNode)
    start_s: float = 0.0  # of it, starting the fresh sandbox

    @property
    def same(self) -> bool:
        return all(cell.verdict == "same" for cell in self.cells)

    def counts(self) -> dict[str, int]:
        counts = {"same": 0, "differs": 0, "new error": 0}
        for cell in self.cells:
            counts[cell.verdict] += 1
        return counts


def load_notebook(path: str) -> Any:
    """An .ipynb file as nbformat v4, validated; raises on anything else."""
    import nbformat

    nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    nbformat.validate(nb)
    return nb


def save_notebook(notebook: Any, path: str) -> None:
    import nbformat

    nbformat.write(notebook, path)  # type: ignore[no-untyped-call]


async def replay(notebook: Any, *, backend: str | None = None, policy: str | None = None) -> Replay:
    """Re-execute `notebook` (an nbformat v4 NotebookNode) with nbclient in a fresh sandbox; the
    backend and policy default to those the notebook records."""
    from nbclient import NotebookClient

    meta = notebook.metadata.get("sandbox_env") or {}
    fresh = copy.deepcopy(notebook)
    for cell in fresh.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    manager = SandboxKernelManager(backend=backend or meta.get("backend") or "jupyter",
                                   policy=policy or meta.get("policy"))
    client = NotebookClient(fresh, km=manager,  # type: ignore[arg-type]  # duck-typed: what nbclient calls
                            allow_errors=True, timeout=None, record_timing=False,
                            kernel_name="python3")
    try:
        await client.async_execute()
    finally:
        await manager.shutdown_kernel()
    cells = []
    for index, (recorded, replayed) in enumerate(zip(notebook.cells, fresh.cells)):
        if recorded.cell_type != "code":
            continue
        said, details = verdict(recorded.get("outputs", []), replayed.get("outputs", []))
        step = (recorded.metadata.get("sandbox_env") or {}).get("step")
        cells.append(CellVerdict(index, step, said, details))
    return Replay(cells, fresh, manager.start_s)
