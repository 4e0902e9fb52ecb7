"""Run one sample against its tests in a fresh sandbox, and say whether the tests ran to the end.

Processes, from the outside in:

1. A `sh` wrapper started in a new session (its own process group), which first joins the sample's pids
   cgroup when there is one (cgroups.py), then runs the isolation wrapper. It waits for its child rather
   than exec'ing it, so a sample that kills its parent kills only the shell.
2. The isolation wrapper: bubblewrap or unshare namespaces, or nothing (isolation.py).
3. The checker, `python -S -P -c _BOOT` with the inside_*.py modules' code on stdin (inside_checker.py):
   confines itself and the sample (inside_confine.py), forks the sample's process, and runs the tests,
   calling the sample's function across a pipe with plain values.
4. The sample's process (inside_candidate.py): runs the sample's code and answers those calls.

Both interpreters get a scrubbed environment (fixed PYTHONHASHSEED, so set order is reproducible), no `site`
hooks (the harness's site-packages folders are appended to sys.path, so installed packages stay importable)
and hard resource limits. A sample passed only when the checker wrote the run's token to its status
descriptor, which the sample never holds. When the wall-clock limit passes, the whole process group and the
cgroup are killed (with a PID namespace, the death of its first process takes every process along).

Whatever a sample does, this module returns an Execution: a sample can only fail itself. A sandbox that did
not start (the checker never wrote "started", so no sample code ran) is reported as such, with the wrapper's
own last line of stderr.
"""

from __future__ import annotations

import ast
import functools
import marshal
import os
import secrets
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, replace
from typing import IO

from qgpt_code.evals.cgroups import PidsCgroups, SampleCgroup
from qgpt_code.evals.inside_wire import frame
from qgpt_code.evals.isolation import Isolation, next_sample_uid

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"
SANDBOX_FAILED = "the sandbox did not start"

