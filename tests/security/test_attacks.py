"""The attacks reported in issue #8 (its Jupyter section), one test each, run from inside real
episodes on every backend where the attack applies. Each one fails on an unisolated jupyter
kernel (586ddda) and must pass once the kernel is isolated; Docker must pass already.

The "server" of these kernel-level tests is this test process, which hosts the kernels as the
server would (their parent); `test_server_e2e.py` repeats the central ones against a real server.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from security_helpers import (
    INFECTION,
    MACHINERY,
    RUNTIME_SOCKETS,
    SQUARE_TASK,
    Roles,
    connection_file,
    connection_files_below,
    environ_sha256,
    fingerprint,
    host_fingerprints,
    kernel_ident,
    kill_own_leftovers,
    loopback_listener,
    new_kernel,
    parse,
    protected_paths,
    remove_markers,
    run_probe,
    step_json,
    submission_calling,
    token,
    wait_gone,
)

from sandbox_env.grading.driver import grade
from sandbox_env.kernels.pool import KernelPool

pytestmark = pytest.mark.slow


async def test_another_episodes_connection_file(make_kernel, jupyter_only) -> None:
    """Episode B reads episode A's kernel connection file (HMAC key, socket paths) and runs code
    in A's kernel: reads A's secret and overwrites A's variables."""
    victim = await make_kernel()
    secret, infection = token("canary"), token("infect")
    assert (await victim.execute(f"CANARY = {secret!r}")).status.value == "ok"
    path, _ = connection_file(victim)  # type: ignore[misc]
    attacker = await make_kernel()
    report = await run_probe(attacker, "hijack", {"paths": [path], "payload": INFECTION.format(token=infection),
                                                   "expression": "CANARY", "timeout_s": 5})
    seen = await step_json(victim, "import builtins\n_out = [getattr(builtins, 'sbx_infected', None), "
                                   "globals().get('sbx_infected'), CANARY]")
    result = report[path]
    assert result.get("read") is not True, f"episode B read episode A's connection file: {result}"
    assert secret not in json.dumps(report), f"episode B stole episode A's secret through its kernel: {result}"
    assert seen == [None, None, secret], f"episode B ran code in episode A's kernel: {seen}"


async def test_a_warm_pool_kernel_cannot_be_infected(backend: str) -> None:
    """Episode B attacks the warm kernel the pool keeps for the next client (through its kernel
    channel where it has one, and by planting files in every shared directory it can write);
    the next, unrelated episode gets that kernel and must see nothing of B."""
    pool = KernelPool(lambda: new_kernel(backend), 1)
    infection, marker = token("infect"), token("marker")
    kernels, planted = [], []
    try:
        await pool.start(wait=True)
        attacker = await pool.acquire()
        kernels.append(attacker)
        deadline = time.monotonic() + 60
        while pool.ready_count < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.ready_count == 1, "harness: the pool did not refill"
        targets = connection_files_below(os.getpid())
        assert backend != "jupyter" or len(targets) >= 2, f"harness: the warm kernel's connection file was not found: {targets}"
        hijacked = await run_probe(attacker, "hijack", {"paths": targets, "payload": INFECTION.format(token=infection),
                                                         "timeout_s": 5}) if targets else {}
        plant = await run_probe(attacker, "plant", {"name": marker, "token": infection})
        planted = plant["planted"]
        fresh = await pool.acquire()  # the warm kernel: the next, unrelated client's episode
        kernels.append(fresh)
        seen = await run_probe(fresh, "infected", {"name": marker})
        infected = {k: v for k, v in seen.items() if v}
        assert not infected, (f"a fresh episode saw another episode's infection: {infected}\n"
                              f"kernel channels hijacked: {hijacked}\nmarkers planted: {planted}")
    finally:
        remove_markers(planted, marker)
        for kernel in kernels:
            await kernel.close()
        await pool.close()


