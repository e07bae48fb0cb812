"""Probes that run INSIDE an episode (a step, a program, or a submission being graded).

Standard library only: the text of this file is shipped into the sandbox as it is (see
`security_helpers.probe_code`) and one of the functions below is called with JSON arguments.
Nothing here is imported by the tests on the host.

Rules every probe keeps, whatever the sandbox lets it do (on an unisolated kernel it runs as the
server's user on the host):
* non-destructive: files and fds are opened for read (O_RDONLY) and for write
  (O_WRONLY|O_APPEND|O_NONBLOCK) and closed without writing; a directory is tested with an
  O_TMPFILE open, which leaves no name behind; sockets are connected and closed; signals are
  signal 0; device nodes and FIFOs are never opened (a FIFO only gets access());
* `sweep` only reads regular files (pread), never a pipe or a socket, so it steals no data;
* the write-type attacks (`hijack`, `plant`, `escape_cgroup`, `forge_frames`) touch only what the
  test names for them: its own kernels' connection files, uniquely named markers the host
  removes, its own child process, and fds inside a Docker container;
* secrets are passed reversed, so no probe text holds the bytes it looks for.
"""

import errno
import hashlib
import json
import os
import socket
import stat

CLONE_NEWNET = 0x40000000
READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
WRITE = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
CONTENT_BYTES = 1 << 18  # read of each regular file, searched for the needles
MAX_ENTRIES = 20_000  # files walked under the shared directories
EXAMPLES = 40  # paths kept per category in a report


# -- processes --------------------------------------------------------------------------------------
def stat_of(pid):
    """(comm, ppid, fingerprint): `comm@starttime` names a process across pid namespaces."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode("utf-8", "replace")
    comm = data[data.index("(") + 1:data.rindex(")")]
    rest = data[data.rindex(")") + 2:].split()
    return comm, int(rest[1]), f"{comm}@{rest[19]}"


def processes():
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                found[int(name)] = stat_of(name)
            except (OSError, ValueError, IndexError):
                continue
    return found


def placement(pid):
    """Where a process is confined, as this namespace sees it (readable without ptrace access):
    its memory (v1) or unified (v2) cgroup path; the host uses it to tell apart processes that
    started in the same clock tick."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    picked = [line for line in lines if ":memory:" in line or line.startswith("0::")]
    return (picked or lines or ["?"])[0].split(":", 2)[-1]


def own_tree(procs):
    """This process and its descendants: what the probe may legitimately reach."""
    tree, grew = {os.getpid()}, True
    while grew:
        grew = False
        for pid, (_, ppid, _) in procs.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def needles_of(reversed_needles):
    return {key: value[::-1].encode() for key, value in (reversed_needles or {}).items()}


def found_in(data, needles):
    return [key for key, needle in needles.items() if needle and needle in data]


def try_open(path, flags):
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        return None, errno.errorcode.get(exc.errno, str(exc.errno))
    return fd, None


def file_content(fd):
    try:
        return os.pread(fd, CONTENT_BYTES, 0)
    except OSError:
        return b""


def reach_process(pid, needles, skip, secrets):
    """Everything of another process that opens: its fds (each, for read and for write), mem,
    environ, cwd, root, net namespace, and whether signal 0 is delivered."""
    base, got = f"/proc/{pid}", {}
    try:
        fds = os.listdir(base + "/fd")
        got["fd_list"] = len(fds)
    except OSError:
        fds = []
    opened = []
    for fd in fds:
        path = f"{base}/fd/{fd}"
        try:
            target = os.readlink(path)
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if skipped(target, skip):
            continue
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
            continue  # devices are never opened; a socket cannot be opened through /proc
        for kind, flags in (("r", READ), ("w", WRITE)):
            handle, _ = try_open(path, flags)
            if handle is None:
                continue
            if kind == "r" and stat.S_ISREG(mode):
                for key in found_in(file_content(handle), needles):
                    secrets.append({"needle": key, "where": f"{path} -> {target}"})
            os.close(handle)
            opened.append(f"{kind}:{fd}->{target}")
    if opened:
        got["fds_opened"] = len(opened)
        got["fd_examples"] = opened[:8]
    handle, _ = try_open(base + "/mem", os.O_RDONLY | os.O_CLOEXEC)
    if handle is not None:
        os.close(handle)
        got["mem"] = True
    try:
        with open(base + "/environ", "rb") as f:
            environ = f.read()
        got["environ_sha256"] = hashlib.sha256(environ).hexdigest()
        for key in found_in(environ, needles):
            secrets.append({"needle": key, "where": base + "/environ"})
    except OSError:
        pass
    for name in ("cwd", "root"):
        try:
            os.listdir(f"{base}/{name}")
            got[name] = True
        except OSError:
            pass
    try:
        os.kill(pid, 0)
        got["signal0"] = True
    except OSError:
        pass
    try:
        with open(base + "/cmdline", "rb") as f:
            for key in found_in(f.read(), needles):
                secrets.append({"needle": key, "where": base + "/cmdline"})
    except OSError:
        pass
    return got