# $1: the cgroup.procs file to join, or "-"; then the command.
_WRAPPER = '[ "$1" = - ] || echo $$ > "$1" || { echo "qgpt-sandbox: cannot join $1" >&2; exit 125; }; shift; "$@"'
EVALS_DIR = os.path.dirname(os.path.realpath(__file__))
_INSIDE = ("inside_wire", "inside_confine", "inside_candidate", "inside_checker")  # each after what it imports
# The checker's interpreter starts with this: it loads the modules' code from the first frame on stdin.
_BOOT = """\
import marshal, os, sys
def read(size):
    data = b""
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            raise SystemExit("qgpt-sandbox: the checker's code was cut off")
        data += chunk
    return data
for name, code in marshal.loads(read(int.from_bytes(read(8), "big"))):
    sys.modules[name] = module = type(sys)(name)
    exec(code, module.__dict__)
sys.modules["inside_checker"].main()
"""
_TAIL_BYTES = 8192


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    """Wall-clock seconds for the whole run, interpreter start-up included."""
    cpu_s: int | None = None
    """CPU seconds of each interpreter (RLIMIT_CPU); None: the timeout rounded up."""
    memory_bytes: int = 2 << 30
    """Address space of each process (RLIMIT_AS)."""
    file_size_bytes: int = 16 << 20
    """Largest file a process may write, stdout and stderr included (RLIMIT_FSIZE)."""
    processes: int = 16
    """Processes and threads at once: pids.max of the sample's cgroup, and RLIMIT_NPROC."""

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else max(1, int(-(-self.timeout_s // 1)))

    def describe(self) -> dict[str, object]:
        return {**asdict(self), "cpu_s": self.cpu_seconds}

    def inside(self) -> dict[str, int]:
        return {"cpu_s": self.cpu_seconds, "memory_bytes": self.memory_bytes,
                "file_size_bytes": self.file_size_bytes, "processes": self.processes}  # fmt: skip


@dataclass(frozen=True)
class Trial:
    """One sample against one task's tests."""

    code: str
    """The sample's program: prompt + completion (+ suffix for infilling). Runs in the sample's interpreter."""
    test: str
    """The unit tests, defining `check(candidate)`."""
    entry_point: str
    context: str = ""
    """Trusted code the tests may use (the problem's own prompt, e.g. HumanEval/32's `poly`); checker only."""
    split: bool = True
    """Tests in the checker's interpreter; False: all in the sample's (only for tests that pass non-plain values)."""


@dataclass(frozen=True)
class Execution:
    outcome: str
    """passed, failed or timed out."""
    detail: str
    """Why it did not pass: the exception's last line, the exit status or the limit it hit; "" if passed."""
    duration_s: float
    tests_isolated: bool = True
    """The tests ran in the checker's interpreter; False: in the sample's own (see Trial.split)."""
    sandbox_failed: bool = False
    """The sandbox itself did not start: no sample code ran, and the detail is the wrapper's."""


class Sandbox:
    """Runs trials one per call, thread-safe; `with Sandbox(...) as sandbox:` cleans up the cgroups."""

    def __init__(self, limits: Limits, isolation: Isolation):
        self.limits = limits
        self.isolation = isolation
        self.cgroups = PidsCgroups.create()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()

    @property
    def process_limit(self) -> str:
        """What bounds the number of processes of one sample."""
        if self.cgroups is not None:
            return f"cgroup {'v2' if self.cgroups.v2 else 'v1'} pids.max={self.limits.processes}"
        if os.geteuid() != 0 or self.isolation.guarantees.not_root:
            scope = "its own uid or user namespace" if self.isolation.guarantees.processes else "the whole user"
            return f"RLIMIT_NPROC={self.limits.processes}, counting the processes of {scope}"
        return "none (root is exempt from RLIMIT_NPROC and no pids cgroup is writable)"

    def describe(self) -> dict[str, object]:
        return {**self.isolation.describe(), "process_limit": self.process_limit, "limits": self.limits.describe()}

    def run(self, trial: Trial) -> Execution:
        """The trial's outcome; tests that need it are run a second time in the sample's own process."""
        execution = self._execute(trial)
        if execution is _IN_PROCESS:
            return replace(self._execute(replace(trial, split=False)), tests_isolated=False)
        return execution

    def _execute(self, trial: Trial) -> Execution:
        token = secrets.token_hex(16)
        with ExitStack() as stack:
            stdout, stderr, status = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
            cgroup = self._sample_cgroup(stack)
            host_dir = None
            if self.isolation.name != "bwrap":  # the mount point of unshare's root, or none's working directory
                host_dir = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="qgpt-eval-", ignore_cleanup_errors=True)
                )
            plan = {**self.isolation.plan(host_dir, next_sample_uid()), "preload": _stdlib_imports(trial.context)}
            job = {"token": token, "trial": asdict(trial), "limits": self.limits.inside(),
                   "site_packages": list(_site_packages())}  # fmt: skip
            procs = str(cgroup.procs_file) if cgroup is not None else "-"
            checker = [sys.executable, "-S", "-P", "-c", _BOOT, str(status.fileno())]
            started = time.monotonic()
            process = subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, "qgpt-sandbox", procs, *self.isolation.wrap(checker)],
                stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, pass_fds=(status.fileno(),), cwd=host_dir,
                env=_environment(self.isolation.workdir_inside or host_dir), start_new_session=True,
            )  # fmt: skip
            stdin = _inside_code() + frame(marshal.dumps(plan)) + frame(marshal.dumps(job))
            timed_out = self._wait(process, cgroup, stdin)
            duration = time.monotonic() - started
            started_up, verdict = _read_status(status, token)
            if verdict == "passed":
                return Execution(PASSED, "", duration)
            if verdict == "in-process":
                return _IN_PROCESS
            if not started_up and not timed_out:
                detail = _last_line(stderr) or f"exit status {process.returncode}"
                return Execution(FAILED, f"{SANDBOX_FAILED}: {detail}", duration, sandbox_failed=True)
            checker_says = verdict[len("failed ") :] if verdict and verdict.startswith("failed ") else None
            outcome, detail = self._diagnose(process.returncode, timed_out, checker_says, stdout, stderr)
            return Execution(outcome, detail, duration)

    def _wait(self, process: subprocess.Popen, cgroup: SampleCgroup | None, stdin: bytes) -> bool:
        """Feed the checker, wait for the sandbox to end, kill what is left; True if the deadline came first.

        A timer kills at the deadline, so that the wait blocks and wakes the moment the sandbox exits (Popen's
        own timeout polls with growing sleeps: up to 30 ms lost per sample)."""
        deadline = threading.Event()
        timer = threading.Timer(self.limits.timeout_s, lambda: (deadline.set(), _kill(process, cgroup)))
        timer.start()
        try:
            process.communicate(stdin)
        finally:
            timer.cancel()
            timer.join()
            _kill(process, cgroup)  # stragglers of a sample that finished
            process.wait()
            with suppress(OSError):
                process.stdin.close()
        return deadline.is_set()

    def _sample_cgroup(self, stack: ExitStack) -> SampleCgroup | None:
        if self.cgroups is None:
            return None
        cgroup = self.cgroups.sample(self.limits.processes)
        stack.callback(cgroup.remove)
        return cgroup

    def _diagnose(
        self, returncode: int, timed_out: bool, checker_says: str | None, stdout: IO[bytes], stderr: IO[bytes]
    ) -> tuple[str, str]:
        """Why a started sample did not pass: the limit it hit, else the checker's detail; only when the checker
        itself died, the last line of the output (the sample's, so it can only describe its own failure)."""
        if timed_out:
            return TIMED_OUT, f"wall-clock limit of {self.limits.timeout_s:g} s"
        for name, stream in (("stdout", stdout), ("stderr", stderr)):
            if os.fstat(stream.fileno()).st_size >= self.limits.file_size_bytes:
                return FAILED, f"{name} reached the file size limit of {self.limits.file_size_bytes} bytes"
        signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
        if signum == signal.SIGXCPU or (checker_says or "").startswith("killed by SIGXCPU"):
            return TIMED_OUT, f"CPU time limit of {self.limits.cpu_seconds} s"
        if checker_says:
            return FAILED, checker_says[:300]
        last_line = _last_line(stderr)
        if signum:
            return FAILED, f"the checker was killed by {_signal_name(signum)}" + (f": {last_line}" if last_line else "")
        return FAILED, last_line or f"the checker exited with status {returncode}"


