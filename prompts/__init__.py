"""Prompt construction: Llama 2 dialogs, Code Llama infilling, editor context. Installed as qgpt_code.prompts."""
