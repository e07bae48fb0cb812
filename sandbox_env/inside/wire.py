"""Length-prefixed JSON frames, and the authenticated channel between the server and a supervisor.

A plain frame is a 4-byte big-endian length and a JSON object. On the server <-> supervisor
channel every frame after the start-up also carries a 32-byte tag over its direction, its
sequence number and its body: keyed BLAKE2b (RFC 7693, a MAC by design), under a key made for
that one container. BLAKE2 and the constant-time compare come from CPython's own `_blake2` and
`_operator`: `hmac` and `hashlib` would load OpenSSL, about 4 MiB more in every idle container. The supervisor is the only
process that holds the channel, so the tag is a second wall: a frame that does not verify, comes
out of order, or answers another request than the one asked is an anomaly, and the sandbox that
produced it is never used again.
"""

from __future__ import annotations

import os
import struct

HEADER = struct.Struct(">I")
TAG_SIZE = 32
KEY_SIZE = 32
MAX_FRAME = 256 << 20
TO_SANDBOX, TO_SERVER = b">", b"<"  # the direction, inside the tag: a frame cannot be reflected
VERDICT = b"V"  # a grader's verdict: one message, sequence 0, under the key its job carried

TYPE_CHECKING = False  # typing costs milliseconds at container start; mypy reads this as True
if TYPE_CHECKING:
    from typing import Any


class Anomaly(Exception):
    """A frame on the authenticated channel that the other end cannot have sent."""


# json and blake2 are imported where used: the grader takes only HEADER from here, and every
# millisecond of its start-up counts twice per grading.
def encode(obj: dict[str, Any]) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":")).encode()


def decode(body: bytes) -> dict[str, Any]:
    import json

    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise ValueError("a frame must hold a JSON object")
    return obj


def read_exact(fd: int, n: int) -> bytes | None:
    """n bytes from a blocking fd; None at end of file."""
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_raw(fd: int) -> bytes | None:
    head = read_exact(fd, HEADER.size)
    if head is None:
        return None
    size = HEADER.unpack(head)[0]
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes")
    return read_exact(fd, size)


def read_frame(fd: int) -> dict[str, Any] | None:
    body = read_raw(fd)
    return None if body is None else decode(body)


def write_frame(fd: int, obj: dict[str, Any]) -> None:
    data = encode(obj)
    write_all(fd, HEADER.pack(len(data)) + data)


def tag(key: bytes, direction: bytes, seq: int, body: bytes) -> bytes:
    from _blake2 import blake2b

    return blake2b(direction + seq.to_bytes(8, "big") + body, key=key, digest_size=TAG_SIZE).digest()


def seal(key: bytes, direction: bytes, seq: int, obj: dict[str, Any]) -> bytes:
    """One authenticated frame: length of the body, tag, body."""
    body = encode(obj)
    return HEADER.pack(len(body)) + tag(key, direction, seq, body) + body


def unseal(key: bytes, direction: bytes, seq: int, mac: bytes, body: bytes) -> dict[str, Any]:
    from _operator import _compare_digest  # what hmac.compare_digest is

    if not _compare_digest(mac, tag(key, direction, seq, body)):
        raise Anomaly(f"frame {seq} failed authentication")
    return decode(body)


class Channel:
    """The supervisor's end: receives requests (to-sandbox direction), sends replies."""

    def __init__(self, fd_in: int, fd_out: int, key: bytes) -> None:
        self.fd_in, self.fd_out, self.key = fd_in, fd_out, key
        self.sent = self.received = 0

    def recv(self) -> dict[str, Any] | None:
        head = read_exact(self.fd_in, HEADER.size)
        if head is None:
            return None
        size = HEADER.unpack(head)[0]
        if size > MAX_FRAME:
            raise Anomaly(f"a frame of {size} bytes")
        mac = read_exact(self.fd_in, TAG_SIZE)
        body = None if mac is None else read_exact(self.fd_in, size)
        if mac is None or body is None:
            return None
        request = unseal(self.key, TO_SANDBOX, self.received, mac, body)
        self.received += 1
        return request

    def send(self, obj: dict[str, Any]) -> None:
        write_all(self.fd_out, seal(self.key, TO_SERVER, self.sent, obj))
        self.sent += 1
