"""Generating samples over HTTP against our real server (`create_app` + uvicorn on a free port): at temperature 0
the samples equal the in-process ones, for base, chat and infilling prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("qgpt_code.server.app")

from test_server_support import RunningServer, infill_model, make_engine  # noqa: E402

from qgpt_code.evals.backends import GenerationError, HTTPBackend, normalize_url  # noqa: E402
from qgpt_code.evals.data import load_problems, write_jsonl  # noqa: E402
from qgpt_code.evals.generate import RunSettings, generate_samples, select_tasks  # noqa: E402
from qgpt_code.evals.infill_tasks import load_tasks  # noqa: E402
from qgpt_code.server.settings import ServerSettings  # noqa: E402

MODEL_ID = "tiny-infill"
KEY = "sesame"


@pytest.fixture(scope="module")
def server():
    server = RunningServer(make_engine(infill_model(), max_batch=4), ServerSettings(model_id=MODEL_ID, api_key=KEY))
    yield server
    server.close()


@pytest.fixture(scope="module")
def local(infill_backend):
    return infill_backend


def samples(path: Path) -> dict:
    records = [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
    return {(r["task_id"], r["index"]): (r["completion"], r["raw"], r.get("error")) for r in records}


def run_both(local, server, tasks, mode, task_set, tmp_path, max_tokens):
    settings = RunSettings(task_set, mode, 1, 0.0, 0.95, max_tokens, 0)
    remote = HTTPBackend(server.url + "/v1/", api_key=KEY, concurrency=4)
    assert remote.model == MODEL_ID and remote.identity()["server"] == server.url
    generate_samples(local, tasks, settings, tmp_path / "local", model_key="local", progress=False)
    generate_samples(remote, tasks, settings, tmp_path / "http", model_key="http", progress=False)
    return samples(tmp_path / "local"), samples(tmp_path / "http")


@pytest.mark.parametrize("mode", ["base", "chat"])
def test_humaneval_over_http_equals_in_process(local, server, tmp_path, mode):
    tasks = select_tasks(load_problems(), limit=3)
    here, there = run_both(local, server, tasks, mode, "humaneval", tmp_path, max_tokens=24)
    assert len(here) == 3 and here == there
    assert any(raw for _, raw, _ in here.values())  # the model did write something


def test_infill_over_http_equals_in_process(local, server, tmp_path):
    tasks = select_tasks(load_tasks("single-line"), limit=4, every=7)
    here, there = run_both(local, server, tasks, "infill", "single-line", tmp_path, max_tokens=24)
    assert len(here) == 4 and here == there


def test_prompt_too_long_over_http_is_a_failed_sample(server, tmp_path):
    problem = load_problems()["HumanEval/0"]
    write_jsonl(tmp_path / "long.jsonl", [{**problem.__dict__, "task_id": "Long/0", "prompt": "# pad\n" * 3000}])
    remote = HTTPBackend(server.url, api_key=KEY)
    settings = RunSettings("humaneval", "base", 1, 0.0, 0.95, 4, 0)
    stats = generate_samples(remote, load_problems(tmp_path / "long.jsonl"), settings, tmp_path / "run",
                             model_key="http", progress=False)
    assert stats.errors == 1
    (completion, _, error), = samples(tmp_path / "run").values()
    assert completion == "" and error.startswith(("HTTP 400", "HTTP 413"))  # OpenAI's 400, or our older 413


def test_server_errors_stop_the_run_with_a_clear_message(server):
    with pytest.raises(GenerationError, match="wants an API key"):
        HTTPBackend(server.url)
    with pytest.raises(GenerationError, match="cannot reach"):
        HTTPBackend("http://127.0.0.1:9")  # the discard port: nothing listens
    remote = HTTPBackend(server.url, api_key=KEY, model="another-model")
    request = RunSettings("humaneval", "base", 1, 0.0, 0.95, 4, 0)
    from qgpt_code.evals.generate import plan

    with pytest.raises(GenerationError, match="HTTP 404"):
        remote.generate(plan(select_tasks(load_problems(), limit=1), request)[0])


def test_urls():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "h:8000/v1/"):
        assert normalize_url(url) == "http://h:8000"
