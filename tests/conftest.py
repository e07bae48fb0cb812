"""Shared fixtures: a real uvicorn server on loopback, running `create_app(settings)` in a thread."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# The backend contract's checks are plain asserts in the package: pytest explains their failures.
pytest.register_assert_rewrite("sandbox_env.testing")

STARTUP_DEADLINE_S = 120.0  # generous: a shared 2-core machine may be busy starting kernels
# Servers require a token; the test servers use this one, and sandbox-env's clients (and the
# servers and tools the tests start in subprocesses) read it from the environment.
os.environ.setdefault("SANDBOX_ENV_TOKEN", secrets.token_hex(24))


@dataclass
class LiveServer:
    """A running server; `url` is its `http://127.0.0.1:<port>` root."""

    url: str
    settings: Any
    app: Any
    server: Any
    thread: threading.Thread

    @property
    def token(self) -> str | None:
        """The admin token (None when the server runs with auth=False)."""
        if self.app is None:  # a remote server (SANDBOX_ENV_TEST_URL): the token of the environment
            return os.environ.get("SANDBOX_ENV_TOKEN")
        return getattr(self.app.state, "admin_token", None)

    @property
    def headers(self) -> dict[str, str]:
        """Headers that authenticate a raw HTTP or WebSocket client as the admin."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def manager(self) -> Any:
        """The app's EpisodeManager, when the server exposes it on `app.state`."""
        return getattr(self.app.state, "manager", None)


@contextlib.contextmanager
def run_live_server(**settings: Any) -> Iterator[LiveServer]:
    """Start `sandbox_env.server.app.create_app(Settings(**settings))` under uvicorn; stop it after."""
    pytest.importorskip("sandbox_env.server.app", reason="the server is not written yet")
    import uvicorn

    from sandbox_env.server.app import create_app, uvicorn_kwargs
    from sandbox_env.server.serving import Server
    from sandbox_env.settings import Settings

    settings.setdefault("pool_size", 1)
    settings.setdefault("token", os.environ["SANDBOX_ENV_TOKEN"])
    config_settings = Settings(host="127.0.0.1", port=0, **settings)
    app = create_app(config_settings)
    # A socket bound here (port 0) removes the race of picking a "free" port and binding later.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = {**uvicorn_kwargs(config_settings), "timeout_graceful_shutdown": 5}
    options.pop("host"), options.pop("port")  # the pre-bound socket decides both
    config = uvicorn.Config(app, log_level="warning", **options)
    server = Server(config, app)  # what `sandbox-env serve` runs: a stop drains first
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            pytest.fail("the test server did not start (see captured logs)")
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", config_settings, app, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "restarts_dockerd: stops and restarts the Docker daemon; runs last")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that starts a server starts kernels: mark it slow, so `-m "not slow"` is quick.
    for item in items:
        if {"live_server", "live_server_factory"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # A daemon restart kills every container of the host: after every other test (stable sort).
    items.sort(key=lambda item: item.get_closest_marker("restarts_dockerd") is not None)


def missing(reason: str) -> None:
    """Skip a test whose requirement is missing here; in CI (CI=true) that is a failure."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Any:
    """A docker-py client for an engine that answers and has the sandbox image."""
    try:
        import docker

        from sandbox_env.kernels.docker.containers import default_image

        client = docker.from_env(timeout=60)
        client.ping()
        client.images.get(default_image())
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable engine"
        missing(f"no Docker engine or sandbox image ({exc}): run .ci/docker-setup.sh")
    return client


@pytest.fixture(scope="session")
def require_docker(docker_client: Any) -> None:
    """For tests that need the engine but not the client itself."""


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium for the web page's tests (scripts/test installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("chromium is not installed")
    return str(path)


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    """One server per test module (starting kernels is the slow part).

    The backend is `SANDBOX_ENV_BACKEND` (default: jupyter), so the suite can run on docker too;
    with `SANDBOX_ENV_TEST_URL`, the tests that use only its URL and token drive that server instead.
    """
    remote = os.environ.get("SANDBOX_ENV_TEST_URL")
    if remote:  # a running server or farm (tests/farm runs the protocol tests through its gateway)
        from sandbox_env.settings import Settings

        # Its settings as far as the tests can know them: the environment's (SANDBOX_ENV_BACKEND...)
        yield LiveServer(remote.rstrip("/"), Settings(), None, None, None)  # type: ignore[arg-type]
        return
    with run_live_server(max_sessions=8, allowed_policies=["default", "strict"]) as server:
        yield server


@pytest.fixture
def live_server_factory() -> Iterator[Callable[..., LiveServer]]:
    """Start servers with custom settings (e.g. `max_sessions=1`); all stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **settings: stack.enter_context(run_live_server(**settings))
