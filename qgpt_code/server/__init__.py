"""OpenAI-compatible HTTP endpoint over the shared Engine (FastAPI + uvicorn)."""
