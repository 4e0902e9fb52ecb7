"""The sandbox against hostile samples, in every isolation this machine offers: real processes, no mocks.

Each hostile completion is a body for HumanEval/0 and must end failed or timed out, within bounded time,
leaving the machine as it was: sentinel files intact, no sandbox process or cgroup left, no connection
made to a listener the test opened. Cases that need a protection an isolation does not claim (the host
filesystem under `unshare`, say) are not run under it; the docs list what each protects.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from qgpt_code.evals.data import load_problems
from qgpt_code.evals.isolation import MODES, SandboxError, available, detect
from qgpt_code.evals.sandbox import FAILED, PASSED, RUNNER, TIMED_OUT, Limits, Sandbox
from qgpt_code.evals.score import score_file

TIMEOUT_S = 3.0
MODES_HERE = [mode for mode in MODES[1:] if available(mode) is not None]
RUNNER_MARKER = RUNNER.split("def ", 1)[1].split("(", 1)[0]  # the function name in every sandbox's argv


@pytest.fixture(scope="module")
def problem():
    return load_problems()["HumanEval/0"]


def sandbox_processes() -> list[int]:
    """Live processes running the sandbox runner (what a sample could leave behind)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if RUNNER_MARKER.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def run_cgroups() -> list[str]:
    roots = [Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")]
    return [p.name for root in roots if root.is_dir() for p in root.glob(f"qgpt-eval-{os.getpid()}-*")]


def hostile_cases(sentinel_dir: Path, port: int) -> list[tuple[str, str, str | None]]:
    """(name, completion body, the protection it needs or None)."""
    keep = sentinel_dir / "keep.txt"
    return [
        ("infinite loop", "    while True:\n        pass\n", None),
        ("fork bomb", "    import os\n    while True:\n        try:\n            os.fork()\n"
                      "        except OSError:\n            pass\n", "processes"),
        ("10 GiB allocation", "    block = bytearray(10 * 1024 ** 3)\n    return len(block) > 0\n", None),
        ("deep recursion", "    def down(n):\n        return down(n + 1)\n    return down(0)\n", None),
        ("stack overflow", "    import sys\n    sys.setrecursionlimit(10 ** 9)\n    class Deep:\n"
                           "        def __getattr__(self, name):\n            return getattr(self, name)\n"
                           "    return Deep().anything\n", None),
        ("os._exit(0)", "    import os\n    os._exit(0)\n", None),
        ("sys.exit(0)", "    raise SystemExit(0)\n", None),
        ("kill parent", "    import os\n    os.kill(os.getppid(), 9)\n", None),
        ("delete outside", f"    import shutil\n    shutil.rmtree({str(sentinel_dir)!r})\n", "filesystem"),
        ("write outside", f"    open({str(keep)!r}, 'w').write('overwritten')\n"
                          f"    open({str(sentinel_dir / 'new.txt')!r}, 'w').write('new')\n", "filesystem"),
        ("write python prefix", "    import os, sys\n"
                                "    open(os.path.join(sys.prefix, 'qgpt-eval-hostile'), 'w').write('x')\n",
         "filesystem"),
        ("flood stdout", "    while True:\n        print('x' * 65536)\n", None),
        ("fill the disk", "    for n in range(10 ** 6):\n        open(f'fill{n}', 'wb').write(bytes(8 << 20))\n",
         "filesystem"),
        ("block on stdin", "    return input()\n", None),
        ("network", f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)"
                    ".sendall(b'escaped')\n", "network"),
    ]  # fmt: skip


def protects(sandbox: Sandbox, protection: str | None) -> bool:
    if protection == "filesystem":
        return sandbox.isolation.filesystem
    if protection == "network":
        return sandbox.isolation.network
    if protection == "processes":
        return sandbox.cgroups is not None or (os.geteuid() != 0 and sandbox.isolation.pid_namespace)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES_HERE)
def test_hostile_samples_fail_and_leave_the_machine_unharmed(mode, tmp_path):
    sentinel_dir = tmp_path / "sentinels"
    sentinel_dir.mkdir()
    (sentinel_dir / "keep.txt").write_text("original")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    probe_file = Path(sys.prefix) / "qgpt-eval-hostile"
    limits = Limits(timeout_s=TIMEOUT_S)
    with Sandbox(limits, mode) as sandbox:
        cases = [c for c in hostile_cases(sentinel_dir, listener.getsockname()[1]) if protects(sandbox, c[2])]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": "HumanEval/0", "completion": c[1]}) + "\n" for c in cases))

    started = time.monotonic()
    summary = score_file(samples, tmp_path / "out", isolation=mode, limits=limits, workers=4, progress=False)
    elapsed = time.monotonic() - started

    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    outcomes = {name: (r["outcome"], r["detail"]) for (name, _, _), r in zip(cases, results, strict=True)}
    assert all(outcome in (FAILED, TIMED_OUT) for outcome, _ in outcomes.values()), outcomes
    assert outcomes["infinite loop"][0] == TIMED_OUT
    assert outcomes["10 GiB allocation"] == (FAILED, "MemoryError")
    assert outcomes["deep recursion"][1].startswith("RecursionError")
    assert outcomes["os._exit(0)"] == (FAILED, "exited with status 0 before the tests finished")
    assert outcomes["block on stdin"] == (FAILED, "EOFError: EOF when reading a line")
    if "--size" in summary["isolation"]["command"]:  # a bounded scratch tmpfs
        assert outcomes["fill the disk"][1].startswith("OSError: [Errno 28] No space left on device")
    assert summary["outcomes"]["passed"] == 0 and set(summary["pass_at_k"].values()) == {0.0}
    assert summary["isolation"]["mode"] == mode
    # bounded: a few timeouts in parallel, not one per case in a row, and never hung
    assert elapsed < 4 * TIMEOUT_S + 20, elapsed

    # the machine is unharmed
    assert (sentinel_dir / "keep.txt").read_text() == "original"
    assert sorted(p.name for p in sentinel_dir.iterdir()) == ["keep.txt"]
    wrote_into_python = probe_file.exists()
    if wrote_into_python:
        probe_file.unlink()
    assert not wrote_into_python
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    assert sandbox_processes() == []
    assert run_cgroups() == []
    with Sandbox(limits, mode) as sandbox:  # and it still runs samples
        canonical = load_problems()["HumanEval/0"]
        assert sandbox.run(canonical.program(canonical.canonical_solution)).outcome == PASSED


