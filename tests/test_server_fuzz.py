"""Schemathesis fuzzes every operation of the server's own OpenAPI schema, valid bodies and invalid
ones alike, against the real server: no response may be a 5xx, every body the schema forbids must be
refused, and statuses and content types must be the documented ones."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    status_code_conformance,
)
from test_server_support import RunningServer, make_engine

from qgpt_code.server.settings import ServerSettings

EXAMPLES_PER_OPERATION = 50
CHECKS = [not_a_server_error, negative_data_rejection, status_code_conformance, content_type_conformance]
# 413 is how an over-long body or prompt is refused here; schemathesis' default list lacks it
CONFIG = SchemathesisConfig.from_str("""
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "405", "413", "429"]
""")


@pytest.fixture(scope="module")
def fuzzed_server(tiny_loaded):
    # a 64-token context keeps every generation short, whatever max_tokens and n the fuzzer picks
    server = RunningServer(make_engine(tiny_loaded, max_batch=4, max_queue=64, max_seq_len=64),
                           ServerSettings(model_id="tiny"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json", config=CONFIG)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error(case):
    model = case.body.get("model") if isinstance(case.body, dict) else None
    if isinstance(model, str) and len(model) <= 256:  # a valid name, but hardly ever the served one:
        case.body["model"] = "tiny"  # without this nearly every body is a 404 that goes no deeper
    case.call_and_validate(checks=CHECKS, timeout=60)
