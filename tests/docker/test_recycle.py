"""Recycling (issue #13): a sandbox goes back to the pool for the next episode only when its
episode left nothing but its worker's namespace; every kind of leftover, any anomaly and a spent
reuse budget remove the container instead. Real containers, a real `KernelPool`; episodes are
played on the kernels the pool hands out, and handed back with `release` as the server does."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from docker_helpers import MEMORY_PROBE, reversed_needles, sandbox_policy

from sandbox_env.errors import KernelDiedError
from sandbox_env.kernels.pool import KernelPool
from sandbox_env.models import ExecStatus

pytestmark = pytest.mark.docker

OWNER = "pytest-recycle"
REPORTS = "sandbox_env.kernels.docker.recycling"  # where a refused report's findings are logged
PoolFactory = Callable[..., Awaitable[KernelPool]]

# Source that finds the zygote from a step: the supervisor's other child.
ZYGOTE = ("import os\nzygote = [p for p in map(int, filter(str.isdigit, os.listdir('/proc'))) if p not in (1, os.getpid())"
          " and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == '1'][0]\n")
# ... then waits until the signal has taken effect (the episode ends with the zygote in that state).
SETTLES = ("import time\nfor _ in range(1000):\n"
           "    if open(f'/proc/{{zygote}}/stat').read().rsplit(')', 1)[1].split()[0] == '{state}':\n"
           "        print('planted')\n        break\n    time.sleep(0.01)\n")
# ... or does it only once the recycle has begun: when the worker answers the supervisor's question
# about its environment (the episode's code may rewrite the worker's own reply path).
DURING = ("import os, resource, sys\nworker = sys.modules['sandbox_env.inside.worker']\nreply = worker.write_frame\n"
          "def tamper(fd, message):\n    if 'environ' in message:\n        {tamper}\n    reply(fd, message)\n"
          "worker.write_frame = tamper\nprint('planted')")
LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
# (what an episode does, the finding the supervisor must report). Each prints "planted" once done.
LEFTOVERS = {
    "daemon": ("import subprocess\nsubprocess.Popen(['sleep', '86124'], start_new_session=True, stdin=subprocess.DEVNULL, "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nprint('planted')", "process"),
    "file in /workspace": ("open('/workspace/left.txt', 'w').write('x')\nprint('planted')", "file:/workspace"),
    "file deep in /workspace": ("import os\nos.makedirs('/workspace/a/b/c')\nopen('/workspace/a/b/c/.x', 'w').write('x')\n"
                                "print('planted')", "file:/workspace"),
    "file in /tmp": ("open('/tmp/left.txt', 'w').write('x')\nprint('planted')", "file:/tmp"),
    "file in /dev/shm": ("open('/dev/shm/left', 'w').write('x')\nprint('planted')", "file:/dev/shm"),
    "POSIX shared memory": (LIBC + "fd = libc.shm_open(b'/left', os.O_CREAT | os.O_RDWR, 0o600)\n"
                            "print('planted' if fd >= 0 else ctypes.get_errno())", "file:/dev/shm"),
    "POSIX semaphore": (LIBC + "libc.sem_open.restype = ctypes.c_void_p\n"
                        "sem = libc.sem_open(b'/left', os.O_CREAT, 0o600, 1)\nprint('planted' if sem else ctypes.get_errno())",
                        "file:/dev/shm"),
    "POSIX message queue": (LIBC + "fd = libc.mq_open(b'/left', os.O_CREAT | os.O_RDWR, 0o600, None)\n"
                            "print('planted' if fd >= 0 else ctypes.get_errno())", "file:/dev/mqueue"),
    "System V shared memory": (LIBC + "print('planted' if libc.shmget(0, 4096, 0o1600) >= 0 else ctypes.get_errno())",
                               "ipc:shm"),  # 0 = IPC_PRIVATE, 0o1000 = IPC_CREAT
    "System V semaphore": (LIBC + "print('planted' if libc.semget(0, 1, 0o1600) >= 0 else ctypes.get_errno())", "ipc:sem"),
    "System V message queue": (LIBC + "print('planted' if libc.msgget(0, 0o1600) >= 0 else ctypes.get_errno())", "ipc:msg"),
    "zygote's rlimit": (ZYGOTE + "import resource\nresource.prlimit(zygote, resource.RLIMIT_NOFILE, (16, 16))\n"
                        "print('planted')", "zygote"),
    "zygote's nice value": (ZYGOTE + "os.setpriority(os.PRIO_PROCESS, zygote, 10)\nprint('planted')", "zygote"),
    "zygote stopped": (ZYGOTE + "import signal\nos.kill(zygote, signal.SIGSTOP)\n" + SETTLES.format(state="T"), "zygote"),
    "zygote killed": (ZYGOTE + "import signal\nos.kill(zygote, signal.SIGKILL)\n" + SETTLES.format(state="Z"), "zygote"),
    "zygote's rlimit, lowered during the recycle": (ZYGOTE + DURING.format(tamper="resource.prlimit(zygote, resource."
                                                                          "RLIMIT_NOFILE, (64, 64))"), "zygote"),
    "daemon started during the recycle": (DURING.format(tamper="os.fork() or os.setsid() or __import__('time').sleep(60)"),
                                          "process"),
    "file written during the recycle": (DURING.format(tamper="open('/tmp/late', 'w').close()"), "file:/tmp"),
    "supervisor's nice value": ("import os\nos.setpriority(os.PRIO_PROCESS, 1, 10)\nprint('planted')", "limits"),
    "supervisor's nice value, raised during the recycle": (DURING.format(tamper="os.setpriority(os.PRIO_PROCESS, 1, 10)"),
                                                           "limits"),
    "environment variable": ("import os\nos.environ['PYTHONSTARTUP'] = '/tmp/x.py'\nprint('planted')", "environment"),
    "scratch folder's mode": ("import os\nos.chmod('/workspace', 0o1777)\nprint('planted')", "folder:/workspace"),
    # TIME_WAIT outlives every process by a minute: ports taken, and data in the ports and counters
    "loopback socket in TIME_WAIT": ("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
                                     "c = socket.create_connection(s.getsockname())\na, _ = s.accept()\na.close()\n"
                                     "c.close()\ns.close()\nprint('planted')", "network"),
    # sockets sent into their own queue: garbage nothing holds, alive after every process, names listed
    "unix sockets in flight": ("import array, socket\nnamed = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                               "named.bind(b'\\0left-by-the-last-episode')\n"
                               "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                               "a.sendmsg([b'!'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, "
                               "array.array('i', [a.fileno(), b.fileno(), named.fileno()]))])\n"
                               "for each in (a, b, named):\n    each.detach()\nprint('planted')", "network"),
    # the EEVDF time slice (sched_runtime): not a nice value or policy, but inherited all the same
    "zygote's time slice": (ZYGOTE + LIBC + "import struct\nattr = struct.pack('IIQiIQQQ', 48, 0, 0, 0, 0, 100_000_000, 0, 0)\n"
                            "print('planted' if libc.syscall(314, zygote, ctypes.c_char_p(attr), 0) == 0 else ctypes.get_errno())",
                            "zygote"),
    "scratch folder's extended attribute": ("import os\nos.setxattr('/workspace', 'user.note', b'hi')\nprint('planted')",
                                            "folder:/workspace"),
}
# A module on disk: the image's cannot be written; one the next worker would import first (its
# working directory leads sys.path) is a file in the workspace.
MODULE = ("import json, os\ntry:\n    open(json.__file__, 'a')\n    print('stdlib writable')\nexcept OSError:\n    pass\n"
          "open('/workspace/json.py', 'w').write('HIJACKED = True\\n')\nprint('planted')")
# Every directory and regular file a step can write to, outside /proc and /sys.
WRITABLE = """
import json, os
found = []
for top, dirs, files in os.walk('/'):
    if top in ('/proc', '/sys'):
        dirs[:] = []
        continue
    if os.access(top, os.W_OK):
        found.append(top)
    found += [os.path.join(top, f) for f in files if os.path.isfile(os.path.join(top, f))
              and not os.path.islink(os.path.join(top, f)) and os.access(os.path.join(top, f), os.W_OK)]
