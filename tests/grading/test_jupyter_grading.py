"""The same grading on the jupyter backend (confinement against accidents, not attacks)."""

from __future__ import annotations

from typing import Any

import pytest
from grading_helpers import GOOD_SQUARE, SQUARE, make_task

from sandbox_env.grading.driver import grade

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


async def test_forms_and_a_hack_on_jupyter(jupyter_kernel: Any) -> None:
    assert (await grade(jupyter_kernel, SQUARE, GOOD_SQUARE)).reward == 1.0
    eq = "class A:\n    __eq__ = lambda s, o: True\ndef square(x):\n    return A()\n"
    assert (await grade(jupyter_kernel, SQUARE, eq)).reward == 0.0
    stdio = make_task({"kind": "stdio", "cases": [{"input": "2\n", "output": "4\n"}]})
    assert (await grade(jupyter_kernel, stdio, "print(int(input()) ** 2)")).reward == 1.0
    timing_out = await grade(jupyter_kernel, SQUARE, "def square(x):\n    while True: pass\n")
    assert [t.status.value for t in timing_out.tests] == ["timeout"]


async def test_program_sees_nothing_of_the_steps_and_the_kernel_comes_back(jupyter_kernel: Any) -> None:
    await jupyter_kernel.execute("import subprocess\nopen('planted', 'w').write('x')\n"
                                 "subprocess.Popen(['sleep', '302'], start_new_session=True)\nx = 1")
    probe = ("import os\nprocs = [p for p in os.listdir('/proc') if p.isdigit() and "
             "b'sleep\\x00302' in open(f'/proc/{p}/cmdline', 'rb').read()]\nprint(os.listdir('.'), len(procs))")
    result = await jupyter_kernel.run_program(probe, timeout_s=10)
    assert result.stdout == "[] 0\n", result
    after = await jupyter_kernel.execute("print('x' in dir())")
    assert after.stdout == "False\n"  # a fresh kernel: the namespace went with the program
