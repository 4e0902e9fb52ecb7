"""llama.vim and llama.vscode against `/infill`: their exact request bodies, replayed over real HTTP.

The bodies are the plugins' own (ggml-org/llama.vim `autoload/llama.vim`: the ring-buffer warm-up in
`s:ring_update` and the completion in `llama#fim`; llama.vscode sends the same fields, with the cursor
line's text before the cursor as `prompt`). The tiny infilling model checks the protocol (warm-up,
cache reuse, time limit, field filtering); the default model checks what an editor shows.
"""

from __future__ import annotations

import httpx
import pytest
from test_server_support import RunningServer, infill_model, make_engine

from qgpt_code.server.prompting import line_below_indent
from qgpt_code.server.settings import ServerSettings

TIMINGS = ["timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms", "timings/prompt_per_second",
           "timings/predicted_n", "timings/predicted_ms", "timings/predicted_per_token_ms",
           "timings/predicted_per_second"]


def ring_chunks(count: int, lines: int = 24) -> list[dict]:
    """Chunks as llama.vim keeps them: text of whole lines, the time it picked them, the buffer's name."""
    chunks = []
    for c in range(count):
        body = "".join(f"def helper_{c}_{i}(value):\n    return value * {i} + {c}\n" for i in range(lines // 2))
        chunks.append({"text": body, "time": [1733000000 + c, 250000], "filename": f"src/module_{c}.py"})
    return chunks


def warm_up(chunks: list[dict]) -> dict:
    """llama.vim's `s:ring_update` body, field for field."""
    return {"input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "", "n_predict": 0,
            "temperature": 0.0, "stream": False, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 1,
            "t_max_predict_ms": 1, "response_fields": [""]}


def fim(prefix: str, middle: str, suffix: str, chunks: list[dict], n_indent: int, **overrides) -> dict:
    """llama.vim's `llama#fim` body, field for field."""
    body = {"input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": middle,
            "n_predict": 128, "n_indent": n_indent, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1000,
            "response_fields": ["content", *TIMINGS, "truncated", "tokens_cached"]}
    return {**body, **overrides}


@pytest.fixture(scope="module")
def tiny():
    engine = make_engine(infill_model(), max_batch=2, max_seq_len=1024)
    server = RunningServer(engine, ServerSettings(model_id="tiny", infill_budget=900))
    yield server
    server.close()


def post(server, body: dict) -> dict:
    response = httpx.post(f"{server.url}/infill", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_warm_up_is_answered_at_once_with_nothing_and_caches_the_chunks(tiny):
    chunks = ring_chunks(3)
    before = tiny.engine.stats().tokens_computed
    assert post(tiny, warm_up(chunks)) == {}  # response_fields [""] names nothing
    computed = tiny.engine.stats().tokens_computed - before
    whole = post(tiny, {**warm_up(chunks), "response_fields": []})  # the same warm-up, every field
    assert whole["content"] == "" and whole["tokens_predicted"] == 0 and whole["stop_type"] == "limit"
    assert computed == whole["tokens_evaluated"] > 200  # the first computed every prompt token ...
    assert whole["tokens_cached"] == whole["tokens_evaluated"] - 1  # ... the second found all but the last
    assert whole["timings"]["prompt_n"] == 1 and whole["timings"]["predicted_n"] == 0

    prefix = "import math\n\n\ndef area(radius):\n"
    answer = post(tiny, fim(prefix, "    ", "\n\nprint(area(2))\n", chunks, n_indent=4))
    assert set(answer) == {"content", *TIMINGS, "truncated", "tokens_cached"}
    assert answer["tokens_cached"] >= whole["tokens_evaluated"] - 2  # the chunks' tokens were not computed again
    assert answer["timings/prompt_n"] < 64  # only the file around the cursor was
    assert answer["timings/predicted_n"] >= 1


def test_completions_at_other_cursors_reuse_the_chunks_too(tiny):
    chunks = ring_chunks(2, lines=30)
    post(tiny, warm_up(chunks))
    shared = post(tiny, {**warm_up(chunks), "response_fields": ["tokens_evaluated"]})["tokens_evaluated"] - 1
    source = "class Shape:\n    def area(self):\n        return 0\n\n    def name(self):\n        return 'shape'\n"
    for cursor in (len("class Shape:\n"), len(source) - 1, 5):
        prefix, suffix = source[:cursor], source[cursor:]
        line_start = prefix.rfind("\n") + 1
        answer = post(tiny, fim(prefix[:line_start], prefix[line_start:], suffix, chunks, n_indent=0,
                                n_predict=4, response_fields=["tokens_cached"]))
        assert answer["tokens_cached"] >= shared - 2, cursor


def test_time_limit_ends_a_long_generation_soon_after_it_passes(tiny):
    body = fim("def f(x):\n", "    ", "\n", [], n_indent=0, n_predict=900, ignore_eos=True,
               t_max_predict_ms=100, response_fields=[])
    answer = post(tiny, body)
    assert answer["finish_reason"] == "time_limit" and answer["stop_type"] == "limit"
    timings = answer["timings"]
    assert 1 <= timings["predicted_n"] < 900
    assert timings["predicted_ms"] >= 100
    # it stops at the first step that ends past the limit: one step late at most (plus scheduling noise)
    assert timings["predicted_ms"] <= 100 + 3 * timings["predicted_per_token_ms"] + 100


def test_timings_add_up_and_response_fields_pick_nested_values(tiny):
    body = fim("x = 1\n", "y = ", "\n", [], n_indent=0, n_predict=6, temperature=0.0,
               response_fields=["timings/predicted_n", "timings", "stop_type", "no/such/field", "content/x"])
    answer = post(tiny, body)
    assert set(answer) == {"timings/predicted_n", "timings", "stop_type"}
    timings = answer["timings"]
    assert answer["timings/predicted_n"] == timings["predicted_n"]
    assert timings["prompt_n"] + timings["cache_n"] > 0
    if timings["predicted_n"] > 1:
        assert timings["predicted_per_token_ms"] == pytest.approx(timings["predicted_ms"] / timings["predicted_n"])
        assert timings["predicted_per_second"] == pytest.approx(1000 / timings["predicted_per_token_ms"])


def test_llama_vscode_body_gets_the_timings_it_shows(tiny):
    # llama.vscode's createRequestPayload: its defaults, n_indent only when non-zero, no response_fields
    body = {"input_prefix": "def double(x):\n", "input_suffix": "\n", "input_extra": [], "prompt": "    ",
            "n_predict": 8, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "n_indent": 4, "t_max_prompt_ms": 500, "t_max_predict_ms": 500}
    answer = post(tiny, body)
    assert isinstance(answer["content"], str) and answer["stop"] is True
    timings = answer["timings"]
    assert timings["prompt_n"] + timings["cache_n"] == answer["tokens_evaluated"]
    assert timings["predicted_n"] == answer["tokens_predicted"] >= 1
    assert timings["prompt_ms"] > 0 and timings["prompt_per_second"] > 0


def test_llama_cpp_only_fields_are_accepted(tiny):
    body = {**fim("a = 1\n", "", "", [], n_indent=0, n_predict=2), "id_slot": 3, "cache_prompt": False,
            "timings_per_token": True, "samplers": ["dry", "top_k"]}
    assert "content" in post(tiny, body)


@pytest.mark.parametrize("text, n_indent, cut", [
    ("x = 1\n    y = 2\nz = 3\n", 4, "x = 1\n    y = 2\n"),  # the first line is the cursor's: never cut
    ("    a\n\n    b\n  c", 4, "    a\n\n    b\n"),  # blank lines do not end a block
    ("a\n\tb\n c", 1, None),  # a tab and a space count one each
    ("a\n\tb\n c", 2, "a\n"),
    ("a\nb", 0, None),
])
def test_n_indent_cuts_at_the_first_line_indented_less(text, n_indent, cut):
    position = line_below_indent(text, n_indent)
    assert (None if position is None else text[:position]) == cut


@pytest.fixture(scope="module")
def default_server():
    from qgpt_code.checkpoints import load_model
    from qgpt_code.models import default_model_path

    loaded = load_model(default_model_path(), device="cpu", dtype="float32")
    engine = make_engine(loaded, max_batch=2, max_seq_len=2048, rows=4)
    server = RunningServer(engine, ServerSettings(model_id="default"))
    yield server
    server.close()


FUNCTION = "import math\n\n\ndef area_of_circle(radius):\n"
AFTER = "\n\n\ndef main():\n    print(area_of_circle(2.0))\n"


def test_a_cursor_after_the_indent_of_an_empty_body_gets_that_line_continued(default_server):
    # llama.vscode: `prompt` is the cursor line up to the cursor, here its 4-space indent
    answer = post(default_server, fim(FUNCTION, "    ", AFTER, [], n_indent=4, temperature=0.0, n_predict=48,
                                      response_fields=["content"]))
    content = answer["content"]
    assert content and not content[0].isspace(), repr(content)  # goes on after the indent: no newline, no 5th space
    assert "def main" not in content and "def area_of_circle" not in content


def test_n_indent_stops_generation_at_the_dedent(default_server):
    base = fim(FUNCTION, "    ", "\n", [], n_indent=0, temperature=0.0, n_predict=96, response_fields=[])
    free = post(default_server, base)
    cut = post(default_server, {**base, "n_indent": 4})
    assert all(not line.strip() or line.startswith("    ") for line in cut["content"].split("\n")[1:])
    position = line_below_indent(free["content"], 4)
    if position is not None:  # the model left the function: with n_indent it stopped right there
        assert cut["tokens_predicted"] < free["tokens_predicted"]
        assert cut["content"] == free["content"][:position].rstrip()