print(json.dumps(found))
"""
FRESH = """
import json, os, sys
def alive(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] not in 'ZX'
    except OSError:
        return False
print(json.dumps({"secret": 'secret' in globals(), "decimal": 'decimal' in sys.modules, "pid": os.getpid(),
                  "processes": sorted(p for p in map(int, filter(str.isdigit, os.listdir('/proc'))) if alive(p)),
                  "workspace": os.listdir('/workspace'), "tmp": os.listdir('/tmp'), "environ": dict(os.environ),
                  "cwd": os.getcwd()}))
"""


@pytest_asyncio.fixture
async def pools(docker_client: Any) -> AsyncIterator[PoolFactory]:
    """Pools of DockerKernels (a small policy with `reuses` as asked); all closed after the test,
    leaving no container behind."""
    from sandbox_env.kernels.docker.config import DockerConfig
    from sandbox_env.kernels.docker.kernel import DockerKernel

    made: list[KernelPool] = []
    kernels: list[DockerKernel] = []  # handed-out ones belong to their episode: closed here

    def kernel(policy: Any) -> DockerKernel:
        kernels.append(DockerKernel(policy, DockerConfig(owner=OWNER)))
        return kernels[-1]

    async def factory(reuses: int = 4, size: int = 1, **overrides: Any) -> KernelPool:
        policy = sandbox_policy(reuses=reuses, **overrides)
        pool = KernelPool(lambda: kernel(policy), size)
        made.append(pool)
        await pool.start(wait=True)
        return pool

    yield factory
    for pool in made:
        await pool.close()
    for each in kernels:
        await each.close()
    assert docker_client.containers.list(all=True, filters={"label": f"sandbox-env.owner={OWNER}"}) == []


async def settled(pool: KernelPool) -> None:
    """Until every kernel handed back is kept or closed (recycling is in the background)."""
    deadline = time.monotonic() + 60
    while pool.returning:
        assert time.monotonic() < deadline, "a recycle never ended"
        await asyncio.sleep(0.01)


async def play(pool: KernelPool, code: str, stdout: str = "") -> tuple[Any, str]:
    """One episode: a kernel from the pool, one step (it must run ok and print `stdout`), handed
    back. (The kernel, its container at the time of the step.)"""
    kernel = await pool.acquire()
    container = kernel.container_id
    step = await kernel.execute(code)
    assert step.status is ExecStatus.OK and step.stdout == stdout, step
    pool.release(kernel)
    await settled(pool)
    return kernel, container


def gone(docker_client: Any, container: str) -> bool:
    return docker_client.api.containers(all=True, filters={"id": container}) == []


async def test_a_clean_episode_leaves_the_same_container_with_a_fresh_namespace(pools: PoolFactory) -> None:
    pool = await pools()
    kernel, container = await play(pool, "import decimal\nsecret = 42")
    assert pool.refusals == {} and pool.ready_count == 1, pool.refusals
    again = await pool.acquire()
    assert again is kernel and again.container_id == container and again.reuses == 1
    seen = json.loads((await again.execute(FRESH)).stdout)
    assert not seen["secret"] and not seen["decimal"], seen  # a new namespace, a new interpreter
    assert seen["workspace"] == [] and seen["tmp"] == [] and seen["cwd"] == "/workspace", seen
    assert len(seen["processes"]) == 3, seen  # the supervisor, the zygote, this worker: nothing else
    assert set(seen["environ"]) == {"PATH", "HOME", "LANG", "TMPDIR", "HOSTNAME"}, seen["environ"]
    assert again.execution_count == 1
    assert dict(pool.handed_out) == {"fresh": 1, "recycled": 1}


async def test_the_last_episodes_worker_is_gone(pools: PoolFactory) -> None:
    pool = await pools()
    kernel = await pool.acquire()
    old = json.loads((await kernel.execute(FRESH)).stdout)
    pool.release(kernel)
    await settled(pool)
    again = await pool.acquire()
    new = json.loads((await again.execute(FRESH)).stdout)
    assert again is kernel and new["pid"] != old["pid"] and old["pid"] not in new["processes"], (old, new)


async def test_nothing_of_the_last_episode_is_in_the_next_workers_memory(pools: PoolFactory) -> None:
    """The supervisor's memory held the last episode's output and a program's input (a grading's
    hidden tests): the next worker is a fork of the zygote, which never held either."""
    pool = await pools()
    kernel = await pool.acquire()
    printed, hidden = f"EPISODE-SECRET-{uuid.uuid4().hex}", f"HIDDEN-TEST-{uuid.uuid4().hex}"
    assert (await kernel.execute(f"secret = {printed!r}\nprint(secret)")).stdout == f"{printed}\n"
    program = await kernel.run_program("import sys\nprint(len(sys.stdin.read()))", stdin=hidden.encode(), timeout_s=10)
    assert program.stdout == f"{len(hidden)}\n", program
    pool.release(kernel)
    await settled(pool)
    again = await pool.acquire()
    assert again is kernel, pool.refusals  # else this proves nothing about a recycled sandbox
    needles = reversed_needles(printed=printed, hidden=hidden, none=f"ABSENT-{uuid.uuid4().hex}",
                               present="sandbox_env.inside.zygote")
    result = await again.execute(MEMORY_PROBE + f"print(memory_counts({needles!r}))\n")
    counts = json.loads(result.stdout.replace("'", '"'))
    assert counts["present"] > counts["none"], counts  # a control: the scan finds what is there
    assert counts["printed"] == counts["hidden"] == counts["none"], counts


async def test_the_next_episode_gets_the_whole_cpu_budget(pools: PoolFactory) -> None:
    """`cpu_time_s` is an episode's budget: a recycled sandbox starts it again."""
    pool = await pools(cpu_time_s=2)
    burn = "import time\nwhile time.process_time() < 1.5:\n    pass\nprint('done')"
    kernel, _ = await play(pool, burn, "done\n")
    again = await pool.acquire()
    assert again is kernel, pool.refusals
    step = await again.execute(burn)  # with the last episode's remainder (0.5 s), killed at 1 s
    assert step.status is ExecStatus.OK and step.stdout == "done\n", step


