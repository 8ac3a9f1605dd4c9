"""Hostile input over gRPC: hypothesis builds GenerateRequests with random fields (huge and empty strings, odd
unicode, extreme and non-finite numbers, unknown enum values, oversized messages) and raw bytes that may not
parse at all. No answer may be UNKNOWN, INTERNAL or UNAVAILABLE; after each batch the canary answers as before
and the engine holds no request and no KV block."""
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from support import add_count, assert_clean

pytestmark = pytest.mark.slow

BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
INT32 = st.integers(-2**31, 2**31 - 1)
FLOAT32 = st.floats(width=32)  # NaN and infinities included
# Short text of any valid unicode, empty strings, and long runs (past the prompt and message size limits).
TEXT = st.one_of(st.text(max_size=24), st.just(""),
                 st.builds(lambda ch, n: ch * n, st.sampled_from(["a", "é", "\u200b", "😀", "\x00", " "]),
                           st.sampled_from([1_000, 270_000, 1_500_000])))
SHORT_TEXT = st.text(max_size=24).filter(lambda s: not s.startswith("poison-"))


def _optional(strategy):
    return st.none() | strategy


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    msg = pb.SamplingParams()
    for name, strategy in (("max_tokens", INT32), ("temperature", FLOAT32), ("top_p", FLOAT32), ("top_k", INT32),
                           ("seed", st.integers(-2**63, 2**63 - 1)), ("logprobs", INT32)):
        value = draw(_optional(strategy))
        if value is not None:
            setattr(msg, name, value)
    msg.min_tokens = draw(st.sampled_from([0, 0, 1, 4, -1, 2**31 - 1]))
    msg.ignore_eos = draw(st.booleans())
    msg.include_stop_str_in_output = draw(st.booleans())
    msg.stop.extend(draw(st.lists(TEXT, max_size=20)))
    msg.stop_token_ids.extend(draw(st.lists(INT32, max_size=70)))
    return msg


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=draw(SHORT_TEXT), model=draw(st.sampled_from(["", "", "no-such-model"])),
                             priority=draw(st.sampled_from([0, 1, 2, 3, 4, -7, 2**31 - 1])))
    kind = draw(st.sampled_from(["prompt", "prompt_token_ids", "chat", "none"]))
    if kind == "prompt":
        req.prompt = draw(TEXT)
    elif kind == "prompt_token_ids":
        req.prompt_token_ids.ids.extend(draw(st.lists(st.one_of(st.integers(0, 49_151), INT32), max_size=200)))
    elif kind == "chat":
        roles = st.sampled_from(["user", "assistant", "system", "tool", "", "villain"])
        for role, content in draw(st.lists(st.tuples(roles, TEXT), max_size=6)):
            req.chat.messages.add(role=role, content=content)
    if draw(st.booleans()):
        req.sampling.CopyFrom(draw(sampling_params()))
    req.context.tenant_id = draw(SHORT_TEXT)
    req.context.workflow_id = draw(SHORT_TEXT)
    return req


def _check(call) -> None:
    add_count("gRPC requests fuzzed (hypothesis)", 1)
    try:
        call()
    except grpc.RpcError as e:
        bad = e.code() in BAD_CODES
        add_count("answers that were 5xx / UNKNOWN / INTERNAL / UNAVAILABLE", int(bad))
        assert not bad, f"{e.code().name}: {e.details()}"


def test_random_requests(daemon):
    @given(req=generate_requests(), stream=st.booleans())
    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(req, stream):
        if stream:
            _check(lambda: list(daemon.stub.GenerateStream(req, timeout=120)))
        else:
            _check(lambda: daemon.stub.Generate(req, timeout=120))

    fuzz()
    assert daemon.canary() == daemon.reference
    assert_clean(daemon)


def test_raw_bytes(daemon):
    call = daemon.channel.unary_unary("/frugal.v1.InferenceService/Generate")  # bytes in, bytes out

    @given(data=st.binary(max_size=512))
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(data):
        _check(lambda: call(data, timeout=120))

    fuzz()
    assert daemon.canary() == daemon.reference
    assert_clean(daemon)
