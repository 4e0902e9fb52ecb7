"""Choosing the isolation: `auto` takes bubblewrap, falls back to unshare and says why, refuses to run samples
with neither unless `--isolation none` is asked for by name, and a mode that does not work says why. Real
subprocesses: bubblewrap is hidden from `qgpt eval` by the PATH it runs with, or made to fail for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from evals_sandbox_helpers import MODES_HERE

from qgpt_code.evals import detect as detection
from qgpt_code.evals.data import load_problems, write_jsonl
from qgpt_code.evals.isolation import BUILDERS, SandboxError, bwrap
from qgpt_code.evals.sandbox import Limits, Sandbox

PROBLEMS = load_problems()


def canonical_samples(path: Path, count: int = 3) -> Path:
    write_jsonl(path, ({"task_id": p.task_id, "completion": p.canonical_solution}
                       for p in list(PROBLEMS.values())[:count]))  # fmt: skip
    return path


def bin_without(tmp_path: Path, *hidden: str) -> str:
    """A PATH holding only the sandbox's tools, minus `hidden`."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bwrap", "unshare"):
        found = shutil.which(tool)
        if found and tool not in hidden:
            (folder / tool).symlink_to(found)
    return str(folder)


def qgpt_eval(*args: str, path: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, "-m", "qgpt_code.evals", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)  # fmt: skip


@pytest.mark.skipif("unshare" not in MODES_HERE, reason="unshare does not work here")
def test_without_bubblewrap_auto_falls_back_to_unshare_and_says_so(tmp_path):
    samples = canonical_samples(tmp_path / "samples.jsonl")
    out = qgpt_eval("score", str(samples), "--no-progress", path=bin_without(tmp_path, "bwrap"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "warning: not using bwrap: bubblewrap is not installed (apt-get install bubblewrap)" in out.stderr
    assert "sandbox: unshare" in out.stdout and "3 passed" in out.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["isolation"]["mode"] == "unshare"


def test_without_filesystem_isolation_auto_refuses_and_none_must_be_named(tmp_path):
    samples = canonical_samples(tmp_path / "samples.jsonl", count=1)
    path = bin_without(tmp_path, "bwrap", "unshare")
    refused = qgpt_eval("score", str(samples), "--no-progress", path=path, cwd=tmp_path)
    assert refused.returncode == 1
    assert "refusing to run untrusted samples without filesystem isolation" in refused.stderr
    assert "bwrap: bubblewrap is not installed" in refused.stderr and "unshare: util-linux" in refused.stderr
    assert not (tmp_path / "results.jsonl").exists()
    report = qgpt_eval("sandbox", path=path, cwd=tmp_path)
    assert report.returncode == 1 and "none: works" in report.stdout and "auto: refuses" in report.stdout
    named = qgpt_eval("score", str(samples), "--no-progress", "--isolation", "none", path=path, cwd=tmp_path)
    assert named.returncode == 0, named.stderr
    assert "warning: the host filesystem is not isolated" in named.stderr and "1 passed" in named.stdout


def test_a_mode_that_does_not_work_says_why(monkeypatch):
    """bubblewrap installed but failing (here: handed an option it does not know) is reported with its stderr."""
    executable = shutil.which("bwrap")
    if executable is None:
        pytest.skip("bubblewrap is not installed")
    real = bwrap()
    broken = type(real)(real.name, (executable, "--no-such-option", *real.prefix[1:]), real.guarantees)
    monkeypatch.setitem(BUILDERS, "bwrap", lambda: broken)
    detection.probe.cache_clear()
    try:
        with pytest.raises(SandboxError, match="--isolation bwrap: it does not work here: .*no-such-option"):
            detection.detect("bwrap")
        if "unshare" in MODES_HERE:
            chosen = detection.detect("auto")
            assert chosen.name == "unshare"
            assert any("not using bwrap: it does not work here" in note for note in chosen.warnings())
    finally:
        detection.probe.cache_clear()
    with pytest.raises(SandboxError, match="unknown isolation 'chroot'"):
        detection.detect("chroot")


@pytest.mark.parametrize("mode", [mode for mode in MODES_HERE if mode in ("bwrap", "unshare")])
def test_an_interpreter_under_tmp_works(mode, tmp_path):
    """A virtual environment in /tmp: the sandbox's private /tmp is mounted before the interpreter's binds."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    samples = canonical_samples(tmp_path / "samples.jsonl", count=2)
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "qgpt_code.evals", "score", str(samples), "--isolation", mode,
         "--no-progress"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "2 passed" in out.stdout
    if mode == "bwrap":  # bound after the tmpfs at /tmp
        command = json.loads((tmp_path / "summary.json").read_text())["isolation"]["command"]
        assert command.index(str(venv)) > command.index("/tmp")


def test_isolation_is_detected_and_described():
    if not any(mode in MODES_HERE for mode in ("bwrap", "unshare")):
        with pytest.raises(SandboxError, match="refusing to run untrusted samples"):
            detection.detect("auto")
        return
    isolation = detection.detect("auto")
    assert isolation.name == [mode for mode in MODES_HERE if mode != "none"][0]  # the strongest that works
    with Sandbox(Limits(), isolation) as sandbox:
        description = sandbox.describe()
    assert description["mode"] == isolation.name and description["limits"]["cpu_s"] == 10
    assert description["guarantees"] == isolation.guarantees.table() and all(description["guarantees"].values())
    assert description["warnings"] == isolation.warnings()
    assert "the host filesystem is not isolated" in " ".join(BUILDERS["none"]().warnings())


NON_ROOT_RUN = """
import json, sys
from qgpt_code.evals.detect import probe
from qgpt_code.evals.sandbox import Limits, Sandbox, Trial
results = {}
for mode, trials in json.load(sys.stdin).items():
    with Sandbox(Limits(timeout_s=20), probe(mode)) as sandbox:
        results[mode] = {name: sandbox.run(Trial(**trial)).outcome for name, trial in trials.items()}
print(json.dumps(results))
"""
SEEN_WITHOUT_ROOT = """
    import ctypes, os
    status = open("/proc/self/status").read()
    for line in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert line + ":\\t0000000000000000" in status, status
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mount(None, b"/usr", None, 32 | 4096, None) != 0  # MS_REMOUNT | MS_BIND: refused
    assert libc.umount2(b"/usr", 2) != 0
    for path in ("/usr/qgpt-probe", os.path.join({evals!r}, "qgpt-probe")):
        try:
            open(path, "w")
        except OSError:
            pass
        else:
            raise AssertionError(path + " is writable")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK) or not shutil.which("setpriv"),
                    reason="needs root (to become another user), /usr/bin/python3 and setpriv")  # fmt: skip
