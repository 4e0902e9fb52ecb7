"""The sandbox against hostile samples, in every isolation this machine offers: real processes, no mocks.

Each hostile completion is a body for HumanEval/0 and must end failed or timed out, within bounded time,
leaving the machine as it was: sentinel files, a fake home and a copy of the problems file intact, no process
of the run alive, no cgroup left, no connection made to a TCP or UNIX listener the test opened. A case that
needs a guarantee a mode does not give (the host filesystem under `none`, say) is not run under it: the table
in docs/evals.md lists what each mode guarantees, and test_evals_frauds.py checks that table against the code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from evals_sandbox_helpers import MODES_HERE, REQUIRED, isolation, processes_named, set_traps, tagged

from qgpt_code.evals.data import load_problems
from qgpt_code.evals.sandbox import EVALS_DIR
from qgpt_code.evals.sandbox import FAILED, PASSED, TIMED_OUT, Limits, Sandbox, Trial
from qgpt_code.evals.score import score_file

TIMEOUT_S = 3.0
PROJECT_PROBE = Path(EVALS_DIR).parent / "qgpt-eval-hostile"  # the project tree (or site-packages when installed)


@pytest.fixture(scope="module")
def problem():
    return load_problems()["HumanEval/0"]


def trial(problem, body: str) -> Trial:
    return Trial(problem.code(body), problem.test, problem.entry_point, problem.tests_context)


def test_the_modes_ci_requires_work_here():
    missing = [mode for mode in REQUIRED if mode not in MODES_HERE]
    assert not missing, f"QGPT_EVALS_REQUIRE_ISOLATION asks for {missing}; this machine offers {MODES_HERE}"


def hostile_cases(traps) -> list[tuple[str, str, str | None]]:
    """(name, completion body, the guarantee it needs or None)."""
    keep = traps.sentinels / "keep.txt"
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
        ("delete outside", f"    import shutil\n    shutil.rmtree({str(traps.sentinels)!r})\n", "filesystem"),
        ("write outside", f"    open({str(keep)!r}, 'w').write('overwritten')\n"
                          f"    open({str(traps.sentinels / 'new.txt')!r}, 'w').write('new')\n", "filesystem"),
        ("write home", f"    open({str(traps.home / '.profile')!r}, 'a').write('evil')\n"
                       f"    open({str(traps.home / '.bashrc')!r}, 'w').write('evil')\n", "filesystem"),
        ("rewrite the problems", f"    open({str(traps.problems)!r}, 'wb').write(b'')\n", "filesystem"),
        ("write python prefix", "    import os, sys\n"
                                "    open(os.path.join(sys.prefix, 'qgpt-eval-hostile'), 'w').write('x')\n",
         "filesystem"),
        ("rewrite the checker", f"    open({os.path.join(EVALS_DIR, 'inside_checker.py')!r}, 'a').close()\n",
         "filesystem"),
        ("write the project", f"    open({str(PROJECT_PROBE)!r}, 'w').write('x')\n", "filesystem"),
        ("flood stdout", "    while True:\n        print('x' * 65536)\n", None),
        ("fill the disk", "    for n in range(10 ** 6):\n        open(f'fill{n}', 'wb').write(bytes(8 << 20))\n",
         "filesystem"),
        ("block on stdin", "    return input()\n", None),
        ("network", f"    import socket\n    socket.create_connection(('127.0.0.1', {traps.port}), timeout=2)"
                    ".sendall(b'escaped')\n", "network"),
        ("unix socket", f"    import socket\n    s = socket.socket(socket.AF_UNIX)\n"
                        f"    s.connect({str(traps.unix_path)!r})\n    s.sendall(b'escaped')\n", "unix_sockets"),
        ("leave the cgroup", "    import os, time\n    for root, dirs, files in os.walk('/sys/fs/cgroup'):\n"
                             "        if 'cgroup.procs' in files:\n            try:\n"
                             "                open(os.path.join(root, 'cgroup.procs'), 'w').write(str(os.getpid()))\n"
                             "            except OSError:\n                pass\n"
                             "    if os.fork() == 0:\n        time.sleep(60)\n    return True\n", "cgroups"),
        ("daemon", "    import os, time\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
                   "            time.sleep(60)\n        os._exit(0)\n    return True\n", "processes"),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES_HERE)
def test_hostile_samples_fail_and_leave_the_machine_unharmed(mode, tmp_path):
    chosen = isolation(mode)
    traps = set_traps(tmp_path)
    probe_file = Path(sys.prefix) / "qgpt-eval-hostile"
    claims = chosen.guarantees.table()
    cases = [c for c in hostile_cases(traps) if c[2] is None or claims[c[2]]]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(
        json.dumps({"task_id": "HumanEval/0", "completion": tagged(body, traps.tag)}) + "\n" for _, body, _ in cases
    ))  # fmt: skip

    started = time.monotonic()
    limits = Limits(timeout_s=TIMEOUT_S)
    summary = score_file(samples, tmp_path / "out", problems_path=traps.problems, isolation=chosen, limits=limits,
                         workers=4, progress=False)  # fmt: skip
    elapsed = time.monotonic() - started

    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    outcomes = {name: (r["outcome"], r["detail"]) for (name, _, _), r in zip(cases, results, strict=True)}
    assert all(outcome in (FAILED, TIMED_OUT) for outcome, _ in outcomes.values()), outcomes
    assert not any(r["sandbox_failed"] for r in results) and all(r["tests_isolated"] for r in results)
    assert outcomes["infinite loop"][0] == TIMED_OUT
    assert outcomes["10 GiB allocation"] == (FAILED, "MemoryError")
    assert outcomes["deep recursion"][1].startswith("RecursionError")
    assert outcomes["stack overflow"] == (FAILED, "killed by SIGSEGV")
    assert outcomes["os._exit(0)"] == (FAILED, "exited with status 0 before the tests finished")
    assert outcomes["block on stdin"] == (FAILED, "EOFError: EOF when reading a line")
    assert outcomes["flood stdout"][1].startswith("stdout reached the file size limit")
    if claims["filesystem"]:
        assert outcomes["fill the disk"][1].startswith("OSError: [Errno 28] No space left on device")
        for name in ("delete outside", "write outside", "write home", "rewrite the problems"):
            assert outcomes[name][1].startswith("FileNotFoundError"), outcomes[name]
        for name in ("write python prefix", "rewrite the checker", "write the project"):  # hidden or read-only
            unwritable = ("FileNotFoundError", "OSError: [Errno 30]", "PermissionError: [Errno 13]")
            assert outcomes[name][1].startswith(unwritable), outcomes[name]
    if claims["network"]:
        network = ("OSError: [Errno 101] Network is unreachable", "ConnectionRefusedError: [Errno 111]")
        assert outcomes["network"][1].startswith(network), outcomes["network"]
    assert outcomes["unix socket"][1].startswith("PermissionError: [Errno 13]"), outcomes["unix socket"]
    assert summary["outcomes"]["passed"] == 0 and set(summary["pass_at_k"].values()) == {0.0}
    assert summary["isolation"]["mode"] == mode
    assert (tmp_path / "out" / "report.md").is_file()
    # bounded: a few timeouts in parallel, not one per case in a row, and never hung
    assert elapsed < 4 * TIMEOUT_S + 20, elapsed

    # the machine is unharmed
    written = [path for path in (probe_file, PROJECT_PROBE) if path.exists()]
    for path in written:
        path.unlink()
    assert written == []
    traps.assert_unharmed()
    traps.close()
    with Sandbox(limits, chosen) as sandbox:  # and it still runs samples
        canonical = load_problems()["HumanEval/0"]
        assert sandbox.run(trial(canonical, canonical.canonical_solution)).outcome == PASSED


@pytest.mark.parametrize("mode", MODES_HERE)
def test_the_process_limit_holds(mode, problem):
    """The sample passes only if it cannot have more than `processes` processes at once."""
    tag = f"qgpt-forks-{os.getpid()}"
    forks = f"""
