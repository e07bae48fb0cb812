"""Replay: an exported episode (.ipynb) re-executed by nbclient in a fresh sandbox, each cell's
outputs compared with the recording (`notebook.verdict`): same, differs, or a new error.

nbclient drives a kernel manager and client of ours (`SandboxKernelManager`): the manager starts
an episode of the chosen backend and policy in-process (an `EpisodeManager`, no server), and the
client answers nbclient's execute requests with Jupyter messages made from each step's result,
the same way the export made the recording's outputs (`notebook.cell_outputs`). So every backend
replays alike, with the limits of the policy, and a recording and its replay compare field by field.
Needs the `replay` extra (nbclient, nbformat).

The notebook is untrusted input: its backend is never used (the caller's, else the configured
one: `replay_settings`), a backend that is not a sandbox runs only on the caller's explicit
`allow_unisolated` (as `serve --allow-unisolated`), and the policy it records is only a suggestion
that must pass the manager's check (`allowed_policies`) like a client's reset.
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

from pydantic import ValidationError

from sandbox_env.episode import Episode
from sandbox_env.errors import ConfigError, PolicyNotFoundError
from sandbox_env.kernels import load_kernel_class
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


def replay_settings(backend: str | None = None, policy: str | None = None, *,
                    allow_unisolated: bool = False) -> Settings:
    """The settings of a replay's manager: `backend`, else the configured one (SANDBOX_ENV_BACKEND,
    default jupyter; never the notebook's); `policy` as its default policy (the caller's choice, so
    allowed), else the configured one. A backend without the `isolation` capability (the
    in-process fake) is refused unless `allow_unisolated`, which, as `serve --allow-unisolated`,
    also runs Jupyter kernels without their sandbox: trusted code only."""
    chosen: dict[str, Any] = {"pool_size": 0, "max_sessions": 1}
    if backend is not None:
        chosen["backend"] = backend
    if policy is not None:
        chosen["policy"] = policy
    try:
        settings = Settings(**chosen)
    except ValidationError as exc:
        raise ConfigError("; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                                    for err in exc.errors())) from None
    if allow_unisolated:
        return settings.model_copy(update={"jupyter_unisolated": True})
    if "isolation" not in load_kernel_class(settings.backend).capabilities:
        raise ConfigError(f"refusing to replay: the {settings.backend} backend is not a sandbox (code runs "
                          "unisolated, with your rights); --allow-unisolated replays it anyway, for trusted code only")
    return settings


def recorded(notebook: Any) -> dict[str, Any]:
    """The notebook's `metadata.sandbox_env`, its types checked (cells' too); ConfigError if malformed."""
    meta = notebook.metadata.get("sandbox_env")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ConfigError("the notebook's metadata.sandbox_env is not an object")
    for key in ("backend", "policy"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ConfigError(f"the notebook's metadata.sandbox_env.{key} is not a string")
    for index, cell in enumerate(notebook.cells):
        mine = cell.get("metadata", {}).get("sandbox_env")
        if mine is None:
            continue
        if not isinstance(mine, dict):
            raise ConfigError(f"cell {index}: metadata.sandbox_env is not an object")
        if mine.get("step") is not None and type(mine["step"]) is not int:
            raise ConfigError(f"cell {index}: metadata.sandbox_env.step is not an integer")
    return meta


class SandboxKernelManager:
    """nbclient's kernel manager (what it calls of jupyter_client's): starts a sandboxed episode
    with `settings` (in-process, one kernel, none kept warm; `replay_settings`) under `policy` (a
    reset's: None is the settings' default; any other must be allowed by them) and hands out a
    `SandboxKernelClient` over it."""

    kernel_name = "python3"
    ipykernel = False

    def __init__(self, settings: Settings, policy: str | None = None) -> None:
        self.settings, self.sandbox_policy = settings, policy
        self._manager: EpisodeManager | None = None
        self._episode: Episode | None = None
        self._client: SandboxKernelClient | None = None
        self.start_s = 0.0  # how long the sandbox took to start

    @property
    def has_kernel(self) -> bool:
        return self._episode is not None and not self._episode.closed

    async def start_kernel(self, **kwargs: Any) -> None:
        started = time.perf_counter()
        self._manager = EpisodeManager(self.settings)
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


async def replay(notebook: Any, *, backend: str | None = None, policy: str | None = None,
                 allow_unisolated: bool = False) -> Replay:
    """Re-execute `notebook` (an nbformat v4 NotebookNode) with nbclient in a fresh sandbox of
    `backend` (else the configured one: never the notebook's, see `replay_settings`) under
    `policy`, else the one the notebook records if the configured `allowed_policies` allow it.
    Raises SandboxEnvError (ConfigError for a malformed notebook or a refused choice)."""
    from nbclient import NotebookClient

    meta = recorded(notebook)
    settings = replay_settings(backend, policy, allow_unisolated=allow_unisolated)
    suggested = None if policy is not None else meta.get("policy")
    fresh = copy.deepcopy(notebook)
    for cell in fresh.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    manager = SandboxKernelManager(settings, policy=suggested)
    client = NotebookClient(fresh, km=manager,  # type: ignore[arg-type]  # duck-typed: what nbclient calls
                            allow_errors=True, timeout=None, record_timing=False,
                            kernel_name="python3")
    try:
        await client.async_execute()
    except PolicyNotFoundError as exc:
        if suggested is None:
            raise
        raise ConfigError(f"the notebook records policy {suggested[:100]!r}, which is not allowed here "
                          "(allowed_policies); choose one with --policy") from exc
    finally:
        await manager.shutdown_kernel()
    cells = []
    for index, (was, replayed) in enumerate(zip(notebook.cells, fresh.cells)):
        if was.cell_type != "code":
            continue
        said, details = verdict(was.get("outputs", []), replayed.get("outputs", []))
        step = (was.metadata.get("sandbox_env") or {}).get("step")
        cells.append(CellVerdict(index, step, said, details))
    return Replay(cells, fresh, manager.start_s)
