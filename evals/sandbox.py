"""Run one untrusted program in its own fresh Python process, and say whether its tests ran to the end.

Layers, from the outside in:

1. A `sh` wrapper started in a new session (its own process group), which first joins the sample's pids
   cgroup when there is one (see cgroups.py) and then runs the isolation wrapper (see isolation.py). The
   shell waits for its child rather than exec'ing it, so a sample that kills its parent kills only the shell.
2. The isolation wrapper: bubblewrap or unshare namespaces, or nothing.
3. The interpreter, `python -S -P` (no site hooks, nothing from the working directory on sys.path; the
   harness's site-packages folders are appended to sys.path so installed packages stay importable) with a
   scrubbed environment (fixed PYTHONHASHSEED, so set order is
   reproducible) in an empty working directory, running RUNNER below. RUNNER reads the per-run token and the
   program from stdin, points stdin at /dev/null, sets hard resource limits (CPU seconds, address space, file
   size, processes, no core dumps), executes the program, and only when it returns writes the token to a
   private status file descriptor and leaves with os._exit(0).

A sample passed only when the status descriptor holds the token: exiting with 0 early (sys.exit,
os._exit) or closing stdout proves nothing. When the wall-clock limit passes, the whole process group and the
cgroup are killed (with a PID namespace, killing its first process takes every process of the sample along).
The token is meant to catch accidents, not an adversary: code that wants to forge a pass can read it from
the runner's memory. stdout and stderr go to temporary files (bounded by the file-size limit), not pipes.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import site
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from typing import IO

from qgpt_code.evals.cgroups import PidsCgroups, SampleCgroup
from qgpt_code.evals.isolation import Isolation, SandboxError, detect

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"

RUNNER = """\
import os, resource, sys
def _qgpt_eval_sandbox(status_fd, cpu_s, memory, file_size, processes, *site_packages):
    sys.path.extend(site_packages)
    data = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    token, _, source = data.decode("utf-8").partition("\\n")
    for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
    exec(compile(source, "sample.py", "exec"), {})
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(status_fd, token.encode())
    os._exit(0)
_qgpt_eval_sandbox(*map(int, sys.argv[1:6]), *sys.argv[6:])
"""

# $1: the cgroup.procs file to join, or "-"; then the command. Exit 125 says the sandbox failed to start.
_WRAPPER = '[ "$1" = - ] || echo $$ > "$1" || { echo "qgpt-sandbox: cannot join $1" >&2; exit 125; }; shift; "$@"'
_WRAPPER_FAILED = 125
_TAIL_BYTES = 8192


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    """Wall-clock seconds for the whole run, interpreter start-up included."""
    cpu_s: int | None = None
    """CPU seconds (RLIMIT_CPU); None: the timeout rounded up."""
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


@dataclass(frozen=True)
class Execution:
    outcome: str
    """passed, failed or timed out."""
    detail: str
    """Why it did not pass: the exception's last line, the exit status or the limit it hit; "" if passed."""
    duration_s: float


class Sandbox:
    """Runs programs one per call, thread-safe; `with Sandbox(...) as sandbox:` cleans up the cgroups."""

    def __init__(self, limits: Limits = Limits(), isolation: str | Isolation = "auto"):
        self.limits = limits
        self.isolation = detect(isolation) if isinstance(isolation, str) else isolation
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
        if os.geteuid() != 0:
            scope = "in the sandbox's own user namespace" if self.isolation.pid_namespace else "of the whole user"
            return f"RLIMIT_NPROC={self.limits.processes}, counting the processes {scope}"
        return "none (root is exempt from RLIMIT_NPROC and no pids cgroup is writable)"

    def describe(self) -> dict[str, object]:
        return {**self.isolation.describe(), "process_limit": self.process_limit, "limits": self.limits.describe()}

    def run(self, program: str) -> Execution:
        token = secrets.token_hex(16)
        with ExitStack() as stack:
            stdout, stderr, status = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
            cgroup = self._sample_cgroup(stack)
            workdir = self.isolation.workdir_inside or stack.enter_context(
                tempfile.TemporaryDirectory(prefix="qgpt-eval-", ignore_cleanup_errors=True)
            )
            argv = self._argv(status.fileno(), cgroup)
            started = time.monotonic()
            process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, pass_fds=(status.fileno(),),
                cwd=None if self.isolation.workdir_inside else workdir, env=_environment(workdir),
                start_new_session=True,
            )  # fmt: skip
            timed_out = False
            try:
                process.communicate((token + "\n" + program).encode("utf-8"), timeout=self.limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_everything(process, cgroup)
                with suppress(OSError):
                    process.stdin.close()
            duration = time.monotonic() - started
            status.seek(0)
            if status.read(len(token) + 1) == token.encode():
                return Execution(PASSED, "", duration)
            outcome, detail = self._diagnose(process.returncode, timed_out, stdout, stderr)
            return Execution(outcome, detail, duration)

    def _sample_cgroup(self, stack: ExitStack) -> SampleCgroup | None:
        if self.cgroups is None:
            return None
        cgroup = self.cgroups.sample(self.limits.processes)
        stack.callback(cgroup.remove)
        return cgroup

    def _argv(self, status_fd: int, cgroup: SampleCgroup | None) -> list[str]:
        limits = self.limits
        numbers = (status_fd, limits.cpu_seconds, limits.memory_bytes, limits.file_size_bytes, limits.processes)
        python = [sys.executable, "-S", "-P", "-c", RUNNER, *map(str, numbers), *_site_packages()]
        procs = str(cgroup.procs_file) if cgroup is not None else "-"
        return ["/bin/sh", "-c", _WRAPPER, "qgpt-sandbox", procs, *self.isolation.wrap(python)]

    def _diagnose(self, returncode: int, timed_out: bool, stdout: IO[bytes], stderr: IO[bytes]) -> tuple[str, str]:
        if timed_out:
            return TIMED_OUT, f"wall-clock limit of {self.limits.timeout_s:g} s"
        for name, stream in (("stdout", stdout), ("stderr", stderr)):
            if os.fstat(stream.fileno()).st_size >= self.limits.file_size_bytes:
                return FAILED, f"{name} reached the file size limit of {self.limits.file_size_bytes} bytes"
        last_line = _last_line(stderr)
        if returncode == _WRAPPER_FAILED and last_line.startswith("qgpt-sandbox:"):
            raise SandboxError(last_line)
        signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
        if signum == signal.SIGXCPU:
            return TIMED_OUT, f"CPU time limit of {self.limits.cpu_seconds} s"
        if signum:
            return FAILED, f"killed by {_signal_name(signum)}" + (f": {last_line}" if last_line else "")
        if last_line:
            return FAILED, last_line
        return FAILED, f"exited with status {returncode} before the tests finished"


@functools.cache
def _site_packages() -> tuple[str, ...]:
    """The harness's site-packages folders: put on the sample's sys.path without running their .pth hooks."""
    return tuple(path for path in site.getsitepackages() if os.path.isdir(path))


def _environment(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
    }


def _kill_everything(process: subprocess.Popen, cgroup: SampleCgroup | None) -> None:
    """SIGKILL the sample's session and cgroup (stragglers too, after a normal exit), then reap the wrapper."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill_all()
    process.wait()


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
