"""The one place an HTTP request becomes the engine's own types (`Request`, `SamplingParams`)."""

from __future__ import annotations

from qgpt_code.engine import Request
from qgpt_code.errors import QGPTError
from qgpt_code.generation import SamplingParams
from qgpt_code.server.errors import APIError
from qgpt_code.server.prompting import Prompt
from qgpt_code.server.protocol import SamplingFields
from qgpt_code.server.settings import ServerSettings

SEED_SPACE = 2**64  # torch seeds are 64-bit
# The sampler divides the logits by the temperature in their own dtype: a tiny temperature overflows
# them to inf, the probabilities become NaN and the engine fails the whole batch. Below this, sampling
# is greedy in all but near-ties anyway, so it is made greedy.
MIN_TEMPERATURE = 1e-3


def engine_requests(body: SamplingFields, prompt: Prompt, settings: ServerSettings) -> list[Request]:
    """One engine request per choice of `prompt`. Fields the body leaves out take the server's
    defaults; with a seed, choice i samples with seed + i, so n choices differ yet reproduce."""
    defaults = settings.sampling
    top_logprobs = body.wanted_logprobs()
    seed = defaults.seed if body.seed is None else body.seed
    temperature = defaults.temperature if body.temperature is None else body.temperature
    stop = body.stop_strings()
    keep_going = body.keep_going_past_eos()
    requests = []
    for i in range(body.choices_per_prompt()):
        try:
            params = SamplingParams(
                max_new_tokens=body.max_new_tokens(defaults.max_new_tokens),
                temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
                top_p=body.top_p or defaults.top_p,
                top_k=defaults.top_k if body.top_k is None else body.top_k,
                seed=None if seed is None else (seed + i) % SEED_SPACE,
                stop=defaults.stop if stop is None else stop,
                stop_ids=() if keep_going else prompt.stop_ids,
                logprobs=top_logprobs is not None,
                top_logprobs=top_logprobs or 0,
                ignore_eos=keep_going,
                stop_when=None if keep_going else prompt.stop_when,  # ignore_eos: exactly the budget
                max_generation_seconds=body.generation_time_limit(),
            )
        except QGPTError as exc:  # the protocol's bounds should make this unreachable
            raise APIError(400, str(exc)) from None
        requests.append(Request(prompt.tokens, params, timeout=settings.request_timeout))
    return requests
