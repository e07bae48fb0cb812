"""Rewards from tests: what a task is (`tasks`), how outcomes become a reward (`rewards`), and
the driver that runs a task's tests against a submission in a sandbox (`driver`; the grader
itself runs inside the sandbox: `sandbox_env/inside/grader.py`)."""
