"""One-off heavy work runs on a thread that exits, and its result or error comes back unchanged."""

from __future__ import annotations

import threading

import pytest

import qgpt_code.checkpoints as checkpoints
from qgpt_code.errors import CheckpointError
from qgpt_code.fresh_thread import run_in_fresh_thread


def test_result_and_arguments_come_back():
    assert run_in_fresh_thread(lambda a, b: divmod(a, b), 17, b=5) == (3, 2)


def test_the_work_runs_on_another_thread_which_is_gone_afterwards():
    ran_on = run_in_fresh_thread(threading.current_thread)
    assert ran_on is not threading.current_thread()
    assert not ran_on.is_alive()


def test_an_exception_is_raised_in_the_caller_with_its_type():
    def fail():
        raise CheckpointError("no such shard")

    with pytest.raises(CheckpointError, match="no such shard"):
        run_in_fresh_thread(fail)


def test_load_model_builds_on_a_thread_that_exits(tiny_hf, monkeypatch):
    threads = []
    build = checkpoints.build_model

    def recording_build(*args, **kwargs):
        threads.append(threading.current_thread())
        return build(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "build_model", recording_build)
    loaded = checkpoints.load_model(tiny_hf[1], device="cpu", dtype="float32")
    assert loaded.info.format == "hf"
    assert threads and threads[0] is not threading.current_thread() and not threads[0].is_alive()
    with pytest.raises(CheckpointError):  # errors still reach the caller as themselves
        checkpoints.load_model(tiny_hf[1] / "missing", device="cpu")
