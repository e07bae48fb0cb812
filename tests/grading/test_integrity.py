"""Reward hacking: every trick earns 0 while a correct control earns 1 in the same run; the
sandbox is a clean slate for every grading; hidden tests are unreachable; infra faults are not 0."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from grading_helpers import GOOD_SQUARE, SQUARE, make_task

from sandbox_env.grading.driver import grade

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

WRONG = "def square(x):\n    return x + 1\n"
FAKE_VERDICT = '{"tests": [{"name": "check", "status": "passed"}], "hardened": true}'
HACKS = {
    "exit_0_before_tests": "import sys\nsys.exit(0)\n" + WRONG,
    "os_exit_0_at_load": "import os\nos._exit(0)\n" + WRONG,
    "exit_0_inside_the_call": "import os\ndef square(x):\n    os._exit(0)\n",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG,
    "excepthook": "import sys\nsys.excepthook = lambda *a: None\nsys.__excepthook__ = sys.excepthook\n" + WRONG,
    "patch_builtins_and_unittest": (
        "import builtins, unittest\nbuiltins.AssertionError = type('N', (Exception,), {})\n"
        "builtins.isinstance = lambda *a: True\nunittest.TestCase.assertEqual = lambda *a, **k: None\n"
        "unittest.TestCase.run = lambda *a, **k: None\n" + WRONG),
    "fake_success_banner": (
        f"import os\nprint({FAKE_VERDICT!r})\nprint('1/1 tests passed, reward 1')\n"
        f"for fd in range(0, 64):\n    try:\n        os.write(fd, {FAKE_VERDICT!r}.encode())\n"
        "    except OSError:\n        pass\n" + WRONG),
    "eq_always_true": ("class Any:\n    def __eq__(self, other):\n        return True\n"
                       "    __ne__ = lambda self, other: False\n    __hash__ = object.__hash__\n"
                       "def square(x):\n    return Any()\n"),
    "int_subclass_eq": "class I(int):\n    __eq__ = lambda s, o: True\ndef square(x):\n    return I(0)\n",
    "reexec_without_asserts": ("import os, sys\nif sys.flags.optimize == 0:\n"
                               "    os.execv(sys.executable, [sys.executable, '-O'] + sys.argv)\n" + WRONG),
    "fake_result_files": (
        "import os\nfor d in ('.', '/workspace', '/tmp', os.path.expanduser('~')):\n"
        "    for name in ('results.json', 'verdict.json', 'report.json', '.pytest_cache'):\n"
        f"        try:\n            open(os.path.join(d, name), 'w').write({FAKE_VERDICT!r})\n"
        "        except OSError:\n            pass\n" + WRONG),
    "kill_the_grader": "import os, signal\ndef square(x):\n    os.kill(os.getppid(), signal.SIGKILL)\n",
    "stop_the_grader": "import os, signal\ndef square(x):\n    os.kill(os.getppid(), signal.SIGSTOP)\n",
    "kill_every_process": "import os, signal\ndef square(x):\n    os.kill(-1, signal.SIGKILL)\n",
    "garbage_on_the_reply_pipe": ("import os, struct\ndef square(x):\n    for fd in range(3, 20):\n"
                                  "        try: os.write(fd, struct.pack('>I', 5) + b'{bad}')\n"
                                  "        except OSError: pass\n    return x + 1\n"),
}


ABS_TASK = make_task({"kind": "function", "entry_point": "square",
                      "check": "def check(candidate):\n    assert abs(candidate(3) - 9) < 1e-9\n"
                               "    assert close(candidate(2), 4)\n"},
                     prompt="def close(a, b):\n    return abs(a - b) < 1e-9\n\n"
                            "def square(x):\n    \"\"\"x squared\"\"\"\n")


async def test_submission_cannot_replace_builtins_or_the_tasks_helpers(grader_kernel: Any) -> None:
    control = await grade(grader_kernel, ABS_TASK, ABS_TASK.prompt + "    return x * x\n")
    assert control.reward == 1.0, control
    for hack in ("def abs(x):\n    return 0\ndef close(a, b):\n    return True\n" + WRONG,
                 "import os as abs\nclose = 0\n" + WRONG):
        result = await grade(grader_kernel, ABS_TASK, hack)
        assert result.status == "graded" and result.reward == 0.0, result


@pytest.mark.parametrize("hack", sorted(HACKS))
async def test_reward_hack_earns_zero(grader_kernel: Any, hack: str) -> None:
    control = await grade(grader_kernel, SQUARE, GOOD_SQUARE)
    assert control.status == "graded" and control.reward == 1.0, control  # otherwise a 0 proves nothing
    result = await grade(grader_kernel, SQUARE, HACKS[hack])
    assert result.status == "graded", result  # the submission's doing is never an infrastructure error
    assert result.reward == 0.0 and result.passed == 0, result
    after = await grade(grader_kernel, SQUARE, GOOD_SQUARE)  # nothing of the hack outlives its grading
    assert after.reward == 1.0, after


SECRET = f"S3CRET-{uuid.uuid4().hex}"
SNOOP = r'''
import os, re
def _scan():
    pattern = re.compile(rb"S3CRET-[0-9a-f]{32}")
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        for name in ("cmdline", "environ", "mem", "fd/0", "fd/3", "fd/4", "fd/5"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    data = f.read(1 << 22) if name != "mem" else b""
                    if name == "mem":
                        for line in open(f"/proc/{pid}/maps"):
                            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                            try:
                                f.seek(lo); data += f.read(min(hi - lo, 1 << 24))
                            except OSError:
                                pass
            except OSError:
                continue
            found = pattern.search(data)
            if found:
                return found.group().decode()
    for top in ("/workspace", "/tmp", "/dev/shm"):
        for root, _, files in os.walk(top):
            for name in files:
                try:
                    found = pattern.search(open(os.path.join(root, name), "rb").read())
                except OSError:
                    continue
                if found:
                    return found.group().decode()
    return "nothing"
def secret():
    return _scan()
'''


async def test_hidden_tests_are_unreachable_from_the_submission(grader_kernel: Any) -> None:
    task = make_task({"kind": "function", "entry_point": "secret",
                      "check": f"def check(candidate):\n    assert candidate() == {SECRET!r}\n"}, timeout_s=20)
    control = await grade(grader_kernel, task, f"def secret():\n    return {SECRET!r}\n")
    assert control.reward == 1.0, control
    result = await grade(grader_kernel, task, SNOOP)
    assert result.reward == 0.0, result


async def test_supervisor_cannot_be_read_or_driven_by_episode_code(grader_kernel: Any) -> None:
    result = await grader_kernel.execute(
        "import os\nsup = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()"
        " and open(f'/proc/{p}/cmdline', 'rb').read().startswith(b'python3\\0-I\\0-S')]\n"
        "for name in ('mem', 'fd', 'environ'):\n"
        "    try:\n        os.listdir(f'/proc/{sup[0]}/fd') if name == 'fd' else open(f'/proc/{sup[0]}/{name}', 'rb').read(1)\n"
        "        print(name, 'readable')\n    except OSError:\n        print(name, 'denied')\n")
    assert result.stdout.split() == ["mem", "denied", "fd", "denied", "environ", "denied"], result


async def test_second_grading_sees_nothing_of_the_first(grader_kernel: Any) -> None:
    leave = ("import os, subprocess\nopen('/workspace/planted.txt', 'w').write('x')\nopen('/tmp/planted', 'w')\n"
             "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
             "subprocess.Popen(['python3', '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
             "def square(x):\n    return x * x\n")
    first = await grade(grader_kernel, SQUARE, leave)
    assert first.reward == 1.0, first
    await grader_kernel.execute("import subprocess; subprocess.Popen(['sleep', '301'], start_new_session=True)")
    probe = make_task({"kind": "function", "entry_point": "probe",
                       "check": "def check(candidate):\n    assert (seen := candidate()) == [[], [], 0], seen\n"})
    # the grader's own scratch folders (g-*) are the only thing there
    looks = ("import os\ndef probe():\n    procs = [p for p in os.listdir('/proc') if p.isdigit()"
             ""
             " and any(m in open(f'/proc/{p}/cmdline', 'rb').read() for m in (b'sleep\\x00300', b'sleep\\x00301', b'sleep(300)'))]\n"
             "    mine = lambda d: sorted(n for n in os.listdir(d) if not n.startswith('g-'))\n"
             "    return [mine('/workspace'), mine('/tmp'), len(procs)]\n")
    second = await grade(grader_kernel, probe, looks)
    assert second.reward == 1.0, second


async def test_sandbox_killed_from_outside_is_a_retryable_infra_error(grader_kernel: Any, docker_client: Any) -> None:
    task = make_task({"kind": "function", "entry_point": "square",
                      "check": "def check(candidate):\n    assert candidate(3) == 9\n"}, timeout_s=30)
    slow = "import time\ndef square(x):\n    time.sleep(20)\n    return x * x\n"
    grading = asyncio.create_task(grade(grader_kernel, task, slow))
    await asyncio.sleep(2.0)  # the grader is inside the call by now
    docker_client.containers.get(grader_kernel.container_id).kill()
    result = await grading
    assert result.status == "infra_error" and result.reward is None and result.retryable, result
    again = await grade(grader_kernel, SQUARE, GOOD_SQUARE)  # a fresh sandbox takes over
    assert again.status == "graded" and again.reward == 1.0, again
