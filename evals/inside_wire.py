"""What both interpreters inside the sandbox share: framed messages over pipes, and the resource limits.

The inside_*.py files run inside the sandbox, where the qgpt_code package is not importable: they use the
standard library only and import each other as top-level modules. The harness compiles them once and sends
their code to the checker's interpreter on its stdin (sandbox.py's _BOOT), so that no sample pays for
compiling them and nothing of the harness's folders needs to be visible inside.

A frame is an 8-byte big-endian length followed by that many bytes. Requests (checker -> candidate) are
`marshal` data: the checker is trusted and sends plain values only. Replies (candidate -> checker) are Python
literals as text, which the checker reads with `ast.literal_eval`: whatever a sample sends, the checker gets
plain values back and never runs the sample's code.
"""

import os
import resource

MAX_FRAME = 64 << 20
"""The largest message either side accepts (a reply bigger than this fails the sample)."""


class WireError(Exception):
    """The other side sent something that is not a frame (cut off, or too large)."""


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(8, "big") + payload


def send(fd: int, payload: bytes) -> None:
    view = memoryview(frame(payload))
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int) -> bytes | None:
    """The next frame's payload; None when the other side closed the pipe between frames."""
    header = _read_exactly(fd, 8)
    if not header:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME:
        raise WireError(f"a message of {size} bytes (the limit is {MAX_FRAME})")
    payload = _read_exactly(fd, size)
    if len(payload) < size:
        raise WireError("a message cut off")
    return payload


def _read_exactly(fd: int, size: int) -> bytes:
    """`size` bytes, or fewer only if the pipe closed first."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def apply_limits(limits: dict) -> None:
    """Hard resource limits on this process (never above a hard limit already set)."""
    for name, value in (("RLIMIT_CPU", limits["cpu_s"]), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_FSIZE", limits["file_size_bytes"]), ("RLIMIT_NPROC", limits["processes"]),
                        ("RLIMIT_CORE", 0)):  # fmt: skip
        limit = getattr(resource, name)
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
