"""The kernel isolation that wraps a sample's processes, and exactly what each mode guarantees.

- `bwrap` (bubblewrap): new PID, network, IPC, UTS and cgroup namespaces (and a user namespace when the
  harness is not root); a fresh root holding read-only binds of the system directories and the Python
  installation, a fresh /dev and /proc, and a private tmpfs at /tmp (mounted first, so an
  interpreter installed under /tmp stays visible); every capability dropped but, under a root harness,
  CAP_SETUID/CAP_SETGID for the checker to hand the sample a uid of its own.
- `unshare` (util-linux, when bubblewrap is missing or cannot run): new mount, PID, network, IPC, UTS and
  cgroup namespaces (and a user namespace when the harness is not root). The checker builds the same root
  filesystem itself (inside_confine.build_root) and pivots into it.
- `none`: no namespaces and the harness's own user; only the limits, the seccomp filter, the separate test
  interpreter and the kill apply. Never chosen by `auto`: pass `--isolation none` on a machine that is itself
  a throwaway sandbox.

In every mode the checker (inside_checker.py) installs a seccomp filter that refuses UNIX sockets, and runs
the tests in an interpreter the sample's code never runs in. Choosing and probing a mode: detect.py.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields

from qgpt_code.errors import QGPTError

MODES = ("auto", "bwrap", "unshare", "none")
SCRATCH_BYTES = 64 << 20
CHECKER_UID = 0x70000000
"""Under a root harness the checker runs as this uid, and each sample as one of the next 4,096 (unused ids:
nothing on the host belongs to them)."""
_SAMPLE_UIDS = 4096
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache",)


class SandboxError(QGPTError):
    """The requested isolation is not available here (the message says why)."""


@dataclass(frozen=True)
class Guarantees:
    """What a mode guarantees against a hostile sample; docs/evals.md's table lists them, and the tests
    check each with a sample that tries to break it."""

    filesystem: bool
    """The host's files are out of reach: only the system directories and the Python installation are visible,
    all read-only; the working directory is a private, size-limited tmpfs."""
    not_root: bool
    """The sample never runs as the host's root: under a root harness it gets a uid of its own, and no
    capabilities in any mode but `none`."""
    network: bool
    """An own network namespace: only a loopback interface, no route out, no abstract UNIX sockets."""
    processes: bool
    """An own PID namespace: the sample sees and signals only its own processes, and all of them die together."""
    cgroups: bool
    """The sample cannot write cgroup files, so it cannot leave its pids cgroup (the process limit and the kill)."""
    unix_sockets: bool = True
    """socket(AF_UNIX) fails (seccomp), so no socket bound on a host path can be reached."""
    separate_tests: bool = True
    """The tests run in another interpreter that the sample cannot trace, read or write (it is not dumpable,
    and runs under another uid when the harness is root)."""

    def table(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Layout:
    """What a sample sees of the host under bwrap and unshare: read-only binds and symlinks."""

    dirs: tuple[str, ...]
    files: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]
    """(target, path): merged-/usr systems link /bin to usr/bin and so on."""


@functools.cache
def host_layout() -> Layout:
    dirs, symlinks = [], []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            symlinks.append((os.readlink(path), path))
        elif os.path.isdir(path):
            dirs.append(path)
    dirs += [root for root in _outside_system_dirs(_python_roots()) if root not in dirs]
    return Layout(tuple(dirs), tuple(p for p in _SYSTEM_FILES if os.path.isfile(p)), tuple(symlinks))


def _python_roots() -> list[str]:
    """The directories the interpreter and its libraries live in."""
    executable_root = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    return [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, executable_root]


def _outside_system_dirs(paths: list[str]) -> list[str]:
    """The real paths that no system directory or other listed path already contains, shortest first."""
    roots: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths}):
        if not any(path == root or path.startswith(root.rstrip("/") + "/") for root in [*_SYSTEM_DIRS, *roots]):
            roots.append(path)
    return roots


@dataclass(frozen=True)
class Isolation:
    name: str
    prefix: tuple[str, ...]
    """The argv that wraps the checker's command."""
    guarantees: Guarantees
    notes: tuple[str, ...] = field(default=())
    """Why `auto` did not take a stronger mode (set by detect.py)."""

    def wrap(self, argv: list[str]) -> list[str]:
        return [*self.prefix, *argv]

    @property
    def filesystem(self) -> bool:
        return self.guarantees.filesystem

    @property
    def workdir_inside(self) -> str | None:
        """The sample's working directory when the sandbox makes its own; None: a fresh host temp dir."""
        return "/tmp" if self.filesystem else None

    def plan(self, host_dir: str | None, sample_uid: int | None) -> dict:
        """How the checker confines itself and the sample (inside_checker.main reads it)."""
        drop_uid = _root_harness() and self.name != "none"
        return {
            "new_root": host_dir if self.name == "unshare" else None,  # an empty dir to mount the root on
            "layout": _as_dict(host_layout()) if self.name == "unshare" else None,
            "scratch_bytes": SCRATCH_BYTES,
            "workdir": self.workdir_inside or host_dir,
            "sample_uid": sample_uid if drop_uid else None,
            "checker_uid": CHECKER_UID if drop_uid else None,
            "drop_capabilities": self.name == "unshare" and not drop_uid,  # the root of its user namespace
        }

    def warnings(self) -> list[str]:
        """Why `auto` did not take a stronger mode, then what this one leaves unprotected."""
        g, notes = self.guarantees, list(self.notes)
        if not g.filesystem:
            notes.append(
                "the host filesystem is not isolated: a sample can read and write whatever the user "
                "running the harness can"
            )
        if not g.not_root:
            notes.append("a sample runs as root beside the harness: nothing stops one that attacks the machine")
        if not g.network:
            notes.append("the network is not isolated")
        if not g.processes:
            notes.append("no PID namespace: a sample can see and signal the harness user's other processes")
        return notes

    def describe(self) -> dict[str, object]:
        return {"mode": self.name, "guarantees": self.guarantees.table(), "command": list(self.prefix),
                "warnings": self.warnings()}  # fmt: skip