@pytest.mark.parametrize("mode", MODES_HERE)
def test_the_process_limit_holds(mode, problem):
    """The sample passes only if it cannot have more than `processes` processes at once."""
    forks = """
import os, time
children = 0
try:
    for _ in range(64):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError:
    pass
assert 0 < children < 12, children
"""
    with Sandbox(Limits(timeout_s=10, processes=12), mode) as sandbox:
        if not protects(sandbox, "processes"):
            pytest.skip(f"{mode} claims no process limit here ({sandbox.process_limit})")
        result = sandbox.run(forks + problem.program(problem.canonical_solution))
    assert result.outcome == PASSED, result.detail
    assert sandbox_processes() == []  # the sleeping children died with the sample


def test_a_sample_passes_only_when_its_tests_ran_to_the_end(problem):
    with Sandbox(Limits(timeout_s=10)) as sandbox:
        assert sandbox.run(problem.program(problem.canonical_solution)).outcome == PASSED
        # the first two assertions pass, then the third call leaves with status 0 in mid-test
        exit_on_third_call = (
            "    import os\n    calls = has_close_elements.__dict__.setdefault('calls', [])\n"
            "    calls.append(1)\n    if len(calls) == 3:\n        os._exit(0)\n"
        )
        early = sandbox.run(problem.program(exit_on_third_call + problem.canonical_solution))
        assert (early.outcome, early.detail) == (FAILED, "exited with status 0 before the tests finished")
        wrong = sandbox.run(problem.program("    return undefined_name\n"))
        assert (wrong.outcome, wrong.detail) == (FAILED, "NameError: name 'undefined_name' is not defined")
        assert sandbox.run(problem.program("    return True\n")).detail == "AssertionError"


def test_what_the_sample_sees_inside(problem):
    """Limits, stdin, environment and working directory, asserted from inside the sandbox."""
    limits = Limits(timeout_s=10, cpu_s=7, memory_bytes=1 << 30, file_size_bytes=1 << 20, processes=12)
    checks = f"""
    import os, resource, sys
    assert resource.getrlimit(resource.RLIMIT_CPU) == (7, 7)
    assert resource.getrlimit(resource.RLIMIT_AS) == ({1 << 30}, {1 << 30})
    assert resource.getrlimit(resource.RLIMIT_FSIZE) == ({1 << 20}, {1 << 20})
    assert resource.getrlimit(resource.RLIMIT_NPROC) == (12, 12)
    assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
    assert os.read(0, 10) == b""
    assert os.listdir(".") == [], os.listdir(".")
    allowed = {{"PATH", "HOME", "TMPDIR", "LANG", "PWD", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE",
               "PYTHONIOENCODING"}}
    assert set(os.environ) <= allowed, sorted(os.environ)
    assert os.environ["PYTHONHASHSEED"] == "0" and os.getcwd() == os.environ["HOME"]
"""
    with Sandbox(limits) as sandbox:
        result = sandbox.run(problem.program(checks + problem.canonical_solution))
    assert result.outcome == PASSED, result.detail


@pytest.mark.skipif("bwrap" not in MODES_HERE, reason="bubblewrap is not installed or cannot run here")
def test_bwrap_isolation_seen_from_inside(problem):
    checks = """
    import os, socket
    assert os.getpid() <= 3, os.getpid()
    assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, os.getpid()]
    assert socket.if_nameindex() == [(1, "lo")]
    assert not os.path.exists("/home") and not os.path.exists("/work") and not os.path.exists("/etc/shadow")
    for path in ("/usr/qgpt-probe", os.path.join(__import__("sys").prefix, "qgpt-probe")):
        try:
            open(path, "w")
        except OSError as error:
            assert error.errno == 30, error  # EROFS: read-only
        else:
            raise AssertionError(path + " is writable")
    status = open("/proc/self/status").read()
    assert "CapEff:\\t0000000000000000" in status and "NoNewPrivs:\\t1" in status
"""
    with Sandbox(Limits(timeout_s=10), "bwrap") as sandbox:
        result = sandbox.run(problem.program(checks + problem.canonical_solution))
    assert result.outcome == PASSED, result.detail


def test_isolation_is_detected_and_described():
    if MODES_HERE[0] == "none" and os.geteuid() == 0:
        with pytest.raises(SandboxError, match="refusing to run untrusted samples as root"):
            detect("auto")
        return
    isolation = detect("auto")
    assert isolation.name == MODES_HERE[0]  # the strongest that works
    with Sandbox(Limits(), isolation) as sandbox:
        description = sandbox.describe()
    assert description["mode"] == isolation.name
    assert description["limits"]["cpu_s"] == 10
    assert description["warnings"] == isolation.warnings()
    assert ("filesystem" in " ".join(description["warnings"])) != isolation.filesystem
    with pytest.raises(SandboxError, match="unknown isolation"):
        detect("chroot")