async def test_setns_into_the_servers_network_namespace(make_kernel) -> None:
    """setns() into /proc/<server>/ns/net (any other net namespace in view, in fact) and reach the
    server's port on its loopback; the port directly, too."""
    with loopback_listener() as server_port:
        attacker = await make_kernel()
        report = await run_probe(attacker, "server_reach", {"ports": [server_port.port]})
        accepted = server_port.accepted
    entered = [ns for ns in report["netns"] if ns.get("setns") == "ok"]
    direct = {p: r for p, r in report["ports"].items() if r.startswith("connected")}
    assert accepted == 0 and not entered and not direct, (
        f"{accepted} connections reached the server's port; setns() succeeded into {entered}; direct: {direct}")


async def test_container_runtime_socket_unreachable(make_kernel) -> None:
    """/var/run/docker.sock (and containerd's): whoever connects commands every sandbox."""
    attacker = await make_kernel()
    report = await run_probe(attacker, "sockets", {"paths": RUNTIME_SOCKETS})
    assert "connected" not in report.values(), f"the container runtime is reachable: {report}"


async def test_no_process_leaves_its_cgroup(make_kernel) -> None:
    """A process written into a parent cgroup's cgroup.procs leaves the episode's cgroup and
    outlives the episode."""
    attacker = await make_kernel()
    marker = token("escape")
    try:
        report = await run_probe(attacker, "escape_cgroup", {"token": marker})
        await attacker.close()
        left = await asyncio.to_thread(wait_gone, marker, 10.0)
        assert not report["moved"] and not left, (
            f"moved into {report['moved']}; still running after the episode closed: {left}; "
            f"refused: {report['refused']}")
    finally:
        kill_own_leftovers(marker)


async def test_server_environment_unreadable(make_kernel) -> None:
    """/proc/<ppid>/environ: the server's environment (its secrets), or any process's that is the
    server's."""
    attacker = await make_kernel()
    report = await run_probe(attacker, "server_reach", {})
    server = environ_sha256(os.getpid())
    matches = [fp for fp, sha in report["environs"].items() if sha == server]
    assert report.get("ppid_environ_sha256") != server and not matches, (
        f"the episode read the server's environment: parent {report['ppid']} -> "
        f"{report.get('ppid_environ_sha256') == server}, processes {matches}")


async def test_server_cannot_be_signalled(make_kernel) -> None:
    """kill(server, 0) (only signal 0 is ever sent): nothing outside the episode's own sandbox
    may take a signal from it."""
    attacker = await make_kernel()
    report = await run_probe(attacker, "server_reach", {})
    roles = Roles(server={os.getpid()}, idents={"own": [kernel_ident(attacker)]})
    table = host_fingerprints()
    foreign = {fp: roles.of(fp, table, seen["cgroup"]) for fp, seen in report["signal0"].items()}
    foreign = {fp: role for fp, role in foreign.items() if role != "own"}
    assert fingerprint(os.getpid()) not in report["signal0"] and not foreign, (
        f"the episode can signal the server ({fingerprint(os.getpid()) in report['signal0']}) "
        f"and these processes: {foreign}")


async def test_repository_grader_and_policies_not_writable(make_kernel) -> None:
    """The repository's source, the installed grader (sandbox_env/inside), policies/, the
    interpreter and its site-packages: probed without writing (O_APPEND opens closed unwritten,
    O_TMPFILE for directories, which leaves no name)."""
    attacker = await make_kernel()
    report = await run_probe(attacker, "writable", {"paths": protected_paths()})
    writable = [path for path, state in report.items() if state == "writable"]
    assert not writable, f"the episode can write: {writable}"


async def test_the_grader_is_unreachable_from_the_submission(make_kernel) -> None:
    """While the hidden tests call it, the submission tries every process outside its own tree:
    the grader's fds, mem and environ (/proc/<grader>/mem: the grader is non-dumpable), the
    sandbox's supervisor. Reward 1.0 only if nothing opened; otherwise the test's message says what."""
    kernel = await make_kernel()
    result = await grade(kernel, parse(SQUARE_TASK), submission_calling("grader_reach", {"skip": MACHINERY}))
    assert result.status == "graded" and result.reward == 1.0, (
        f"the submission reached the grader: {[t.message for t in result.tests]} ({result.error})")
    control = await grade(kernel, parse(SQUARE_TASK), "def square(x):\n    return x + 1\n")
    assert control.reward == 0.0, control  # the check does reject a wrong answer