_IN_PROCESS = Execution("", "", 0.0)  # the checker asked for the tests in the sample's process


def _read_status(status: IO[bytes], token: str) -> tuple[bool, str | None]:
    """(the checker started, its verdict: "passed", "in-process", "failed DETAIL" or None)."""
    status.seek(0)
    lines = status.read(8192).decode("utf-8", "replace").splitlines()
    verdict = next((line[len(token) + 1 :] for line in lines if line.startswith(f"{token} ")), None)
    return lines[:1] == ["started"], verdict


@functools.cache
def _inside_code() -> bytes:
    """The first frame for the checker: the inside_*.py modules compiled (once: ~3 ms a sample saved)."""
    modules = []
    for name in _INSIDE:
        path = os.path.join(EVALS_DIR, name + ".py")
        with open(path, encoding="utf-8") as source:
            modules.append((name, compile(source.read(), path, "exec")))
    return frame(marshal.dumps(modules))


@functools.lru_cache(maxsize=1024)
def _stdlib_imports(code: str) -> tuple[str, ...]:
    """The standard-library modules a prompt imports at top level. The checker imports them before it forks
    the sample, which then finds them loaded instead of importing them again (typing: ~8 ms a sample)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return ()
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return tuple(name for name in dict.fromkeys(names) if name.partition(".")[0] in sys.stdlib_module_names)


@functools.cache
def _site_packages() -> tuple[str, ...]:
    """The harness's site-packages folders: put on the sample's sys.path without running their .pth hooks."""
    return tuple(path for path in site.getsitepackages() if os.path.isdir(path))


def _environment(home: str | None) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home or "/",
        "TMPDIR": home or "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
    }


def _kill(process: subprocess.Popen, cgroup: SampleCgroup | None) -> None:
    """SIGKILL the sample's session and cgroup (with a PID namespace, that takes every process in it)."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill_all()


def _last_line(stream: IO[bytes]) -> str:
    """The last non-blank line of a captured stream (for a traceback: the exception), at most 300 chars."""
    stream.seek(0, os.SEEK_END)
    stream.seek(max(0, stream.tell() - _TAIL_BYTES))
    lines = [line.strip() for line in stream.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _signal_name(signum: int) -> str:
    with suppress(ValueError):
        return signal.Signals(signum).name
    return f"signal {signum}"
