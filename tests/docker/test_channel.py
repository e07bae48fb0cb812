"""The server <-> supervisor channel: unreachable from the episode, authenticated, matched to its
request; a sandbox whose channel saw an anomaly is removed and never used again."""

from __future__ import annotations

import os

import docker.errors
import pytest

from sandbox_env.errors import KernelDiedError
from sandbox_env.models import ExecStatus

REACH_PID1 = """
import os, json
seen = {}
for target in ("/proc/1/fd/0", "/proc/1/fd/1", "/proc/1/fd/2", "/proc/1/fd", "/proc/1/mem", "/proc/1/environ"):
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
        try:
            fd = os.open(target, flags | (os.O_DIRECTORY if target.endswith("fd") else 0))
            os.close(fd)
            seen[target + str(flags)] = "opened"
        except OSError as exc:
            seen[target + str(flags)] = type(exc).__name__
print(json.dumps(seen))
"""


def container_gone(client, container_id: str) -> bool:
    try:
        client.containers.get(container_id)
    except docker.errors.NotFound:
        return True
    return False


async def test_the_channel_is_unreachable_from_the_episode(kernel) -> None:
    result = await kernel.execute(REACH_PID1)
    assert result.status is ExecStatus.OK, result
    assert "opened" not in result.stdout, result.stdout  # /proc/1 is the non-dumpable supervisor
    assert kernel.probe["pid"] == 1


@pytest.mark.parametrize("fault", ["key", "sequence"])
async def test_a_reply_that_does_not_verify_retires_the_container(kernel, docker_client, fault: str) -> None:
    """Fault injected on the server's side of the channel (a reply under another key, or out of
    sequence): the request is a retryable infrastructure error, the container is removed, and
    the next request runs in a fresh one."""
    await kernel.execute("kept = 1")
    old = kernel.container_id
    if fault == "key":
        kernel._channel._key = os.urandom(len(kernel._channel._key))
    else:
        kernel._channel._received += 1
    with pytest.raises(KernelDiedError) as raised:
        await kernel.execute("print('never seen')")
    assert raised.value.retryable and "anomaly" in str(raised.value)
    assert container_gone(docker_client, old)
    after = await kernel.execute("print('fresh' if 'kept' not in dir() else 'reused')")
    assert after.stdout == "fresh\n" and kernel.container_id != old


async def test_a_request_the_supervisor_cannot_verify_retires_the_container(kernel, docker_client) -> None:
    """The supervisor checks the server's frames too: one out of sequence ends that container."""
    old = kernel.container_id
    kernel._channel._sent += 1
    with pytest.raises(KernelDiedError, match="rejected"):
        await kernel.execute("print(1)")
    assert container_gone(docker_client, old)
    assert (await kernel.execute("print(2)")).stdout == "2\n"
