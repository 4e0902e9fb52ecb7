"""Which kernel isolation wraps a sample's process, chosen at run time by trying each in turn.

- `bwrap` (bubblewrap): new user, PID, network, IPC, UTS and cgroup namespaces; the sample sees only the
  system directories and the Python installation, read-only, a fresh /dev and /proc, and an empty private
  tmpfs at /tmp (SCRATCH_BYTES big where bwrap supports --size) as its working directory; every capability
  dropped, no_new_privs set; dies with its parent.
- `unshare` (util-linux): new user, PID, network, IPC, UTS and mount namespaces with a private /proc. The host
  filesystem is NOT isolated: the sample writes wherever the harness's user can.
- `none`: no namespaces; only the resource limits, the session kill and a scratch directory apply.

`auto` takes the first that works. It refuses `none` for a root harness (a sample would run as root with
nothing around it): pass `--isolation none` explicitly when the machine is itself a throwaway sandbox.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from qgpt_code.errors import QGPTError

MODES = ("auto", "bwrap", "unshare", "none")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache",)
SCRATCH_BYTES = 64 << 20


class SandboxError(QGPTError):
    """The requested isolation is not available, or the sandbox itself (not the sample) failed."""


@dataclass(frozen=True)
class Isolation:
    name: str
    prefix: tuple[str, ...]
    """The argv that wraps the sample's command."""
    filesystem: bool
    """The host filesystem is read-only or hidden, and the sample's working directory is a private tmpfs."""
    network: bool
    """An own network namespace: no interface but a loopback that is down."""
    pid_namespace: bool
    """An own PID namespace: the sample cannot see or signal other processes, and all of its die together."""

    def wrap(self, argv: list[str]) -> list[str]:
        return [*self.prefix, *argv]

    @property
    def workdir_inside(self) -> str | None:
        """The working directory inside the sandbox when it makes its own; None: use a host temp dir."""
        return "/tmp" if self.filesystem else None

    def warnings(self) -> list[str]:
        notes = []
        if not self.filesystem:
            notes.append(
                "the host filesystem is not isolated: a sample can read and write whatever the user running "
                "the harness can (install bubblewrap for filesystem isolation)"
            )
        if not self.network:
            notes.append("the network is not isolated")
        if not self.pid_namespace:
            notes.append("no PID namespace: a sample can see and signal the harness user's other processes")
        return notes

    def describe(self) -> dict[str, object]:
        return {
            "mode": self.name,
            "filesystem": self.filesystem,
            "network": self.network,
            "pid_namespace": self.pid_namespace,
            "command": list(self.prefix),
            "warnings": self.warnings(),
        }


def _python_roots() -> list[str]:
    """The directories the interpreter and its libraries live in, outside the system directories."""
    candidates = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
    }
    roots: list[str] = []
    for path in sorted(os.path.realpath(p) for p in candidates):
        inside = (root for root in [*_SYSTEM_DIRS, *roots] if path == root or path.startswith(root + "/"))
        if not any(inside):
            roots.append(path)
    return roots


def _bwrap() -> Isolation | None:
    executable = shutil.which("bwrap")
    if executable is None:
        return None
    mounts: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            mounts += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            mounts += ["--ro-bind", path, path]
    for path in _SYSTEM_FILES:
        mounts += ["--ro-bind-try", path, path]
    for root in _python_roots():
        mounts += ["--ro-bind", root, root]
    scratch = ["--size", str(SCRATCH_BYTES)] if "--size" in _help_text(executable) else []
    prefix = (
        executable, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", *mounts,
        "--dev", "/dev", "--proc", "/proc", *scratch, "--tmpfs", "/tmp", "--chdir", "/tmp", "--",
    )  # fmt: skip
    return Isolation("bwrap", prefix, filesystem=True, network=True, pid_namespace=True)


def _help_text(executable: str) -> str:
    try:
        shown = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return shown.stdout + shown.stderr


def _unshare() -> Isolation | None:
    executable = shutil.which("unshare")
    if executable is None:
        return None
    prefix = (
        executable, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child",
        "--mount-proc", "--ipc", "--uts", "--",
    )  # fmt: skip
    return Isolation("unshare", prefix, filesystem=False, network=True, pid_namespace=True)


NONE = Isolation("none", (), filesystem=False, network=False, pid_namespace=False)
_BUILDERS = {"bwrap": _bwrap, "unshare": _unshare}


def _works(isolation: Isolation) -> bool:
    """Whether the wrapper can start the interpreter here (namespaces may be forbidden, e.g. in Docker)."""
    try:
        probe = subprocess.run(
            isolation.wrap([sys.executable, "-S", "-c", "pass"]),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=30, start_new_session=True,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@functools.cache
def available(mode: str) -> Isolation | None:
    """The isolation of that name if it works on this machine, else None."""
    if mode == "none":
        return NONE
    isolation = _BUILDERS[mode]()
    return isolation if isolation is not None and _works(isolation) else None


def detect(requested: str = "auto") -> Isolation:
    """The isolation to use: the one requested, or with `auto` the strongest that works here."""
    if requested not in MODES:
        raise SandboxError(f"unknown isolation {requested!r}; expected one of {', '.join(MODES)}")
    if requested != "auto":
        isolation = available(requested)
        if isolation is None:
            raise SandboxError(f"isolation {requested!r} does not work on this machine")
        return isolation
    for mode in ("bwrap", "unshare"):
        isolation = available(mode)
        if isolation is not None:
            return isolation
    if os.geteuid() == 0:
        raise SandboxError(
            "refusing to run untrusted samples as root without namespace isolation: install bubblewrap "
            "(apt-get install bubblewrap), or pass --isolation none if this machine is itself a sandbox"
        )
    return NONE


def bwrap_version() -> str | None:
    executable = shutil.which("bwrap")
    if executable is None:
        return None
    try:
        return subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