@pytest.mark.parametrize("leftover", LEFTOVERS)
async def test_a_leftover_refuses_the_sandbox(pools: PoolFactory, docker_client: Any, caplog: pytest.LogCaptureFixture,
                                              leftover: str) -> None:
    code, finding = LEFTOVERS[leftover]
    pool = await pools()
    with caplog.at_level(logging.INFO, logger=REPORTS):
        kernel, container = await play(pool, code, "planted\n")
    assert pool.refusals == {"leftovers": 1}, (pool.refusals, caplog.text)
    assert f"'{finding}'" in caplog.text, caplog.text  # the check that caught it
    assert gone(docker_client, container) and not kernel.is_alive()
    assert (await pool.acquire()).container_id != container


# A program (the zygote's child, as a grader is) gives the zygote children of its own with
# clone(CLONE_PARENT): exited, they stay zombies unless the zygote reaps them, each holding a pid.
SIBLINGS = (LIBC + "import time\nfor _ in range(20):\n    if libc.syscall(56, 0x8000 | 17, 0, 0, 0, 0) == 0:\n"
            "        os._exit(0)\ntime.sleep(0.3)\nprint('planted')")  # 56: clone; CLONE_PARENT | SIGCHLD
ZOMBIES = ("import os\nprint(sum(open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z'\n"
           "          for p in filter(str.isdigit, os.listdir('/proc'))))")


