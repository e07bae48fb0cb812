"""The contract every execution backend fulfils: one isolated interpreter for one episode."""

from __future__ import annotations

import abc
import shutil
from typing import TYPE_CHECKING, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict

from sandbox_env.errors import KernelUnavailableError, LanguageUnavailableError
from sandbox_env.kernels.inspection import LiveOutput
from sandbox_env.languages import Language
from sandbox_env.models import ExecutionResult
from sandbox_env.policy import Policy

if TYPE_CHECKING:
    from sandbox_env.settings import Settings

# Parts of the contract a backend may lack (the in-process fake lacks all of them); the
# conformance suite (`sandbox_env.testing`) skips exactly the checks that need a missing one.
CAPABILITIES: dict[str, str] = {
    "isolation": "a sandbox: the kernel's files, environment and processes are its own, the host's "
                 "invisible (`serve` refuses a backend without it unless --allow-unisolated)",
    "memory_limit": "the policy's memory_mb is enforced: a memory hog ends as oom, the server unharmed",
    "process_limit": "the policy's pids limit is enforced: a fork loop is contained",
    "process_cleanup": "every process the code starts, daemons too, ends with the interpreter",
    "fd_output": "output written to file descriptors 1 and 2 (os.write, subprocesses) is captured",
    "hard_kill": "a step that ignores interrupts is killed at its limit and the interpreter replaced",
    "process_exit": "os._exit and fatal signals end only the interpreter, and the step reports them",
    "rich_display": "IPython's display() comes back as rich outputs (images, HTML)",
}
ALL_CAPABILITIES = frozenset(CAPABILITIES)
# Why a kernel was closed after its episode instead of recycled (`Kernel.recycle`, `KernelPool`).
REFUSALS: dict[str, str] = {
    "unsupported": "the backend cannot recycle its kernels",
    "budget": "the policy's reuse budget is spent (reuses = 0: always)",
    "busy": "a request was still running when the episode ended",
    "tainted": "the episode saw an anomaly: a lost, replaced or tampered-with sandbox",
    "leftovers": "the sandbox's check found something of the episode left, or not as it was",
    "failed": "the recycle itself failed: an error, a timeout, a reply that is not a report",
    "pool_full": "clean, but the pool had no room for it",
    "closed": "the pool was closing",
}


HOST_PATH = "/usr/local/bin:/usr/bin:/bin"  # what a sandbox bound to the host's /usr finds


