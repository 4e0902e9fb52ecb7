"""HumanEval-style evaluation harness. Installed as qgpt_code.evals."""
