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


def test_a_wait_in_a_thread_and_polls_on_the_loop_never_touch_a_reused_descriptor() -> None:
    """A kernel's teardown waits for its process in a worker thread while the event loop polls it:
    both saw the status at once, both read and closed it, and the second close hit whatever file
    the server had opened under that number since (seen as EBADF in program boxes under load)."""
    import threading

    for _ in range(100):
        status, writer = os.pipe()
        process = ForkedProcess(os.getpid(), os.open(os.devnull, os.O_RDONLY), status)
        results: list[object] = []
        waiter = threading.Thread(target=lambda p=process, out=results: out.append(p.wait(5.0, raises=False)))
        waiter.start()
        os.write(writer, struct.pack("i", 7))
        polled = [process.poll() for _ in range(50)]
        canary_r, canary_w = os.pipe()  # likely a number the process just gave back
        waiter.join()
        assert results == [7] and set(polled) <= {None, 7}
        os.write(canary_w, b"x")
        assert os.read(canary_r, 1) == b"x"  # still open: nobody closed it under us
        for fd in (writer, canary_r, canary_w):
            os.close(fd)
