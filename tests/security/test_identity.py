"""Who a jupyter episode runs as (issue #8, item 2): its own unprivileged uid (not root, not the
server's, not another live episode's), no capabilities, no_new_privs, a seccomp filter, private
pid/mount/ipc/network namespaces; and the same for a program it runs (what grading uses).
Read from /proc/self/status inside the kernel. Docker's identity is tests/docker/test_adversarial.py
(`test_hardening_probe`); an unisolated jupyter (explicit opt-in) is skipped.
"""

from __future__ import annotations

import os
import platform
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from security_helpers import SYSCALLS, new_kernel, parse_report, probe_code, require_backend, run_probe

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]
SERVER_NS = {name: os.readlink(f"/proc/self/ns/{name}") for name in ("pid", "mnt", "ipc", "net")}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def seen(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Identity of two concurrent episodes, and of a program the first one runs."""
    require_backend("jupyter", request)
    first, second = new_kernel("jupyter"), new_kernel("jupyter")
    try:
        await first.start()
        await second.start()
        ids = {"first": await run_probe(first, "identity"), "second": await run_probe(second, "identity")}
        ids["syscalls"] = await run_probe(first, "syscalls") if platform.machine() == "x86_64" else {}
        program = await first.run_program(probe_code("identity"), timeout_s=30)
        ids["program"] = parse_report(program.stdout) or {"error": f"{program.status}: {program.stderr[-2000:]}"}
        yield ids
    finally:
        await first.close()
        await second.close()


def as_int(mask: str | None) -> int | None:
    return None if mask is None else int(mask, 16)


@pytest.mark.parametrize("who", ["first", "program"])
async def test_not_root(seen: dict[str, Any], who: str) -> None:
    assert "uid" in seen[who], seen[who]
    assert 0 not in seen[who]["uid"], f"the {who} runs with uid 0: {seen[who]['uid']}"


@pytest.mark.parametrize("who", ["first", "program"])
async def test_not_the_servers_uid(seen: dict[str, Any], who: str) -> None:
    assert "uid" in seen[who], seen[who]
    assert os.getuid() not in seen[who]["uid"], f"the {who} runs as the server's uid {os.getuid()}: {seen[who]['uid']}"


@pytest.mark.parametrize("who", ["first", "program"])
async def test_no_capabilities(seen: dict[str, Any], who: str) -> None:
    effective, permitted = as_int(seen[who].get("CapEff")), as_int(seen[who].get("CapPrm"))
    assert effective == 0 and permitted == 0, f"the {who} holds capabilities: CapEff {seen[who].get('CapEff')}, CapPrm {seen[who].get('CapPrm')}"


@pytest.mark.parametrize("who", ["first", "program"])
async def test_no_new_privs(seen: dict[str, Any], who: str) -> None:
    assert seen[who].get("NoNewPrivs") == "1", f"the {who} can gain privileges: NoNewPrivs {seen[who].get('NoNewPrivs')}"


@pytest.mark.parametrize("who", ["first", "program"])
async def test_seccomp_filter(seen: dict[str, Any], who: str) -> None:
    assert seen[who].get("Seccomp") == "2", f"the {who} has no seccomp filter: Seccomp {seen[who].get('Seccomp')}"


@pytest.mark.parametrize("who", ["first", "program"])
async def test_private_namespaces(seen: dict[str, Any], who: str) -> None:
    shared = {name: ns for name, ns in SERVER_NS.items() if seen[who].get("ns", {}).get(name) == ns}
    assert not shared, f"the {who} shares these namespaces with the server: {shared}"


async def test_concurrent_episodes_have_distinct_uids(seen: dict[str, Any]) -> None:
    first, second = seen["first"].get("uid"), seen["second"].get("uid")
    assert first and second and first[0] != second[0], f"two live episodes share a uid: {first} {second}"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscalls are called by their x86_64 numbers")
@pytest.mark.parametrize("call", SYSCALLS)
async def test_dangerous_syscalls_are_denied(seen: dict[str, Any], call: str) -> None:
    """The issue's list (no setns, unshare, mount, ptrace, bpf, keyctl, ...) and the usual escape
    helpers: each one, called in a child of the kernel, must be denied (EPERM/EACCES/ENOSYS or
    killed by the filter), not reach the kernel's implementation."""
    outcome = seen["syscalls"].get(call, "not tried")
    assert outcome.startswith("denied"), f"{call}: {outcome}"
