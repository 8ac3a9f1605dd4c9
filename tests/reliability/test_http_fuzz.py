"""Hostile input over HTTP: schemathesis generates requests from the daemon's own OpenAPI schema, valid ones and
(negative mode) ones that break it: wrong types, missing fields, odd unicode, extreme numbers. No answer may be
a 5xx, every error is OpenAI-shaped, and after each batch (one operation, one mode) the canary answers as before
and the engine holds no request and no KV block."""
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from support import add_count, assert_clean

pytestmark = pytest.mark.slow

EXAMPLES = 50  # per operation and mode; each example is one real request
# (method, path, modes): any string is a valid model name, so that path has no negative cases
BATCHES = [(method, path, mode) for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                                                     ("POST", "/v1/outcomes"), ("POST", "/v1/tasks/{task_id}/tool_calls"))
           for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
BATCHES.append(("GET", "/v1/models/{model}", GenerationMode.POSITIVE))


@pytest.fixture(scope="module")
def api_schema(daemon):
    return schemathesis.openapi.from_url(f"{daemon.http_url}/openapi.json")


def _openai_error_shape(ctx, response, case):
    """A 4xx carries {"error": {"message": ...}} and shows no traceback."""
    add_count("HTTP inputs fuzzed (schemathesis)", 1)
    add_count("answers that were 5xx / UNKNOWN / INTERNAL / UNAVAILABLE", int(response.status_code >= 500))
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body.get("error", {}).get("message"), str), body
        assert "Traceback" not in response.text
    return None


@pytest.mark.parametrize("method, path, mode", BATCHES, ids=[f"{p}-{m.value}" for _, p, m in BATCHES])
def test_no_input_breaks_the_server(api_schema, daemon, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(checks=[not_a_server_error, _openai_error_shape], timeout=120)

    fuzz()
    assert daemon.canary() == daemon.reference
    assert daemon.http_canary() == daemon.http_reference
    assert_clean(daemon)