# -- network ------------------------------------------------------------------------------------------
def connect_tcp(port, http=False):
    """'refused'/errno name, 'connected', or the first line of an HTTP answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(("127.0.0.1", port))
        if not http:
            return "connected"
        sock.sendall(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        return "connected: " + sock.recv(200).decode("latin-1").split("\r\n")[0]
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    finally:
        sock.close()


NETNS_CHILD = r"""
import ctypes, errno, json, socket, sys
fd, ports, http_ports = int(sys.argv[1]), json.loads(sys.argv[2]), set(json.loads(sys.argv[3]))
libc = ctypes.CDLL(None, use_errno=True)
if libc.setns(fd, 0x40000000) != 0:
    print(json.dumps({"setns": errno.errorcode.get(ctypes.get_errno(), "?")}))
    raise SystemExit
out = {"setns": "ok", "ports": {}}
for port in ports:
    s = socket.socket()
    s.settimeout(2.0)
    try:
        s.connect(("127.0.0.1", port))
        out["ports"][str(port)] = "connected"
        if port in http_ports:
            s.sendall(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            out["ports"][str(port)] += ": " + s.recv(200).decode("latin-1").split("\r\n")[0]
    except OSError as exc:
        out["ports"][str(port)] = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    finally:
        s.close()
print(json.dumps(out))
"""


def in_netns(ns_fd, ports, http_ports):
    """setns() into another network namespace and try the ports on its loopback: in a child
    process, so that a seccomp filter that kills on setns() takes the child, not the probe."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-I", "-c", NETNS_CHILD, str(ns_fd), json.dumps(list(ports)),
                               json.dumps(sorted(http_ports))], pass_fds=(ns_fd,), capture_output=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"setns": "no child: " + repr(exc)[:100]}
    if done.returncode < 0:
        return {"setns": f"child killed by signal {-done.returncode}"}
    try:
        return json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"setns": "child failed: " + done.stderr.decode(errors="replace")[-200:]}


def unix_socket_table():
    """{bound path or @abstract name: socket inode} in this network namespace."""
    table = {}
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8:
                    table.setdefault(parts[7], set()).add(parts[6])
    except (OSError, StopIteration):
        pass
    return table


def own_socket_inodes():
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def connect_unix(address):
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM):
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.settimeout(2.0)
        try:
            sock.connect(address)
            return "connected"
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:
                continue
            return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        finally:
            sock.close()
    return "EPROTOTYPE"


# -- files --------------------------------------------------------------------------------------------
def identify(path):
    """path, device and inode: the host compares them with its own view of the same path."""
    try:
        st = os.lstat(path)
        return {"path": path, "dev": st.st_dev, "ino": st.st_ino}
    except OSError:
        return {"path": path}


def dir_writable(path):
    """Whether a file could be created in `path`, without creating a name there."""
    handle, err = try_open(path, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC)
    if handle is not None:
        os.close(handle)
        return True
    if err in ("EOPNOTSUPP", "EISDIR", "EINVAL"):  # no O_TMPFILE on this filesystem
        return os.access(path, os.W_OK | os.X_OK)
    return False