async def test_a_programs_zombie_siblings_never_reach_the_next_episode(pools: PoolFactory) -> None:
    pool = await pools()
    kernel = await pool.acquire()
    program = await kernel.run_program(SIBLINGS, timeout_s=10)
    assert program.stdout == "planted\n", program
    pool.release(kernel)
    await settled(pool)
    again = await pool.acquire()  # recycled (the zygote reaped them) or another container
    assert (await again.execute(ZOMBIES)).stdout == "0\n"
    forks = await again.execute("import os, time\npids = []\nfor _ in range(20):\n    pid = os.fork()\n"
                                "    if pid == 0:\n        time.sleep(1)\n        os._exit(0)\n    pids.append(pid)\n"
                                "for pid in pids:\n    os.waitpid(pid, 0)\nprint('forked')")
    assert forks.stdout == "forked\n", forks  # 20 at once: the pids limit (32) is the episode's whole


async def test_the_scratch_folders_times_start_again(pools: PoolFactory) -> None:
    pool = await pools()
    kernel, _ = await play(pool, "import os\nos.utime('/workspace', ns=(0xdeadbeef12345, 0xdeadbeef12345))")
    again = await pool.acquire()
    assert again is kernel, pool.refusals  # else this proves nothing about a recycled sandbox
    seen = await again.execute("import os\nprint(os.stat('/workspace').st_mtime_ns)")
    assert seen.stdout == "0\n", seen