def test_a_non_root_harness(tmp_path):
    """The user-namespace paths: the harness as `nobody`, with the system's Python and this package's files."""
    modes = [mode for mode in MODES_HERE if mode in ("bwrap", "unshare")]
    if not modes:
        pytest.skip("neither bwrap nor unshare works here")
    from qgpt_code.evals.sandbox import EVALS_DIR

    root = Path(tempfile.mkdtemp(prefix="qgpt-nonroot-", dir="/tmp"))
    try:
        package = root / "qgpt_code"
        package.mkdir(parents=True)
        for name in ("__init__.py", "errors.py"):
            shutil.copy(Path(EVALS_DIR).parent / "qgpt_code" / name, package / name)
        (package / "evals").symlink_to(EVALS_DIR)
        for path in (root, package, *package.iterdir()):
            path.chmod(0o755)
        problem = PROBLEMS["HumanEval/0"]

        def trial(body: str) -> dict:
            code = problem.code(body)
            return {"code": code, "test": problem.test, "entry_point": problem.entry_point,
                    "context": problem.tests_context}  # fmt: skip

        trials = {
            "canonical": trial(problem.canonical_solution),
            "wrong": trial("    return True\n"),
            "seen inside": trial(SEEN_WITHOUT_ROOT.format(evals=EVALS_DIR) + problem.canonical_solution),
        }
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", NON_ROOT_RUN],
            input=json.dumps({mode: trials for mode in modes}), capture_output=True, text=True, timeout=300,
            cwd=root, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        expected = {"canonical": "passed", "wrong": "failed", "seen inside": "passed"}
        assert json.loads(out.stdout) == {mode: expected for mode in modes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
