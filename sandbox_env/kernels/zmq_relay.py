"""The relay between one kernel process and the server: the server never receives a kernel's zmq traffic.

libzmq assembles a whole multipart message in the receiving process before handing over its first
frame, and MAXMSGSIZE bounds frames, not messages: a kernel sending many big frames would make its
receiver use unbounded memory. So the receiver is this small process, started by the server for
each kernel process and confined with it (the kernel's cgroup, or rlimits with an RLIMIT_AS): a
huge message costs the episode's memory, never the server's. It forwards raw frames (signatures
stay valid) and only messages of at most `max_frames` frames and `max_bytes` bytes; on any other
it exits with OVERSIZE, and with DROPPED when a kernel connection drops (the kernel died, or sent a
frame over MAXMSGSIZE, which libzmq refuses itself). The server reads either as a lost kernel.

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
import sys

import zmq

OVERSIZE, DROPPED = 3, 4  # exit statuses the server reads as a lost kernel


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    max_frames, max_bytes = int(config["max_frames"]), int(config["max_bytes"])
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
            try:
                dest.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # the receiver does not keep up (its queue is full): dropped, as zmq would


if __name__ == "__main__":
    code = main(sys.argv)
    os._exit(code)  # no linger, no atexit: the kernel may be gone
