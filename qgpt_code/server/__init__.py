"""OpenAI-compatible HTTP endpoint over the shared Engine (FastAPI + uvicorn).

  command     `qgpt serve` (argparse only at import time)
  settings    ServerSettings: served name, API key, defaults, limits
  app         create_app(engine, settings): the routes
  protocol    request bodies (pydantic, every field bounded)
  prompting   bodies to prompt tokens, through prompts/
  convert     engine_requests: the one place a body becomes the engine's Request/SamplingParams
  jobs        one request's generations, submitted, merged and cancelled together
  responses   OpenAI and llama.cpp response shapes, whole and streamed
  streaming   server-sent events; cancelling when the client goes away
  middleware  API key and body-size limit (plain ASGI)
  metrics     Prometheus metrics, one registry per app
  errors      OpenAI-shaped errors and their statuses

Nothing is imported here, so `qgpt --help` stays instant; import `qgpt_code.server.app` for create_app.
"""