def under(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def skipped(path, skip):
    return any(path.startswith(prefix) for prefix in skip)


def walk_shared(dirs, own_dirs, needles, skip, secrets, own_sockets, table):
    """Every file and socket under the shared directories: regular files opened for read (and
    searched) and for write, directories tested for writing, sockets connected."""
    seen, report = set(), {"entries": 0, "read": [], "write": [], "dirs_writable": [], "sockets": [],
                           "truncated": False}
    stack = [d for d in dirs if os.path.isdir(d)]
    while stack:
        top = stack.pop()
        try:
            real = os.path.realpath(top)
            if real in seen or skipped(real, skip) or real.startswith(("/proc", "/sys")):
                continue
            seen.add(real)
            names = os.listdir(top)
        except OSError:
            continue
        if not under(top, own_dirs) and dir_writable(top):
            report["dirs_writable"].append(identify(top))
        for name in names:
            path = os.path.join(top, name)
            report["entries"] += 1
            if report["entries"] > MAX_ENTRIES:
                report["truncated"] = True
                return report
            if skipped(path, skip):
                continue
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                stack.append(path)
            elif stat.S_ISREG(mode):
                handle, _ = try_open(path, READ)
                if handle is not None:
                    for key in found_in(file_content(handle), needles):
                        secrets.append({"needle": key, "where": path})
                    os.close(handle)
                    report["read"].append(path)
                handle, _ = try_open(path, WRITE)
                if handle is not None:
                    os.close(handle)
                    if not under(path, own_dirs):
                        report["write"].append(identify(path))
            elif stat.S_ISSOCK(mode):
                if table.get(path, set()) & own_sockets:
                    continue  # bound by this very process (its own kernel channels)
                report["sockets"].append({**identify(path), "connect": connect_unix(path)})
            elif stat.S_ISFIFO(mode) and not under(path, own_dirs):
                if os.access(path, os.W_OK):
                    report["write"].append({**identify(path), "fifo": True})
    return report


# -- the class sweep ----------------------------------------------------------------------------------
def sweep(args):
    """Everything reachable from here. args: needles (reversed), ports, http_ports, socket_paths,
    skip (path prefixes of the machine's own tooling, never touched), extra_dirs."""
    needles = needles_of(args.get("needles"))
    skip = args.get("skip", [])
    ports, http_ports = args.get("ports", []), set(args.get("http_ports", []))
    secrets = []
    procs = processes()
    mine = own_tree(procs)
    report = {"self": {"pid": os.getpid(), "fingerprint": procs[os.getpid()][2], "cwd": os.getcwd(),
                       "cgroup": placement(os.getpid()),
                       "visible_processes": len(procs), "uid": os.getuid()}}

    # 1. every fd, mem, environ, cwd, root of every other process; signal 0
    reached, netns = [], {}
    own_ns = os.stat("/proc/self/ns/net").st_ino
    for pid, (comm, _ppid, fingerprint) in sorted(procs.items()):
        if pid in mine:
            continue
        got = reach_process(pid, needles, skip, secrets)
        handle, _ = try_open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if handle is not None:
            inode = os.fstat(handle).st_ino
            if inode != own_ns and inode not in netns:
                netns[inode] = (handle, pid, fingerprint, placement(pid))
            else:
                os.close(handle)
        if got:
            reached.append({"pid": pid, "comm": comm, "fingerprint": fingerprint, "cgroup": placement(pid), **got})
    report["processes"] = reached

    # 2. the server's port: on this namespace's loopback, and from inside every other namespace
    report["ports"] = {str(p): connect_tcp(p, p in http_ports) for p in ports}
    report["netns"] = []
    for inode, (handle, pid, fingerprint, cgroup) in netns.items():
        result = in_netns(handle, ports, http_ports)
        os.close(handle)
        report["netns"].append({"pid": pid, "fingerprint": fingerprint, "cgroup": cgroup, "inode": inode, **result})

    # 3. sockets and files under the shared directories (and the runtime sockets by name)
    own_sockets, table = own_socket_inodes(), unix_socket_table()
    cwd, tmp, home = os.getcwd(), os.environ.get("TMPDIR") or "/tmp", os.path.expanduser("~")
    own_dirs = [os.path.realpath(d) for d in {cwd, tmp, home}]
    shared = ["/tmp", "/run", "/var/run", "/dev/shm", "/var/tmp", os.path.dirname(cwd),
              os.path.dirname(os.path.dirname(cwd)), os.path.dirname(tmp), *args.get("extra_dirs", [])]
    shared = [d for d in dict.fromkeys(shared) if d and d != "/"]  # the parents, not the whole root
    report["files"] = walk_shared(shared, own_dirs, needles, skip, secrets, own_sockets, table)
    named = []
    for path in args.get("socket_paths", []):
        if os.path.exists(path):
            named.append({"path": path, "connect": connect_unix(path)})
    for name, inodes in table.items():  # abstract sockets of this network namespace
        if name.startswith("@") and not inodes & own_sockets:
            named.append({"path": name, "connect": connect_unix("\0" + name[1:])})
    report["named_sockets"] = named
    report["secrets"] = secrets
    for key, keep in (("read", EXAMPLES), ("write", 2000), ("dirs_writable", 2000)):
        files = report["files"][key]
        report["files"][key + "_count"] = len(files)
        report["files"][key] = files[:keep]
    return report


# -- single attacks -----------------------------------------------------------------------------------
def identity(args=None):
    """uid, capabilities, no_new_privs, seccomp and namespaces of this process."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    spaces = {}
    for name in ("pid", "net", "mnt", "ipc", "user", "cgroup", "uts"):
        try:
            spaces[name] = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            spaces[name] = None
    return {"uid": [int(x) for x in fields["Uid"].split()], "gid": [int(x) for x in fields["Gid"].split()],
            "CapEff": fields.get("CapEff"), "CapPrm": fields.get("CapPrm"), "CapBnd": fields.get("CapBnd"),
            "NoNewPrivs": fields.get("NoNewPrivs"), "Seccomp": fields.get("Seccomp"), "ns": spaces,
            "pid": os.getpid()}


def hijack(args):
    """Read other kernels' connection files and run `payload` in those kernels (jupyter_client).
    args: paths (connection files of the test's own kernels), payload, expression."""
    results = {}
    own = None
    try:
        from ipykernel.connect import get_connection_file

        own = os.path.realpath(get_connection_file())
    except Exception:  # noqa: BLE001, S110 - not in a kernel: every path is foreign
        pass
    for path in args["paths"]:
        result = results[path] = {}
        try:
            with open(path, "rb") as f:
                info = json.loads(f.read())
            result["read"] = True
        except (OSError, ValueError) as exc:
            result["read"] = type(exc).__name__ + ": " + str(exc)[:100]
            continue
        if own is not None and os.path.realpath(path) == own:
            result["own"] = True
            continue
        try:
            from jupyter_client import BlockingKernelClient
        except ImportError as exc:
            result["error"] = repr(exc)
            continue
        client = BlockingKernelClient()
        try:
            client.load_connection_info(info)
            client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
            msg_id = client.execute(args["payload"], silent=True, store_history=False,
                                    user_expressions={"v": args.get("expression", "None")})
            while True:
                msg = client.get_shell_msg(timeout=args.get("timeout_s", 5))
                if msg["parent_header"].get("msg_id") == msg_id:
                    break
            content = msg["content"]
            result["executed"] = content.get("status")
            value = (content.get("user_expressions") or {}).get("v") or {}
            result["stole"] = (value.get("data") or {}).get("text/plain")
        except Exception as exc:  # noqa: BLE001 - unreachable sockets time out: that is the point
            result["error"] = type(exc).__name__ + ": " + str(exc)[:100]
        finally:
            client.stop_channels()
    return results


def shared_dirs():
    cwd, tmp = os.getcwd(), os.environ.get("TMPDIR") or "/tmp"
    found = ["/tmp", "/dev/shm", "/var/tmp", os.path.dirname(cwd), os.path.dirname(os.path.dirname(cwd)),
             os.path.dirname(tmp)]
    return [d for d in dict.fromkeys(found) if d and d != "/"]


def plant(args):
    """Leave a uniquely named marker in every shared directory it can write (the host deletes
    them after the test): a file another episode would see."""
    planted = []
    for top in shared_dirs():
        path = os.path.join(top, args["name"])
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError:
            continue
        os.write(fd, args["token"].encode())
        os.close(fd)
        planted.append(path)
    return {"planted": planted}


def infected(args):
    """What a fresh episode sees of an infection: builtins, variables, environment, markers."""
    import builtins

    main = __import__("__main__")
    markers = []
    for top in shared_dirs():
        path = os.path.join(top, args["name"])
        if os.path.lexists(path):
            markers.append(path)
    return {"builtin": getattr(builtins, "sbx_infected", None), "variable": getattr(main, "sbx_infected", None),
            "environ": os.environ.get("SBX_INFECTED"), "markers": markers}


def cgroup_paths():
    """{hierarchy line: (mount point, path relative to that mount)} for this process."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split(" ")[0]
            if fstype in ("cgroup", "cgroup2"):
                fields = left.split(" ")
                options = right.split(" ")[2] if len(right.split(" ")) > 2 else ""
                mounts.append((fstype, fields[3], fields[4], set(options.strip().split(","))))
    found = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.strip().split(":", 2)
            for fstype, root, point, options in mounts:
                v2 = not controllers and fstype == "cgroup2"
                if v2 or (controllers and set(controllers.split(",")) <= options):
                    rel = os.path.relpath(path, root) if path.startswith(root) else None
                    if rel is not None:
                        found[line.strip()] = (point, "" if rel == "." else rel)
                    break
    return found


def escape_cgroup(args):
    """Start a child (its argv carries the token), then write its pid into every ancestor of this
    process's cgroups, nearest first, until one takes it: the child leaves the episode's cgroup."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(300)", args["token"]],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env={}, close_fds=True)
    moved, refused = [], {}
    for _line, (point, rel) in cgroup_paths().items():
        parts = [p for p in rel.split("/") if p]
        for depth in range(len(parts) - 1, -1, -1):
            target = os.path.join(point, *parts[:depth], "cgroup.procs")
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, str(child.pid).encode())
                finally:
                    os.close(fd)
                moved.append(target)
                break
            except OSError as exc:
                refused[target] = errno.errorcode.get(exc.errno or 0, "?")
    return {"child": child.pid, "moved": moved, "refused": refused, "cgroups": sorted(cgroup_paths())}