def _as_dict(layout: Layout) -> dict:
    return {"dirs": list(layout.dirs), "files": list(layout.files), "symlinks": [list(s) for s in layout.symlinks]}


def _root_harness() -> bool:
    return os.geteuid() == 0


_sample_numbers = itertools.count()


def next_sample_uid() -> int:
    """A uid for the next sample, cycling through the range (so concurrent samples never share one)."""
    return CHECKER_UID + 1 + next(_sample_numbers) % _SAMPLE_UIDS


def bwrap() -> Isolation | None:
    executable = shutil.which("bwrap")
    if executable is None:
        return None
    layout = host_layout()
    if _root_harness():  # no user namespace: the checker keeps the two capabilities it needs to drop the sample
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                      "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # fmt: skip
    else:
        namespaces = ["--unshare-all", "--cap-drop", "ALL"]
    size = ["--size", str(SCRATCH_BYTES)] if "--size" in _help_text(executable) else []
    mounts = [*size, "--perms", "1777", "--tmpfs", "/tmp"]  # first: Python may live under /tmp
    for target, path in layout.symlinks:
        mounts += ["--symlink", target, path]
    for path in _ancestors([*layout.dirs, *layout.files]):  # bwrap would make them 0700: closed to the sample
        mounts += ["--perms", "0755", "--dir", path]
    for path in layout.dirs:
        mounts += ["--ro-bind", path, path]
    for path in layout.files:
        mounts += ["--ro-bind", path, path]
    mounts += ["--dev", "/dev", "--proc", "/proc", "--remount-ro", "/dev", "--remount-ro", "/"]
    prefix = (executable, *namespaces, "--die-with-parent", "--new-session", *mounts, "--chdir", "/tmp", "--")
    return Isolation("bwrap", prefix, Guarantees(True, True, True, True, True))


def _ancestors(paths: list[str]) -> list[str]:
    """Every proper ancestor directory of the paths but / and /tmp (the scratch tmpfs), parents first."""
    found = {os.path.dirname(path) for path in paths}
    for path in list(found):
        while path not in ("/", ""):
            found.add(path)
            path = os.path.dirname(path)
    return sorted(found - {"/", "", "/tmp"}, key=lambda path: (path.count("/"), path))


def _help_text(executable: str) -> str:
    try:
        shown = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return shown.stdout + shown.stderr


def unshare() -> Isolation | None:
    executable = shutil.which("unshare")
    if executable is None:
        return None
    user = [] if _root_harness() else ["--user", "--map-root-user"]
    prefix = (executable, *user, "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
              "--net", "--ipc", "--uts", "--cgroup", "--")  # fmt: skip
    return Isolation("unshare", prefix, Guarantees(True, True, True, True, True))


def none() -> Isolation:
    root = _root_harness()
    return Isolation("none", (), Guarantees(False, not root, False, False, False))


BUILDERS = {"bwrap": bwrap, "unshare": unshare, "none": none}


def bwrap_version() -> str | None:
    executable = shutil.which("bwrap")
    if executable is None:
        return None
    try:
        return subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