async def test_a_module_written_for_the_next_episode_refuses_the_sandbox(pools: PoolFactory, docker_client: Any,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    pool = await pools()
    kernel = await pool.acquire()
    container = kernel.container_id
    step = await kernel.execute(MODULE)
    assert step.stdout == "planted\n", step  # the image's modules are read-only
    with caplog.at_level(logging.INFO, logger=REPORTS):
        pool.release(kernel)
        await settled(pool)
    assert pool.refusals == {"leftovers": 1} and "'file:/workspace'" in caplog.text, caplog.text
    assert gone(docker_client, container)
    fresh = await pool.acquire()
    assert (await fresh.execute("import json\nprint(hasattr(json, 'HIJACKED'))")).stdout == "False\n"


async def test_the_scratch_folders_are_every_place_a_step_can_write(kernel: Any) -> None:
    """The check looks for files in /workspace, /tmp, /dev/shm and /dev/mqueue only: no other
    directory or regular file may be writable, or a file there would outlive a recycle unseen."""
    from sandbox_env.inside.slate import SCRATCH_DIRS

    found = json.loads((await kernel.execute(WRITABLE)).stdout)
    assert set(SCRATCH_DIRS) <= set(found), found  # a control: the walk sees what is writable
    outside = [path for path in found if not any(path == top or path.startswith(top + "/") for top in SCRATCH_DIRS)]
    assert outside == []


async def test_an_out_of_memory_kill_refuses_the_sandbox(pools: PoolFactory, docker_client: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    pool = await pools(memory_mb=128)
    kernel = await pool.acquire()
    container = kernel.container_id
    step = await kernel.execute("hog = bytearray(1 << 30)")
    assert step.status is ExecStatus.OOM, step
    with caplog.at_level(logging.INFO, logger=REPORTS):
        pool.release(kernel)
        await settled(pool)
    assert pool.refusals == {"leftovers": 1} and "'oom'" in caplog.text, caplog.text
    assert gone(docker_client, container)


async def test_an_exhausted_reuse_budget_removes_the_container(pools: PoolFactory, docker_client: Any) -> None:
    pool = await pools(reuses=1)
    kernel, container = await play(pool, "x = 1")
    again, same = await play(pool, "x = 2")
    assert again is kernel and same == container and pool.refusals == {"budget": 1}
    assert gone(docker_client, container)
    assert (await pool.acquire()).container_id != container


async def test_a_budget_of_zero_never_reuses(pools: PoolFactory, docker_client: Any) -> None:
    pool = await pools(reuses=0)
    _, container = await play(pool, "x = 1")
    assert pool.refusals == {"budget": 1} and gone(docker_client, container)
    assert (await pool.acquire()).container_id != container


async def test_an_anomaly_during_the_episode_is_never_recycled(pools: PoolFactory, docker_client: Any) -> None:
    """A reply that fails authentication (fault injected on the server's side, as in
    test_channel.py): the container is replaced at once, and the replacement, which served the
    rest of that episode, is not recycled either."""
    import os

    pool = await pools()
    kernel = await pool.acquire()
    first = kernel.container_id
    kernel._channel._key = os.urandom(len(kernel._channel._key))
    with pytest.raises(KernelDiedError):
        await kernel.execute("print(1)")
    assert (await kernel.execute("print(2)")).stdout == "2\n"
    replacement = kernel.container_id
    pool.release(kernel)
    await settled(pool)
    assert pool.refusals == {"tainted": 1}
    assert replacement != first and gone(docker_client, first) and gone(docker_client, replacement)


async def faulted(pools: PoolFactory, fault: Callable[[Any], Awaitable[object]]) -> tuple[KernelPool, str]:
    """An episode (one step) whose sandbox suffers `fault` before it is handed back: (its pool,
    its container)."""
    pool = await pools()
    kernel = await pool.acquire()
    container = kernel.container_id
    assert (await kernel.execute("x = 1")).status is ExecStatus.OK
    await fault(kernel)
    pool.release(kernel)
    await settled(pool)
    return pool, container


async def test_an_anomaly_during_the_recycle_removes_the_container(pools: PoolFactory, docker_client: Any) -> None:
    import os

    async def wrong_key(kernel: Any) -> None:  # the report will not verify
        kernel._channel._key = os.urandom(len(kernel._channel._key))
    pool, container = await faulted(pools, wrong_key)
    assert pool.refusals == {"failed": 1} and gone(docker_client, container)


async def test_a_container_killed_from_outside_is_never_recycled(pools: PoolFactory, docker_client: Any) -> None:
    async def killed(kernel: Any) -> None:
        await asyncio.to_thread(docker_client.api.kill, kernel.container_id)
        deadline = time.monotonic() + 30
        while kernel.is_alive():  # the channel sees EOF once the daemon has killed it
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    pool, container = await faulted(pools, killed)
    assert pool.refusals == {"tainted": 1} and gone(docker_client, container)


async def test_a_step_still_running_is_never_recycled(pools: PoolFactory, docker_client: Any) -> None:
    steps: list[asyncio.Task[Any]] = []

    async def running(kernel: Any) -> None:
        steps.append(asyncio.create_task(kernel.execute("import time\ntime.sleep(30)")))
        while not kernel._lock.locked():
            await asyncio.sleep(0.01)
    pool, container = await faulted(pools, running)
    assert pool.refusals == {"busy": 1} and gone(docker_client, container)
    assert (await steps[0]).status is ExecStatus.KILLED


async def test_a_recycled_sandbox_goes_only_to_its_last_owner(pools: PoolFactory) -> None:
    pool = await pools()
    kernel = await pool.acquire("alice")
    pool.release(kernel, "alice")
    await settled(pool)
    assert pool.ready_count == 1
    other = await pool.acquire("bob")
    assert other is not kernel and kernel.is_alive()
    assert await pool.acquire("alice") is kernel