def writable(args):
    """For each path: whether it could be written (files: an O_APPEND open, closed unwritten;
    directories: an O_TMPFILE open, which leaves no name), or why not."""
    out = {}
    for path in args["paths"]:
        if not os.path.lexists(path):
            out[path] = "absent"
        elif os.path.isdir(path):
            out[path] = "writable" if dir_writable(path) else "denied"
        else:
            handle, err = try_open(path, WRITE)
            if handle is not None:
                os.close(handle)
            out[path] = "writable" if handle is not None else err
    return out


def sockets(args):
    """connect() to each named unix socket."""
    return {path: (connect_unix(path) if os.path.exists(path) else "absent") for path in args["paths"]}


def server_reach(args):
    """The parent's environment, signal 0 to the parent and to every other process, the server's
    port directly and through every other network namespace."""
    needles = needles_of(args.get("needles"))
    ppid, out = os.getppid(), {}
    procs = processes()
    mine = own_tree(procs)
    out["ppid"] = ppid
    try:
        with open(f"/proc/{ppid}/environ", "rb") as f:
            environ = f.read()
        out["ppid_environ_sha256"] = hashlib.sha256(environ).hexdigest()
        out["ppid_environ_needles"] = found_in(environ, needles)
    except OSError as exc:
        out["ppid_environ"] = errno.errorcode.get(exc.errno or 0, "?")
    environs, signalled = {}, {}
    for pid, (_, _, fingerprint) in procs.items():
        if pid in mine:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environs[fingerprint] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            pass
        try:
            os.kill(pid, 0)
            signalled[fingerprint] = {"pid": pid, "cgroup": placement(pid)}
        except OSError:
            pass
    out["environs"], out["signal0"] = environs, signalled
    out["ports"] = {str(p): connect_tcp(p) for p in args.get("ports", [])}
    namespaces = {}
    own_ns = os.stat("/proc/self/ns/net").st_ino
    for pid, (_, _, fingerprint) in procs.items():
        handle, _ = try_open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if handle is None:
            continue
        inode = os.fstat(handle).st_ino
        if inode == own_ns or inode in namespaces:
            os.close(handle)
            continue
        namespaces[inode] = {"fingerprint": fingerprint, **in_netns(handle, args.get("ports", []), set())}
        os.close(handle)
    out["netns"] = list(namespaces.values())
    return out


