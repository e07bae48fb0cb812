"""The relay between one kernel process and the server: the server never receives a kernel's zmq traffic.

libzmq assembles a whole multipart message in the receiving process before handing over its first
frame, and MAXMSGSIZE bounds frames, not messages: a kernel sending many big frames would make its
receiver use unbounded memory. So the receiver is this small process, started by the server for
each kernel process and confined with it (the kernel's cgroup, or rlimits with an RLIMIT_AS): a
huge message costs the episode's memory, never the server's. It forwards raw frames (signatures
stay valid) and only messages of at most `max_frames` frames and `max_bytes` bytes (a fixed bound,
whatever the output limit) that are cheap for the server to parse (`check`): it parses them first,
on the episode's CPU and memory. On any other it exits with OVERSIZE, and with DROPPED when a
kernel connection drops (the kernel died, or sent a frame over MAXMSGSIZE, which libzmq refuses
itself). The server reads either as a lost kernel. Replies on the control channel (to interrupts
and shutdowns, which nobody reads) are checked and dropped, never queued at the server.

It runs as the kernel's uid (when the server is root), with no capability and no_new_privs.

Run by the server as `python -I -c <this file's text> <config json>` (no package import: fast,
and nothing of the server's environment): binds `front` (the server's side), prints "ready",
then reads one line of JSON from stdin with the kernel's addresses (given once the server sealed
the kernel's socket folder) and connects to them. End of stdin (the server is gone) ends it.

Channels: shell and control (DEALER on both sides: requests go to the kernel unchanged, replies
come back checked), iopub (SUB from the kernel, PUB to the server; checked).
"""

from __future__ import annotations

import json
import os
import re
import sys

import zmq

OVERSIZE, DROPPED = 3, 4  # exit statuses the server reads as a lost kernel
DELIM = b"<IDS|MSG>"
# What a message from the kernel may hold: jupyter_client parses header and parent_header with
# dateutil for every string that looks like a date, so they must be small flat objects; the
# content is parsed by json (bounded in nodes and depth); no binary buffers.
# Numbers are 64-bit at most: a 4300-digit int costs the server far more to parse and size than
# the relay. Only `date` may look like a date (each one costs the server a dateutil call).
HEADER_KEYS, HEADER_STR, METADATA_BYTES, NODES, DEPTH = 16, 256, 64 << 10, 10_000, 32
DATE_LIKE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")


def _flat(value: object) -> bool:
    return isinstance(value, dict) and len(value) <= HEADER_KEYS and all(
        isinstance(key, str) and len(key) <= HEADER_STR and (
            item is None or _small_int(item)
            or (isinstance(item, str) and len(item) <= HEADER_STR and (key == "date" or not DATE_LIKE.match(item))))
        for key, item in value.items())


def _small_int(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and abs(item) < 1 << 63


def _small(value: object) -> bool:
    """At most NODES containers and scalars, nested at most DEPTH deep (iterative)."""
    nodes, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > NODES or depth > DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            nodes += len(item)  # the keys
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, int) and not isinstance(item, bool) and not _small_int(item):
            return False
    return True


def check(frames: list[bytes]) -> bool:
    """A Jupyter message the server can parse cheaply: identities, the delimiter, the signature,
    then header, parent_header, metadata and content as JSON, and nothing more (no buffers)."""
    try:
        at = frames.index(DELIM)
        if len(frames) != at + 6 or len(frames[at + 1]) > HEADER_STR or len(frames[at + 4]) > METADATA_BYTES:
            return False
        # decoded as jupyter_client decodes them: a lone surrogate printed by the code is no anomaly
        header, parent, metadata, content = (json.loads(f.decode("utf-8", "replace")) for f in frames[at + 2:])
        return (_flat(header) and len(header) > 0 and _flat(parent) and isinstance(metadata, dict)
                and isinstance(content, dict) and _small(metadata) and _small(content))
    except Exception:  # noqa: BLE001 - unparseable, too deep, out of memory: not forwarded
        return False


def unprivileged(config: dict) -> None:
    """Before any thread and any byte of the kernel's: the kernel's uid (no capability is left once
    no uid is 0), no_new_privs, and the kernel's seccomp filter (inherited by zmq's threads)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if "uid" in config and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(config["gid"], config["gid"], config["gid"])
        os.setresuid(config["uid"], config["uid"], config["uid"])
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if config.get("seccomp"):
        program = bytes.fromhex(config["seccomp"])

        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

        prog = Prog(len(program) // 8, program)
        if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    max_frames, max_bytes = int(config["max_frames"]), int(config["max_bytes"])
    unprivileged(config)
    ctx = zmq.Context(1)
    ctx.setsockopt(zmq.LINGER, 0)
    front, back = {}, {}
    for name, kind in (("shell", zmq.DEALER), ("control", zmq.DEALER), ("iopub", zmq.PUB)):
        sock = front[name] = ctx.socket(kind)
        sock.bind(config["front"][name])
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line:
        return 0
    kernel = json.loads(line)
    monitors = []
    for name, kind in (("shell", zmq.DEALER), ("control", zmq.DEALER), ("iopub", zmq.SUB)):
        sock = back[name] = ctx.socket(kind)
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)  # a bigger frame: libzmq drops the connection
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        monitors.append(sock.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        sock.connect(kernel[name])
    poller = zmq.Poller()
    route = {}
    for name in front:
        if name != "iopub":  # the server's requests: unchecked (the server is trusted)
            route[front[name]] = (back[name], False)
            poller.register(front[name], zmq.POLLIN)
        route[back[name]] = (front[name], True)
        poller.register(back[name], zmq.POLLIN)
    for watch in monitors:
        poller.register(watch, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock == sys.stdin.fileno():
                if not os.read(sock, 4096):
                    return 0  # the server closed our stdin, or died
                continue
            if sock in monitors:
                return DROPPED
            dest, checked = route[sock]
            frames, size = [], 0
            while True:  # frame by frame: stop at the first one over a bound
                frame = sock.recv(copy=False)
                frames.append(frame)
                size += len(frame)
                if checked and (len(frames) > max_frames or size > max_bytes):
                    return OVERSIZE
                if not frame.more:
                    break
            if checked and not check([f.bytes for f in frames]):
                return OVERSIZE
            if sock is back["control"]:
                continue  # replies to interrupts and shutdowns: nobody reads them
            try:
                dest.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # the receiver does not keep up (its queue is full): dropped, as zmq would


if __name__ == "__main__":
    code = main(sys.argv)
    os._exit(code)  # no linger, no atexit: the kernel may be gone