import ctypes, os, time
ctypes.CDLL(None).prctl(15, {tag.encode()[:15]!r}, 0, 0, 0)
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
    with Sandbox(Limits(timeout_s=10, processes=12), isolation(mode)) as sandbox:
        if sandbox.cgroups is None and not sandbox.isolation.guarantees.not_root:
            pytest.skip(f"{mode} has no process limit here ({sandbox.process_limit})")
        code = forks + problem.code(problem.canonical_solution)  # the forks once, before the function
        result = sandbox.run(Trial(code, problem.test, problem.entry_point, problem.tests_context))
    assert result.outcome == PASSED, result.detail
    assert processes_named(tag) == []  # the sleeping children died with the sample


def test_a_sample_passes_only_when_its_tests_ran_to_the_end(problem):
    with Sandbox(Limits(timeout_s=10), isolation(MODES_HERE[0])) as sandbox:
        assert sandbox.run(trial(problem, problem.canonical_solution)).outcome == PASSED
        # the first two assertions pass, then the third call leaves with status 0 in mid-test
        exit_on_third_call = (
            "    import os\n    calls = has_close_elements.__dict__.setdefault('calls', [])\n"
            "    calls.append(1)\n    if len(calls) == 3:\n        os._exit(0)\n"
        )
        early = sandbox.run(trial(problem, exit_on_third_call + problem.canonical_solution))
        assert (early.outcome, early.detail) == (FAILED, "exited with status 0 before the tests finished")
        wrong = sandbox.run(trial(problem, "    return undefined_name\n"))
        assert (wrong.outcome, wrong.detail) == (FAILED, "NameError: name 'undefined_name' is not defined")
        assert sandbox.run(trial(problem, "    return True\n")).detail == "AssertionError"
        broken = sandbox.run(trial(problem, "    return (\n"))
        assert broken.outcome == FAILED and broken.detail.startswith("SyntaxError: '(' was never closed")


