"""Shared by the eval sandbox tests: the isolation modes this machine offers, traps a hostile sample could
spring (sentinel files, a TCP listener, a UNIX socket, a copy of the problems file), and the checks that the
machine is unharmed afterwards. Real processes and sockets throughout."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from qgpt_code.evals.data import human_eval_path
from qgpt_code.evals.detect import available
from qgpt_code.evals.isolation import MODES, Isolation

MODES_HERE = [mode for mode in MODES[1:] if available(mode) is not None]
REQUIRED = [m for m in os.environ.get("QGPT_EVALS_REQUIRE_ISOLATION", "").split(",") if m]
"""Modes CI insists on (.ci/run sets bwrap,unshare): a test run without them fails instead of skipping them."""


def isolation(mode: str) -> Isolation:
    found = available(mode)
    if found is None:
        pytest.skip(f"isolation {mode} does not work on this machine")
    return found


def tagged(body: str, tag: str) -> str:
    """A completion body that first names its process `tag` (inherited by every fork), so that a process it
    leaves behind can be found, whatever else runs on this machine."""
    name = tag.encode()[:15]
    return f"    __import__('ctypes').CDLL(None).prctl(15, {name!r}, 0, 0, 0)\n" + body


def processes_named(tag: str) -> list[str]:
    """The live processes (zombies waiting for their reaper are dead) named `tag`, as `PID STATE`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
            if name == tag[:15] and state not in "ZX":
                found.append(f"{entry} {state}")
    return found


def run_cgroups() -> list[str]:
    roots = [Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")]
    return [p.name for root in roots if root.is_dir() for p in root.glob(f"qgpt-eval-{os.getpid()}-*")]


@dataclass
class Traps:
    """What a hostile sample must not touch."""

    root: Path
    tag: str
    listener: socket.socket
    unix_listener: socket.socket
    original_sha256: str = ""

    @property
    def sentinels(self) -> Path:
        return self.root / "sentinels"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def problems(self) -> Path:
        return self.root / "problems.jsonl.gz"

    @property
    def unix_path(self) -> Path:
        return self.root / "sockets" / "listener.sock"

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def problems_sha256(self) -> str:
        return hashlib.sha256(self.problems.read_bytes()).hexdigest()

    def assert_unharmed(self) -> None:
        assert (self.sentinels / "keep.txt").read_text() == "original"
        assert sorted(p.name for p in self.sentinels.iterdir()) == ["keep.txt"]
        assert sorted(p.name for p in self.home.iterdir()) == [".profile"]
        assert (self.home / ".profile").read_text() == "# mine\n"
        assert self.problems_sha256() == self.original_sha256
        for listener in (self.listener, self.unix_listener):
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                continue
            connection.settimeout(1)
            raise AssertionError(f"{listener} was reached: {connection.recv(100)!r}")
        assert processes_named(self.tag) == []
        assert run_cgroups() == []

    def close(self) -> None:
        self.listener.close()
        self.unix_listener.close()


def set_traps(root: Path) -> Traps:
    for folder in ("sentinels", "home", "sockets"):
        (root / folder).mkdir()
    (root / "sentinels" / "keep.txt").write_text("original")
    (root / "home" / ".profile").write_text("# mine\n")
    shutil.copyfile(human_eval_path(), root / "problems.jsonl.gz")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind(str(root / "sockets" / "listener.sock"))
    unix_listener.listen()
    unix_listener.setblocking(False)
    # open to everyone, so that only the sandbox (not file permissions) keeps a sample out
    for path, mode in ((root, 0o755), (root / "sockets", 0o777), (root / "sockets" / "listener.sock", 0o777)):
        os.chmod(path, mode)
    traps = Traps(root, f"qgpt-{uuid.uuid4().hex[:10]}", listener, unix_listener)
    traps.original_sha256 = traps.problems_sha256()
    return traps
