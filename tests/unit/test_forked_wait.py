"""A forked process's status is read from its pipe whatever the descriptor's number: a server
with hundreds of kernels holds descriptors past 1024, which select() refuses."""

from __future__ import annotations

import os
import resource
import struct

import pytest

from sandbox_env.kernels.jupyter.template import ForkedProcess

HIGH_FD = 1500


@pytest.fixture
def high_pipe() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH_FD:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {HIGH_FD}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH_FD + 1), hard))
    r, w = os.pipe()
    os.dup2(r, HIGH_FD)
    os.close(r)
    yield HIGH_FD, w
    os.close(w)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_exit_status_is_read_from_a_descriptor_past_1024(high_pipe: tuple[int, int]) -> None:
    status, writer = high_pipe
    pidfd = os.open(os.devnull, os.O_RDONLY)  # never signalled here: any descriptor will do
    process = ForkedProcess(os.getpid(), pidfd, status)
    assert process.poll() is None  # nothing written yet: still running
    os.write(writer, struct.pack("i", 3))
    assert process.wait(5.0) == 3