@pytest.mark.parametrize("mode", MODES_HERE)
def test_what_the_sample_sees_inside(mode, problem):
    """Limits, stdin, environment, privileges, seccomp and the checker, asserted from inside the sample."""
    chosen = isolation(mode)
    limits = Limits(timeout_s=10, cpu_s=7, memory_bytes=1 << 30, file_size_bytes=1 << 20, processes=12)
    claims = chosen.guarantees
    checks = f"""
    import os, resource, socket, sys
    assert resource.getrlimit(resource.RLIMIT_CPU) == (7, 7)
    assert resource.getrlimit(resource.RLIMIT_AS) == ({1 << 30}, {1 << 30})
    assert resource.getrlimit(resource.RLIMIT_FSIZE) == ({1 << 20}, {1 << 20})
    assert resource.getrlimit(resource.RLIMIT_NPROC) == (12, 12)
    assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
    assert os.read(0, 10) == b""
    assert os.listdir(".") == [], os.listdir(".")
    for fd in os.listdir("/proc/self/fd"):  # stdio, the two pipes to the checker (and listdir's own)
        link = os.readlink("/proc/self/fd/" + fd) if os.path.exists("/proc/self/fd/" + fd) else "closed"
        assert int(fd) <= 2 or link.startswith(("pipe:", "/proc", "closed")), (fd, link)
    allowed = {{"PATH", "HOME", "TMPDIR", "LANG", "PWD", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE",
               "PYTHONIOENCODING"}}
    assert set(os.environ) <= allowed, sorted(os.environ)
    assert os.environ["PYTHONHASHSEED"] == "0" and os.getcwd() == os.environ["HOME"]
    assert {EVALS_DIR!r} not in sys.path and "" not in sys.path
    status = open("/proc/self/status").read()
    assert "NoNewPrivs:\\t1" in status and "Seccomp:\\t2" in status, status
    try:
        socket.socket(socket.AF_UNIX)
    except PermissionError:
        pass
    else:
        raise AssertionError("a UNIX socket was created")
    if {claims.not_root}:
        if {os.geteuid() == 0}:
            assert os.geteuid() != 0  # under a root harness, a uid of its own
        for line in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert line + ":\\t0000000000000000" in status, status
        checker = f"/proc/{{os.getppid()}}/"  # not dumpable, and another uid under a root harness
        for name in ("mem", "environ", "fd"):
            try:
                os.listdir(checker + name) if name == "fd" else open(checker + name, "rb").read(1)
            except PermissionError:
                pass
            else:
                raise AssertionError("the checker's /proc/PID/" + name + " is open to the sample")
"""
    with Sandbox(limits, chosen) as sandbox:
        result = sandbox.run(trial(problem, checks + problem.canonical_solution))
    assert result.outcome == PASSED, result.detail


@pytest.mark.parametrize("mode", [mode for mode in MODES_HERE if mode != "none"])
def test_the_host_seen_from_inside(mode, problem, tmp_path):
    checks = f"""
    import os, socket, sys
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    assert len(pids) <= 3 and os.getpid() in pids, pids  # the namespace's init (bwrap), the checker and this
    assert socket.if_nameindex() == [(1, "lo")]
    for path in ("/home", "/etc/passwd", {str(tmp_path)!r}, "/sys/fs/cgroup", "/dev/sda", "/dev/vda"):
        assert not os.path.exists(path), path
    assert sorted(os.listdir("/dev")) == sorted(set(os.listdir("/dev")) & {{"null", "zero", "full", "random",
        "urandom", "tty", "fd", "stdin", "stdout", "stderr", "pts", "ptmx", "shm", "core"}})
    for path in ("/usr/qgpt-probe", os.path.join(sys.prefix, "qgpt-probe"), {EVALS_DIR!r} + "/qgpt-probe", "/qgpt"):
        try:
            open(path, "w")
        except OSError as error:
            assert error.errno in (2, 13, 30), error  # not there, EACCES or EROFS
        else:
            raise AssertionError(path + " is writable")
    open("/dev/null", "w").write("fine")
    assert os.environ["HOME"] == "/tmp"
"""
    with Sandbox(Limits(timeout_s=10), isolation(mode)) as sandbox:
        result = sandbox.run(trial(problem, checks + problem.canonical_solution))
    assert result.outcome == PASSED, result.detail
