"""DockerKernel lifecycle, container configuration, cleanup and the image tooling."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from docker_helpers import episode_containers, sandbox_policy

from sandbox_env.errors import KernelError, KernelUnavailableError
from sandbox_env.models import ExecStatus

pytestmark = pytest.mark.docker


async def test_container_is_hardened_and_labelled(kernel, docker_client) -> None:
    attrs = docker_client.api.inspect_container(kernel.container_id)
    host, config = attrs["HostConfig"], attrs["Config"]
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is True and host["Privileged"] is False
    assert host["Memory"] == host["MemorySwap"] == 256 * 2**20
    assert host["NanoCpus"] == 1_000_000_000 and host["PidsLimit"] == 32
    assert {u["Name"] for u in host["Ulimits"]} == {"nofile", "fsize", "core"}
    assert not host["Init"]  # the supervisor itself is PID 1
    assert not host["Binds"] and not attrs["Mounts"]
    assert set(host["Tmpfs"]) == {"/tmp", "/workspace"}
    assert config["User"] == "10001:10001"
    assert sorted(e.split("=")[0] for e in config["Env"]) == ["HOME", "LANG", "PATH", "TMPDIR"]
    assert config["Labels"]["sandbox-env.episode"] == kernel.kernel_id
    assert config["Labels"]["sandbox-env.owner"] == "pytest-docker"
    assert config["Labels"]["sandbox-env.policy"] == "test"


async def test_repl_semantics_and_inspect(kernel) -> None:
    assert (await kernel.execute("x = [1, 2, 3]\nlen(x)")).stdout == "3\n"
    assert (await kernel.execute("_ + 1")).stdout == "4\n"
    assert (await kernel.execute("import asyncio\nawait asyncio.sleep(0)\n'awaited'")).stdout == "'awaited'\n"
    # the worker's own `from __future__ import annotations` is not the step's
    assert (await kernel.execute("def f(a: int): pass\nf.__annotations__['a'] is int")).stdout == "True\n"
    rich = await kernel.execute("class H:\n    def _repr_html_(self):\n        return '<b>hi</b>'\nH()")
    assert rich.displays and rich.displays[0].kind == "execute_result"
    assert rich.displays[0].data["text/html"] == "<b>hi</b>"
    info = await kernel.inspect()
    assert {v["name"]: v for v in info["variables"]}["x"] == {"name": "x", "type": "list", "repr": "[1, 2, 3]", "len": 3}
    assert info["container_id"] == kernel.container_id and info["processes"] >= 2


async def test_event_loop_stays_free_during_a_busy_step(make_kernel) -> None:
    kernel = await make_kernel(timeout_s=2)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    result = await kernel.execute("print('x' * 100_000)\nwhile True:\n    pass")
    task.cancel()
    assert result.status is ExecStatus.TIMEOUT
    assert len(gaps) > 20 and max(gaps) < 1.0


async def test_close_during_a_step_returns_promptly(make_kernel, docker_client) -> None:
    kernel = await make_kernel(timeout_s=30)
    step = asyncio.create_task(kernel.execute("import time\ntime.sleep(60)"))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await kernel.close()
    result = await asyncio.wait_for(step, 10)
    assert result.status is ExecStatus.KILLED
    assert time.monotonic() - started < 10
    assert episode_containers(docker_client, kernel.kernel_id) == []
    with pytest.raises(KernelError):
        await kernel.execute("print(1)")


async def test_server_crash_leaves_no_container(make_kernel, docker_client) -> None:
    kernel = await make_kernel()
    kernel._channel._writer.transport.abort()  # what a dying server does to its sockets
    deadline = time.monotonic() + 15
    while episode_containers(docker_client, kernel.kernel_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert episode_containers(docker_client, kernel.kernel_id) == []


async def test_cpu_time_budget(make_kernel) -> None:
    kernel = await make_kernel(cpu_time_s=1, timeout_s=10)
    result = await kernel.execute("while True:\n    pass")
    assert result.status is ExecStatus.KILLED
    assert result.wall_time_s < 10


async def test_cleanup_orphans(docker_client) -> None:
    from sandbox_env.kernels.docker.config import DockerConfig
    from sandbox_env.kernels.docker.containers import cleanup_orphans
    from sandbox_env.kernels.docker.kernel import DockerKernel

    kernel = DockerKernel(sandbox_policy(), DockerConfig(owner="pytest-orphans"))
    await kernel.start()
    kernel._closed = True  # simulate a server that lost track of it
    assert cleanup_orphans("someone-else") == 0
    assert await asyncio.to_thread(cleanup_orphans, "pytest-orphans") == 1
    assert episode_containers(docker_client, kernel.kernel_id) == []


async def test_missing_image_is_unavailable(docker_client) -> None:
    from sandbox_env.kernels.docker.config import DockerConfig
    from sandbox_env.kernels.docker.kernel import DockerKernel

    kernel = DockerKernel(sandbox_policy(), DockerConfig(image="sandbox-env/does-not-exist:0"))
    with pytest.raises(KernelUnavailableError):
        await kernel.start()
    assert episode_containers(docker_client, kernel.kernel_id) == []


def test_runtime_report(docker_client) -> None:
    from sandbox_env.kernels.docker.daemon import runtime_report

    report = runtime_report(docker_client)
    assert report["cgroup_version"] in ("1", "2")
    assert report["seccomp"] is True
    assert isinstance(report["runsc_available"], bool) and isinstance(report["warnings"], list)


def test_apt_mirror_from_both_formats(tmp_path: Path) -> None:
    from sandbox_env.kernels.docker.images import apt_mirror

    (tmp_path / "a.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert apt_mirror(sources=(tmp_path,)) == "http://mirror.example/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text("# comment\ndeb [arch=amd64] http://other.example/debian bookworm main\n")
    assert apt_mirror(sources=(one_line,)) == "http://other.example/debian"


def test_image_is_the_expected_one(docker_client) -> None:
    from sandbox_env.kernels.docker.containers import default_image

    image = docker_client.images.get(default_image())
    assert image.attrs["Config"]["User"] == "10001:10001"
    out = docker_client.containers.run(default_image(), ["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
                                       network_mode="none", remove=True)
    assert out.strip() == b"(3, 11)"
    suid = docker_client.containers.run(default_image(), ["sh", "-c", "find / -xdev -perm /6000 -type f 2>/dev/null; true"],
                                        network_mode="none", remove=True, user="0")
    assert suid.strip() == b""


async def test_forked_child_does_not_become_a_second_worker(kernel) -> None:
    result = await kernel.execute("import os\nif os.fork() == 0:\n    print('child')\nelse:\n    os.wait()\n    print('parent')")
    assert result.status is ExecStatus.OK
    assert sorted(result.stdout.split()) == ["child", "parent"]
    for i in range(5):
        assert (await kernel.execute(f"print({i})")).stdout == f"{i}\n"
    big = await kernel.execute("n = 10 ** 5000")
    assert big.status is ExecStatus.OK
    assert {v["name"]: v["type"] for v in (await kernel.inspect())["variables"]}["n"] == "int"


def _shim_count() -> int:
    import psutil

    return sum(1 for p in psutil.process_iter(["name"]) if "containerd-shim" in (p.info["name"] or ""))


async def test_churn_leaves_nothing_behind(docker_client) -> None:
    from sandbox_env.kernels.docker.config import DockerConfig
    from sandbox_env.kernels.docker.kernel import DockerKernel

    shims = _shim_count()
    for _ in range(15):
        kernel = DockerKernel(sandbox_policy(), DockerConfig(owner="pytest-churn"))
        await kernel.start()
        assert (await kernel.execute("open('f', 'w').write('x'); print(1)")).stdout == "1\n"
        await kernel.close()
    assert docker_client.containers.list(all=True, filters={"label": "sandbox-env.owner=pytest-churn"}) == []
    deadline = time.monotonic() + 10
    while _shim_count() > shims and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert _shim_count() <= shims


async def test_unknown_runtime_is_unavailable(docker_client) -> None:
    from sandbox_env.kernels.docker.config import DockerConfig
    from sandbox_env.kernels.docker.daemon import runtime_report
    from sandbox_env.kernels.docker.kernel import DockerKernel

    if runtime_report(docker_client)["runsc_available"]:
        pytest.skip("runsc is installed here")
    kernel = DockerKernel(sandbox_policy(runtime="runsc"), DockerConfig(owner="pytest-docker"))
    with pytest.raises(KernelUnavailableError):
        await kernel.start()
    assert episode_containers(docker_client, kernel.kernel_id) == []


async def test_setup_sweeps_dead_servers_orphans_but_not_live_neighbours(docker_client) -> None:
    from sandbox_env.kernels.docker import containers
    from sandbox_env.kernels.docker.config import DockerConfig
    from sandbox_env.kernels.docker.kernel import DockerKernel

    live = DockerKernel(sandbox_policy(), DockerConfig(owner=containers.default_owner()))  # a live server's episode
    await live.start()
    dead_server = "1999999:123"  # a pid that cannot exist: its server crashed
    create, host = containers.container_options(sandbox_policy(), image=containers.default_image(),
                                                owner=containers.default_owner(), episode="pytest-orphan")
    create["labels"][containers.SERVER_LABEL] = dead_server
    create.update(command=["sleep", "60"], stdin_open=False, detach=True)
    orphan = docker_client.api.create_container(host_config=docker_client.api.create_host_config(**host), **create)
    try:
        report = await DockerKernel.setup_backend()
        assert report["orphans_removed"] >= 1 and report["owner"] == containers.default_owner()
        assert "cgroup_version" in report and "runsc_available" in report
        assert episode_containers(docker_client, "pytest-orphan") == []
        assert episode_containers(docker_client, live.kernel_id) != []
        assert (await live.execute("print('still here')")).stdout == "still here\n"
        live._closed = True  # as if the server forgot it: teardown must still remove it
        await DockerKernel.teardown_backend()
        assert episode_containers(docker_client, live.kernel_id) == []
    finally:
        containers.remove_container(docker_client, orphan["Id"])


@pytest.mark.parametrize("delay_s", [0.0, 0.002, 0.01, 0.05, 0.15, 0.3])
async def test_close_right_after_a_cancelled_step_leaves_no_container(make_kernel, docker_client,
                                                                      delay_s: float) -> None:
    """A cancelled step replaces the container in the background; close() at any point of that
    replacement (before or during the removal, during the new create) must still remove both."""
    kernel = await make_kernel()
    step = asyncio.ensure_future(kernel.execute("import time; time.sleep(30)"))
    await asyncio.sleep(0.3)
    step.cancel()
    await asyncio.gather(step, return_exceptions=True)
    await asyncio.sleep(delay_s)
    await kernel.close()
    assert episode_containers(docker_client, kernel.kernel_id) == []
    await asyncio.sleep(1.0)  # a create still in flight at close() would show up now
    assert episode_containers(docker_client, kernel.kernel_id) == [], "created after close()"


@pytest.mark.parametrize("attempt", range(3))
def test_remove_container_waits_for_an_auto_removal_in_progress(docker_client, attempt: int) -> None:
    """Killing an auto-remove container starts the daemon's own removal: a removal asked for
    meanwhile (409) waits for it, so the container is gone when remove_container returns."""
    from sandbox_env.kernels.docker import containers

    create, host = containers.container_options(sandbox_policy(), image=containers.default_image(),
                                                owner="pytest-docker", episode=f"pytest-autoremove-{attempt}")
    create.update(command=["sleep", "60"], stdin_open=False, detach=True)
    created = docker_client.api.create_container(host_config=docker_client.api.create_host_config(**host), **create)
    docker_client.api.start(created["Id"])
    docker_client.api.kill(created["Id"])  # the daemon begins removing it (auto_remove)
    containers.remove_container(docker_client, created["Id"])
    assert docker_client.api.containers(all=True, filters={"id": created["Id"]}) == []


async def test_memory_bytes_is_the_containers_charge(kernel) -> None:
    """What the pool weighs a ready container with: the host's cgroup file, no daemon call."""
    idle = await kernel.memory_bytes()
    assert idle is not None and 0 < idle < 256 * 2**20, idle  # the policy's limit bounds it
    held = await kernel.execute("block = bytearray(64 << 20)")
    assert held.status == ExecStatus.OK, held
    assert await kernel.memory_bytes() >= idle + 48 * 2**20  # the worker's memory is the container's
    await kernel.close()
    assert await kernel.memory_bytes() is None
