"""The class sweep (issue #8, item 5): from inside an episode, every fd of every process visible
in /proc (and its cwd, root, environ, mem, net namespace, signal 0), and every file and socket
under /tmp, /run, /var/run, /dev/shm, /var/tmp and the kernel's own parent directories, opened
for read and for write, sockets connected. Meanwhile another episode (the canary) holds a secret
in a variable and in a file, and a grading holds hidden tests. Nothing reached may belong to the
canary, the grader, the server (here: the test process that hosts the kernels, and a loopback
listener standing for its API) or the host.

One sweep per backend (module-scoped, it is the expensive part); each test asserts one facet, and
its message lists exactly what was reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from security_helpers import (
    BACKENDS,
    GOOD_SQUARE,
    MACHINERY,
    RUNTIME_SOCKETS,
    LoopbackListener,
    Roles,
    connection_file,
    describe,
    environ_sha256,
    holding_task,
    host_fingerprints,
    kernel_ident,
    kernel_root_name,
    new_kernel,
    parse,
    remove_leftover_containers,
    require_backend,
    reversed_needles,
    run_probe,
    sweep_findings,
    token,
    wait_for_comm,
)

from sandbox_env.grading.driver import grade

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]
HOLD_S = 100.0  # the grading is cancelled as soon as the sweep is done


@dataclass
class Sweep:
    backend: str
    report: dict[str, Any]
    findings: dict[str, list[str]]
    roles: Roles
    listener_accepted: int


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=BACKENDS)
async def swept(request: pytest.FixtureRequest) -> AsyncIterator[Sweep]:
    backend = str(request.param)
    require_backend(backend, request)
    kernels, grading = [], None
    listener = LoopbackListener()
    try:
        # the canary: a secret in a variable and in a file of its workspace
        canary = new_kernel(backend)
        kernels.append(canary)
        await canary.start()
        secret, file_name = token("canary"), token("file")
        planted = await canary.execute(f"CANARY = {secret!r}\nwith open({file_name!r}, 'w') as f:\n"
                                       "    f.write(CANARY)\nprint('ok')")
        assert planted.stdout == "ok\n", planted
        needles = {"canary:secret": secret, "canary:file": file_name}
        if (conn := connection_file(canary)) is not None:
            needles["canary:key"] = conn[1]

        # a grading in progress: hidden tests in the grader's hands until it is cancelled
        grader = new_kernel(backend)
        kernels.append(grader)
        await grader.start()
        marker, comm = token("hidden"), "sbxg" + token("")[3:13]
        needles["grader:hidden"] = marker
        grading = asyncio.create_task(grade(grader, parse(holding_task(marker, comm, HOLD_S)), GOOD_SQUARE))
        grader_pid = await asyncio.to_thread(wait_for_comm, comm, 60.0)
        assert grader_pid is not None, f"harness: the grader never started ({grading})"

        attacker = new_kernel(backend)
        kernels.append(attacker)
        await attacker.start()
        report = await run_probe(attacker, "sweep", {
            "needles": reversed_needles(needles), "ports": [listener.port], "socket_paths": RUNTIME_SOCKETS,
            "skip": MACHINERY})
        assert not grading.done(), f"harness: the grading ended before the sweep did: {grading}"
        roles = Roles(server={os.getpid()}, comms={"grader": comm},
                      idents={"own": [kernel_ident(attacker)], "canary": [kernel_ident(canary)],
                              "grader": [kernel_ident(grader)]},
                      roots={k: v for k, v in (("own", kernel_root_name(attacker)), ("canary", kernel_root_name(canary)),
                                               ("grader", kernel_root_name(grader))) if v})
        findings = sweep_findings(report, roles, server_environ=environ_sha256(os.getpid()))
        yield Sweep(backend, report, findings, roles, listener.accepted)
    finally:
        if grading is not None:
            grading.cancel()
            with contextlib.suppress(BaseException):
                await grading
        for kernel in kernels:
            await kernel.close()
        remove_leftover_containers(kernels)
        listener.close()


async def test_the_sweep_ran(swept: Sweep) -> None:
    """The sweep saw its own process under the fingerprint the host gives it, and walked files:
    otherwise an empty report would prove nothing."""
    me = swept.report["self"]
    assert swept.roles.of(me["fingerprint"], host_fingerprints(), me.get("cgroup"), me.get("pid")) == "own", me
    assert swept.report["files"]["entries"] > 0, swept.report["files"]
    assert "harness" not in swept.findings, swept.findings["harness"]


async def test_no_access_to_another_episode(swept: Sweep) -> None:
    """Neither the canary (its processes, secret, connection file, sockets, files) nor any other
    sandbox-env episode on the machine."""
    reached = {r: swept.findings.get(r) for r in ("canary", "other-sandbox") if swept.findings.get(r)}
    assert not reached, "the episode reached other episodes:\n" + describe(swept.findings, ("canary", "other-sandbox"))


async def test_no_access_to_the_grader(swept: Sweep) -> None:
    """Not the grader process of a grading in progress, nor its hidden tests."""
    assert not swept.findings.get("grader"), "the episode reached a grading:\n" + describe(swept.findings, ("grader",))


async def test_no_access_to_the_server(swept: Sweep) -> None:
    """Not the server's process (fds, environ, mem, signals), not its port (directly or by
    setns() into its network namespace), not the container runtime's socket."""
    assert swept.listener_accepted == 0 and not swept.findings.get("server"), (
        f"the episode reached the server ({swept.listener_accepted} connections to its port):\n"
        + describe(swept.findings, ("server",)))


async def test_no_access_to_the_host(swept: Sweep) -> None:
    """No other host process, and no file, directory or socket of the host's shared directories
    that it could write or connect to."""
    roles = ("host", "gone")
    assert not any(swept.findings.get(r) for r in roles), "the episode reached the host:\n" + describe(swept.findings, roles)
