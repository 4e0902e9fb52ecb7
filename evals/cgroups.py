"""Per-sample pids cgroups: a process-count limit that holds even when the harness runs as root.

RLIMIT_NPROC counts processes per user and is not enforced for root at all, so a fork bomb run by a root
harness is held only by the kernel's pids controller. This module finds a pids hierarchy it may write to
(cgroup v1's `pids` mount, or the root of a cgroup v2 mount that offers `pids`), makes one directory for the
harness run and one child per sample with `pids.max` set, and kills and removes the child afterwards.
(A child is not reused: the kernel charges a process to pids.current until it is reaped, and bubblewrap's
namespace init is reaped by the machine's init, sometimes late.)
Without such a hierarchy (no root, or a v2 host without delegation) `PidsCgroups.create()` returns None.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of the cgroup mounts in /proc/self/mountinfo."""
    found = []
    with suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as stream:
        for line in stream:
            fields, _, tail = line.partition(" - ")
            fstype, _source, options = (tail.split() + ["", ""])[:3]
            if fstype in ("cgroup", "cgroup2"):
                parts = fields.split()
                found.append((fstype, parts[3], parts[4], set(options.split(","))))
    return found


def _own_v1_path(controller: str) -> str | None:
    with suppress(OSError), open("/proc/self/cgroup", encoding="utf-8") as stream:
        for line in stream:
            _hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return path
    return None


def _candidate_dirs() -> list[tuple[Path, bool]]:
    """(directory under which to create the run's cgroup, is cgroup v2) to try, best first."""
    candidates = []
    for fstype, root, mount_point, options in _mounts():
        if fstype == "cgroup" and "pids" in options:
            own = _own_v1_path("pids")
            if own is not None and (own + "/").startswith(root.rstrip("/") + "/"):
                candidates.append((Path(mount_point + own[len(root.rstrip("/")) :]), False))
        elif fstype == "cgroup2" and root == "/":
            candidates.append((Path(mount_point), True))
    return candidates


@dataclass
class SampleCgroup:
    path: Path
    v2: bool

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def members(self) -> list[int]:
        with suppress(OSError):
            return [int(pid) for pid in self.procs_file.read_text().split()]
        return []

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, again until none is left (new forks are capped by pids.max)."""
        if self.v2:
            with suppress(OSError):
                (self.path / "cgroup.kill").write_text("1")
        for _ in range(400):
            pids = self.members()
            if not pids:
                return
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(200):  # exiting processes leave the cgroup a moment after SIGKILL
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


class PidsCgroups:
    """The cgroup of one harness run; `sample(max_pids)` makes a child for one sample."""

    def __init__(self, path: Path, v2: bool):
        self.path = path
        self.v2 = v2
        self._names = itertools.count()

    @classmethod
    def create(cls) -> PidsCgroups | None:
        for parent, v2 in _candidate_dirs():
            path = parent / f"qgpt-eval-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                path.mkdir()
            except OSError:
                continue
            try:
                if v2:
                    if "pids" not in (path / "cgroup.controllers").read_text().split():
                        raise OSError("no pids controller here")
                    (path / "cgroup.subtree_control").write_text("+pids")
                cgroups = cls(path, v2)
                cgroups.sample(1).remove()  # prove that children can be made and limited
                return cgroups
            except OSError:
                with suppress(OSError):
                    path.rmdir()
        return None

    def sample(self, max_pids: int) -> SampleCgroup:
        child = SampleCgroup(self.path / f"s{next(self._names)}", self.v2)
        child.path.mkdir()
        try:
            (child.path / "pids.max").write_text(str(max_pids))
        except OSError:
            child.remove()
            raise
        return child

    def close(self) -> None:
        with suppress(OSError):
            self.path.rmdir()
