"""The event loop never waits on a prompt: while huge prompts are tokenized, `/health` still answers at once.

Prompt building (tokenizing 1,000,000 characters takes this tiny SentencePiece model about 0.1 s, and
more for byte-level BPE vocabularies) runs on the app's prompt threads; on the event loop, eight such
requests stalled every other request for about a second.
"""

from __future__ import annotations

import threading
import time

import httpx
from test_server_support import ServeProcess, infill_model

HEALTH_BUDGET = 0.1  # seconds: the bound for /health while a 1M-character prompt is tokenized
HUGE = ("def handler(event, context):\n    return event['value'] * 2\n\n" * 20_000)[:1_000_000]


def test_health_answers_while_huge_prompts_are_tokenized():
    server = ServeProcess(infill_model().info.path, "--max-batch", "2", "--cache-bytes", "64M")
    answers: list[httpx.Response] = []

    def huge_request(i: int) -> None:
        # each differs from the start, so no cached prefix shortens the work
        body = {"prompt": f"# request {i}\n" + HUGE[: 1_000_000 - 20], "max_tokens": 1}
        answers.append(httpx.post(f"{server.url}/v1/completions", json=body, timeout=120))

    senders = [threading.Thread(target=huge_request, args=(i,)) for i in range(8)]
    latencies = []
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            client.get("/health")  # connected before the load starts
            for sender in senders:
                sender.start()
            while any(sender.is_alive() for sender in senders):
                started = time.monotonic()
                assert client.get("/health").json()["status"] == "ok"
                latencies.append(time.monotonic() - started)
                time.sleep(0.01)
    finally:
        for sender in senders:
            sender.join(timeout=120)
        server.close()
    assert len(answers) == 8
    for answer in answers:  # each was tokenized to the end: ~600k tokens do not fit the 1,024-token context
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
        assert answer.json()["error"]["n_prompt_tokens"] > 100_000
    assert len(latencies) >= 5, latencies
    assert max(latencies) < HEALTH_BUDGET, sorted(latencies)[-5:]