class KernelConfig(BaseModel):
    """A backend's own options: a subclass per backend holds exactly the fields it reads, and
    `from_settings` picks them from the server's settings. An unknown option is an error, never
    silently dropped. The policy (what the code may use) is separate: the same for every backend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls()


class Kernel(abc.ABC):
    """One isolated, stateful Python interpreter serving exactly one episode.

    `execute` never raises for anything the code does: timeouts, OOM, crashes and floods come
    back as an `ExecutionResult` status. It raises `KernelError` only when the backend itself
    fails. After a `timeout`/`oom`/`killed` result the kernel is usable again (restarted with an
    empty namespace if it had to be killed).
    """

    name: ClassVar[str]
    # What of the contract this backend fulfils. The default claims all of it, so a new backend is
    # held to the whole suite unless it says otherwise.
    capabilities: ClassVar[frozenset[str]] = ALL_CAPABILITIES
    # Whether `recycle` can ever succeed. Kernels that cannot are closed as before, not handed to
    # their pool: an episode's close still waits for them (nothing of the episode outlives it).
    recycles: ClassVar[bool] = False
    config_class: ClassVar[type[KernelConfig]] = KernelConfig

    def __init__(self, policy: Policy, config: KernelConfig | None = None) -> None:
        self.policy = policy
        self.config = config if config is not None else self.config_class()
        self.reuses = 0  # episodes served after the first (`recycle`): 0 for a kernel never used
        # Inspection reads these, never the interpreter: the variables the sandbox's trusted code
        # listed at the end of the last step (`kernels/inspection.py: parse_snapshot`; None: that
        # step sent none), and the running step's output as it arrives (backends that stream).
        self.snapshot: dict[str, Any] | None = None
        self.live = LiveOutput()
        if type(self.config) is not self.config_class:  # another backend's options would be dropped
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, not {type(self.config).__name__}")

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the interpreter; when this returns, `execute` answers promptly."""

    @abc.abstractmethod
    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        """Run `code`; `timeout_s` defaults to the policy's `timeout_s`."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the interpreter and everything it started; remove its files. Idempotent."""

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """Whether the interpreter can take `execute` calls."""

    async def run_program(self, source: str, *, stdin: bytes = b"", timeout_s: float) -> ExecutionResult:
        """Run `source` as `python3 -I -c source` would, as a fresh process in this kernel's sandbox
        (it may be forked from a pre-warmed interpreter that never ran anything of the episode).

        Every process of the agent is stopped first; the working directory (and /tmp where the
        sandbox has its own) is empty, the environment minimal, the policy's limits apply, `stdin`
        is fed then closed, output is bounded. Nothing of earlier steps or earlier programs is
        visible, so a kernel may serve many programs in a row; the interpreter's namespace is lost.
        Raises `KernelError` only when the backend fails.
        """
        raise KernelUnavailableError(f"the {self.name} backend cannot run programs")

    async def recycle(self) -> str | None:
        """Make this kernel, whose episode is over, fit for a new episode without starting another:
        None once it is, as good as fresh (nothing of the episode left: namespace, processes,
        files, state of its sandbox), which `policy.reuses` allows so many times. Otherwise why
        not, one of `REFUSALS`, and the caller closes the kernel. Never raises for anything the
        episode did. Backends that cannot prove a sandbox clean keep this: never recycled."""
        return "unsupported"

    @classmethod
    async def check_language(cls, language: Language) -> None:
        """Raise `LanguageUnavailableError` unless this backend's sandboxes can run `language`. By
        default a sandbox sees the host's /usr read-only (Jupyter; the fake runs on the host), so
        the toolchain's programs must be there; the message names the apt package."""
        missing = [b for b in language.binaries if shutil.which(b, path=HOST_PATH) is None]
        if missing:
            raise LanguageUnavailableError(
                f"{language.name} is not available on this server: the {cls.name} backend runs the host's "
                f"toolchain, and {', '.join(missing)} is not installed (as root: {language.apt_command})",
                language=language.name)

    @classmethod
    async def setup_backend(cls) -> dict[str, Any]:
        """Once per server start: sweep orphans, probe the runtime; returns a report to log."""
        return {}

    @classmethod
    async def teardown_backend(cls) -> None:
        """Once per server shutdown, after every kernel is closed: remove what is left."""
        return None  # an optional hook: nothing to remove by default

    async def memory_bytes(self) -> int | None:
        """Memory the kernel and its sandbox hold now, in bytes, measured cheaply (no request to
        the interpreter); None when the backend cannot tell. The pool sizes its memory budget with
        it (`kernels/demand.py`), and uses the policy's limit instead of None."""
        return None

    async def usage(self) -> dict[str, Any]:
        """Resource use now, measured from outside (cgroup files; never a request to the
        interpreter, so it answers at once while a step runs): `memory_mb`, `cpu_time_s`, None
        where the backend cannot tell."""
        memory = await self.memory_bytes()
        return {"memory_mb": None if memory is None else round(memory / (1 << 20), 1), "cpu_time_s": None}

    async def inspect(self) -> dict[str, Any]:
        """What the inspection API shows of the kernel, without disturbing it: never a request to
        the interpreter, never waiting for a running step. Keys every backend uses: `variables`
        (the last snapshot's rows, `{"name", "type", "repr", "len"?}`), `memory_mb`, `cpu_time_s`;
        backends add their own (a pid, a container)."""
        rows = (self.snapshot or {}).get("variables") or []
        return {"variables": rows, **await self.usage()}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
