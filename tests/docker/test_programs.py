"""`DockerKernel.run_program`: each program is a fork of the container's zygote, and must behave as
a fresh `python3 -I -c` that nothing of the episode reaches, whatever the episode did to the zygote."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from docker_helpers import MEMORY_PROBE, reversed_needles

pytestmark = pytest.mark.docker

REPORT = """
import json, os, sys
def processes():
    # Every thread is looked at: a process whose main thread exited shows "Z" but may run on.
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stats = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stats.append(f.read())
        except OSError:
            continue
        if any(stat.rsplit(")", 1)[1].split()[0] not in "ZX" for stat in stats):
            found.append(stats[0][stats[0].index("(") + 1:stats[0].rindex(")")])
    return sorted(found)
try:
    import pytest
    site_packages = True
except ImportError:
    site_packages = False
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "env": sorted(os.environ), "isolated": sys.flags.isolated,
    "site_packages": site_packages, "exit_builtin": callable(exit), "fds": sorted(os.listdir("/proc/self/fd")),
    "own_session": os.getsid(0) == os.getpid(), "stdin": sys.stdin.read(), "main": __name__,
    "processes": processes(), "workspace": os.listdir("/workspace"), "tmp": os.listdir("/tmp"),
    "asserts": __debug__,
}))
"""


async def test_a_program_runs_as_a_fresh_python3_isolated_would(kernel: Any) -> None:
    result = await kernel.run_program(REPORT, stdin=b"fed on stdin", timeout_s=10)
    assert result.status == "ok" and result.exit_code == 0, result
    seen = json.loads(result.stdout)
    assert seen["argv"] == ["-c"] and seen["main"] == "__main__" and seen["cwd"] == "/workspace"
    assert seen["env"] == ["HOME", "LANG", "PATH", "TMPDIR"]
    assert seen["isolated"] == 1 and seen["asserts"] is True
    assert seen["site_packages"] and seen["exit_builtin"]  # what `-S` would have taken away
    assert seen["fds"] == ["0", "1", "2", "3"]  # 3: listdir's own handle on /proc/self/fd
    assert seen["own_session"] and seen["stdin"] == "fed on stdin"
    # the supervisor (PID 1), the zygote and the program itself: nothing else
    assert seen["processes"] == ["python3"] * 3, seen["processes"]


@pytest.mark.parametrize(("source", "status", "exit_code", "stderr"), [
    ("raise SystemExit(3)", "error", 3, ""),
    ("import sys; sys.exit('bye')", "error", 1, "bye"),
    ("exit()", "ok", 0, ""),
    ("raise ValueError('broken')", "error", 1, "ValueError: broken"),
    ("import os; os.kill(os.getpid(), 9)", "killed", 137, ""),
    ("import atexit; atexit.register(print, 'at exit')", "ok", 0, ""),
])
async def test_exit_status_and_errors_as_python3_reports_them(kernel: Any, source: str, status: str,
                                                             exit_code: int, stderr: str) -> None:
    result = await kernel.run_program(source, timeout_s=10)
    assert (result.status.value, result.exit_code) == (status, exit_code), result
    assert stderr in result.stderr
    if "atexit" in source:
        assert result.stdout == "at exit\n"


async def test_nothing_of_the_episode_reaches_a_program(kernel: Any) -> None:
    secret = f"EPISODE-SECRET-{uuid.uuid4().hex}"
    step = await kernel.execute(
        f"import subprocess\nsecret = {secret!r}\nprint(secret)\n"
        "open('/workspace/left.txt', 'w').write(secret)\nopen('/tmp/left.txt', 'w').write(secret)\n"
        "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n")
    assert step.status == "ok", step
    probe = MEMORY_PROBE + (f"print(memory_counts({reversed_needles(secret=secret, none=f'ABSENT-{uuid.uuid4().hex}')!r}))\n")
    result = await kernel.run_program(REPORT + probe, timeout_s=20)
    assert result.status == "ok", result
    report, counts = result.stdout.splitlines()
    seen = json.loads(report)
    assert seen["workspace"] == [] and seen["tmp"] == []
    assert "sleep" not in seen["processes"] and len(seen["processes"]) == 3, seen["processes"]
    counts = eval(counts)  # a dict of ints printed by our own probe
    assert counts["secret"] == counts["none"], counts  # the zygote was forked before any step


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
async def test_programs_run_after_episode_code_kills_or_stops_the_zygote(kernel: Any, signal_name: str) -> None:
    # The worker's parent is the supervisor; every other python3 but itself is the zygote.
    hit = await kernel.execute(
        "import os, signal\nhit = []\n"
        "for pid in map(int, filter(str.isdigit, os.listdir('/proc'))):\n"
        "    if pid not in (1, os.getpid(), os.getppid()):\n"
        f"        os.kill(pid, signal.{signal_name}); hit.append(pid)\n"
        "print(len(hit))\n")
    assert hit.status == "ok" and hit.stdout == "1\n", hit
    for _ in range(2):
        result = await kernel.run_program("print(6 * 7)", timeout_s=10)
        assert result.status == "ok" and result.stdout == "42\n", result
    after = await kernel.execute("print(1)")  # the episode goes on, with a fresh interpreter
    assert after.status == "ok" and after.stdout == "1\n", after


async def test_a_program_that_kills_its_zygote_gets_a_clear_status(kernel: Any) -> None:
    result = await kernel.run_program("import os\nprint('before')\nos.kill(os.getppid(), 9)\n", timeout_s=10)
    assert result.stdout == "before\n"
    assert result.status.value == "killed" and "exit status was lost" in result.stderr, result
    again = await kernel.run_program(REPORT, timeout_s=10)
    assert again.status == "ok" and len(json.loads(again.stdout)["processes"]) == 3, again


@pytest.mark.parametrize(("source", "status"), [
    ("while True: pass", "timeout"),
    ("import os\nos.close(1); os.close(2)\nwhile True: pass", "timeout"),
    ("import sys\nwhile True: sys.stdout.write('x' * 65536)", "output_limit"),
])
async def test_a_program_past_its_limits_is_stopped_and_the_next_one_runs(kernel: Any, source: str,
                                                                         status: str) -> None:
    result = await kernel.run_program(source, timeout_s=1)
    assert result.status.value == status, result
    again = await kernel.run_program(REPORT, timeout_s=10)
    assert again.status == "ok" and len(json.loads(again.stdout)["processes"]) == 3, again


async def test_a_process_whose_main_thread_exited_does_not_outlive_the_episode(kernel: Any) -> None:
    # Its own /proc stat says "Z" (zombie) while its second thread runs on.
    step = await kernel.execute(
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import ctypes, threading, time\\n"
        "threading.Thread(target=time.sleep, args=(1000,)).start()\\n"
        "ctypes.CDLL(None).pthread_exit(None)'], start_new_session=True)\n"
        "time.sleep(1)\n"
        "status = dict(line.split(':', 1) for line in open(f'/proc/{p.pid}/status'))\n"
        "print(status['State'].split()[0], status['Threads'].strip())\n")
    assert step.status == "ok" and step.stdout == "Z 2\n", step  # the escape is in place
    result = await kernel.run_program(REPORT, timeout_s=10)
    assert result.status == "ok", result
    assert len(json.loads(result.stdout)["processes"]) == 3, result.stdout


LIMITS = ("import os, resource\n"
          "print(resource.getrlimit(resource.RLIMIT_NOFILE), os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0))\n")
UNTOUCHED = "({n}, {n}) 0 0\n"  # the policy's open files, nice 0, SCHED_OTHER


@pytest.mark.parametrize("tamper", [
    "resource.prlimit(pid, resource.RLIMIT_NOFILE, (16, 16))",  # a hard limit cannot be raised again
    "os.setpriority(os.PRIO_PROCESS, pid, 10)",  # nor a nice value lowered
    "os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))",  # nor SCHED_IDLE left
])
async def test_limits_episode_code_set_on_the_zygote_do_not_reach_programs(kernel: Any, tamper: str) -> None:
    expected = UNTOUCHED.format(n=kernel.policy.open_files)
    assert (await kernel.run_program(LIMITS, timeout_s=10)).stdout == expected
    step = await kernel.execute(
        "import os, resource\nhit = 0\n"
        "for pid in map(int, filter(str.isdigit, os.listdir('/proc'))):\n"
        "    if pid not in (1, os.getpid(), os.getppid()):\n"
        f"        {tamper}\n"
        "        hit += 1\n"
        "print(hit)\n")
    assert step.status == "ok" and step.stdout == "1\n", step  # the zygote, changed
    assert (await kernel.run_program(LIMITS, timeout_s=10)).stdout == expected


async def test_a_program_that_changes_the_runners_priority_leaves_no_trace_in_the_next(kernel: Any) -> None:
    # A program's parent is the zygote, whose parent is the supervisor that owns the container.
    result = await kernel.run_program(
        "import os\nwith open(f'/proc/{os.getppid()}/stat') as f:\n"
        "    supervisor = int(f.read().rsplit(')', 1)[1].split()[1])\n"
        "os.setpriority(os.PRIO_PROCESS, supervisor, 10)\nprint(os.getpriority(os.PRIO_PROCESS, supervisor))\n",
        timeout_s=10)
    assert result.status == "ok" and result.stdout == "10\n", result
    container = kernel.container_id
    after = await kernel.run_program(LIMITS, timeout_s=10)
    assert after.stdout == UNTOUCHED.format(n=kernel.policy.open_files), after
    assert kernel.container_id != container  # a nice value cannot be lowered from inside: replaced


async def test_system_v_ipc_and_message_queues_do_not_reach_the_next_program(kernel: Any) -> None:
    made = await kernel.run_program(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.shmget(0x5EC, 4096, 0o1600) >= 0, libc.msgget(0x5ED, 0o1600) >= 0)\n"
        "fd = libc.mq_open(b'/left', os.O_CREAT | os.O_RDWR, 0o600, None)\nprint(fd >= 0)\n", timeout_s=10)
    assert made.stdout == "True True\nTrue\n", made  # 0o1000 = IPC_CREAT
    seen = await kernel.run_program(
        "import os\nfor kind in ('shm', 'msg', 'sem'):\n"
        "    print(kind, len(open(f'/proc/sysvipc/{kind}').read().splitlines()) - 1)\n"
        "print(os.listdir('/dev/mqueue'))\n", timeout_s=10)
    assert seen.stdout == "shm 0\nmsg 0\nsem 0\n[]\n", seen