def forge_frames(args):
    """Docker only: write a forged, length-prefixed reply frame into every fd of every other
    process that opens for writing (the supervisor's channel included, if it were reachable)."""
    if not os.path.exists("/.dockerenv"):
        return {"refused": "not inside a container: this probe writes to other processes' fds"}
    body = json.dumps(args["frame"]).encode()
    frame = len(body).to_bytes(4, "big") + b"\0" * 32 + body
    procs = processes()
    mine = own_tree(procs)
    written, tried = [], 0
    for pid in procs:
        if pid in mine:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            tried += 1
            handle, _ = try_open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            if handle is None:
                continue
            try:
                os.write(handle, frame)
                written.append(f"{pid}:{fd}")
            except OSError:
                pass
            finally:
                os.close(handle)
    for target in ("/proc/1/fd/0", "/proc/1/fd/1"):
        tried += 1
        handle, _ = try_open(target, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if handle is not None:
            try:
                os.write(handle, frame)
                written.append(target)
            except OSError:
                pass
            finally:
                os.close(handle)
    return {"written": written, "tried": tried, "processes": len(procs)}


def grader_reach(args=None):
    """From a submission being graded: what of every process outside its own tree opens (the
    grader, its parent, the sandbox's supervisor). Signal 0 is left out: a same-uid signal can
    only make its own grading fail."""
    procs = processes()
    mine = own_tree(procs)
    if os.getppid() not in procs:
        return {"harness": f"the grader (parent pid {os.getppid()}) is not visible in /proc"}
    reached = {}
    for pid, (comm, _, _) in procs.items():
        if pid in mine:
            continue
        got = reach_process(pid, {}, (args or {}).get("skip", []), [])
        got.pop("signal0", None)
        if got:
            reached[f"{pid} {comm}{' (grader)' if pid == os.getppid() else ''}"] = got
    return reached


# x86_64 numbers, with arguments that make an unfiltered call reach the kernel and come back with
# success or an error of its own (EBADF, EFAULT, EINVAL, ...): only a filter (or a missing
# capability) answers EPERM/EACCES/ENOSYS or kills the caller.
SYSCALLS = {
    "unshare(CLONE_NEWUSER)": (272, (0x10000000,)),
    "setns(-1, 0)": (308, (-1, 0)),
    "mount(NULL, NULL, NULL)": (165, (0, 0, 0, 0, 0)),
    "ptrace(PTRACE_TRACEME)": (101, (0, 0, 0, 0)),
    "bpf(BPF_PROG_LOAD, NULL)": (321, (5, 0, 0)),
    "keyctl(KEYCTL_GET_KEYRING_ID)": (250, (0, -3, 0)),
    "add_key(NULL)": (248, (0, 0, 0, 0, -3)),
    "perf_event_open(NULL)": (298, (0, 0, -1, -1, 0)),
    "userfaultfd(0)": (323, (0,)),
    "io_uring_setup(1, NULL)": (425, (1, 0)),
    "open_by_handle_at(-1, NULL)": (304, (-1, 0, 0)),
}
SYSCALL_CHILD = r"""
import ctypes, errno, json, sys
nr, args = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
print(json.dumps("ok" if ret >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")))
"""


def syscalls(args=None):
    """Each dangerous syscall in a child of its own: 'denied: ...' (EPERM, EACCES, ENOSYS, or the
    child killed by the filter) or 'reached the kernel: ...'."""
    import subprocess
    import sys

    out = {}
    for name, (nr, call_args) in SYSCALLS.items():
        try:
            done = subprocess.run([sys.executable, "-I", "-c", SYSCALL_CHILD, json.dumps([nr, list(call_args)])],
                                  capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            out[name] = "no child: " + repr(exc)[:80]
            continue
        if done.returncode < 0:
            out[name] = f"denied: child killed by signal {-done.returncode}"
            continue
        try:
            answer = json.loads(done.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[name] = "child failed: " + done.stderr.decode(errors="replace")[-150:]
            continue
        out[name] = ("denied: " if answer in ("EPERM", "EACCES", "ENOSYS") else "reached the kernel: ") + answer
    return out
