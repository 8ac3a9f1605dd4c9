"""The proto contract: generated code is fresh, and requests convert to engine arguments with field-named errors."""
import filecmp

import pytest

from scheduler import Priority
from serving.limits import RequestLimits
from serving.rpc import codegen, convert
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb


def test_generated_code_is_fresh(tmp_path):
    """Fails when a proto was edited without `make proto` (or with another grpcio-tools version)."""
    fresh = {p.relative_to(tmp_path) for p in codegen.generate(tmp_path)}
    committed = {p.relative_to(codegen.GEN_DIR) for p in codegen.GEN_DIR.rglob("*.py*")
                 if p.suffix in (".py", ".pyi")}
    assert fresh == committed, "run `make proto`: the set of generated files differs"
    stale = [str(p) for p in sorted(fresh) if not filecmp.cmp(tmp_path / p, codegen.GEN_DIR / p, shallow=False)]
    assert not stale, f"run `make proto`: stale generated files {stale}"


def test_the_api_is_versioned():
    assert pb.DESCRIPTOR.package == "frugal.v1"
    assert set(pb.DESCRIPTOR.services_by_name) == {"InferenceService", "DebugService"}


class _Tokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [len(w) for w in text.split()]})()

    def decode(self, ids):
        return f"<{ids[0]}>"


LIMITS = RequestLimits()


def _engine_request(request: pb.GenerateRequest, prompt_ids=(1,)):
    return convert.engine_request(convert.check_request(request, LIMITS), list(prompt_ids))


def test_request_defaults():
    req = _engine_request(pb.GenerateRequest(prompt="hi"), [7, 8])
    assert req.prompt == {"prompt": "hi", "prompt_token_ids": [7, 8]} and req.req_id.startswith("grpc-")
    assert req.params.max_tokens == convert.DEFAULT_MAX_TOKENS and req.params.temperature == 1.0
    assert req.params.top_p == 1.0 and req.params.seed is None and req.params.logprobs is None
    assert req.priority == Priority.STANDARD


def test_caller_from_metadata_and_context():
    ctx = pb.RequestContext(api_key="frg_a_b", workflow_id="wf", task_id="t1", tenant_id="acme")
    caller = convert.caller(ctx, [("authorization", "Bearer frg_x_y")])
    assert (caller.api_key, caller.workflow_id, caller.task_id, caller.on_behalf_of) == ("frg_x_y", "wf", "t1", "acme")
    assert convert.caller(ctx, []).api_key == "frg_a_b"  # no metadata: the context's key
    caller = convert.caller(pb.RequestContext(), [("x-frugal-task-id", "t9"), ("x-frugal-sensitivity", "private")])
    assert (caller.task_id, caller.sensitivity, caller.api_key) == ("t9", "private", None)
    with pytest.raises(ValueError, match="context.sensitivity"):
        convert.caller(pb.RequestContext(sensitivity="secret"), [])


def test_request_inputs_and_priorities():
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="abc de")])
    checked = convert.check_request(pb.GenerateRequest(chat=chat), LIMITS)
    assert checked.messages == [{"role": "user", "content": "abc de"}]
    assert convert.engine_request(checked, [3, 2]).prompt == {"prompt": None, "prompt_token_ids": [3, 2]}
    for wire, expected in [(pb.PRIORITY_INTERACTIVE, Priority.INTERACTIVE), (pb.PRIORITY_BATCH, Priority.BATCH),
                           (pb.PRIORITY_UNSPECIFIED, Priority.STANDARD)]:
        assert _engine_request(pb.GenerateRequest(prompt="x", priority=wire)).priority == expected
    sampling = pb.SamplingParams(max_tokens=9, temperature=0.0, top_k=-1, seed=3, stop=["\n"], logprobs=0)
    params = _engine_request(pb.GenerateRequest(prompt="x", sampling=sampling)).params
    assert (params.max_tokens, params.greedy, params.top_k, params.seed, params.stop, params.logprobs) == \
        (9, True, 0, 3, ["\n"], 0)


@pytest.mark.parametrize("request_kwargs, message", [
    ({"prompt": "x", "sampling": pb.SamplingParams(top_k=-3)}, "sampling.top_k"),
    ({"prompt": "x", "sampling": pb.SamplingParams(min_tokens=50, max_tokens=10)}, "sampling.min_tokens"),
    ({"prompt": "x", "sampling": pb.SamplingParams(stop=[""])}, "sampling.stop"),
    ({"prompt": "x", "sampling": pb.SamplingParams(temperature=float("nan"))}, "sampling.temperature"),
    ({"prompt": "x", "sampling": pb.SamplingParams(stop=["s"] * 17)}, "sampling.stop"),
    ({"prompt": "x", "sampling": pb.SamplingParams(stop=["s" * 257])}, "sampling.stop[0]"),
    ({"prompt": "x", "sampling": pb.SamplingParams(stop_token_ids=list(range(65)))}, "sampling.stop_token_ids"),
    ({"prompt": "x", "sampling": pb.SamplingParams(logprobs=21)}, "sampling.logprobs"),
    ({"prompt": "x" * 262_145}, "prompt"),
    ({"prompt_token_ids": pb.TokenIds()}, "prompt_token_ids must not be empty"),
    ({"chat": pb.ChatMessages(messages=[pb.ChatMessage(content="no role")])}, "chat.messages[0]"),
    ({"chat": pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="x")] * 1025)}, "chat.messages"),
    ({}, "input: set one of"),
])
def test_bad_requests_name_the_field(request_kwargs, message):
    with pytest.raises(ValueError) as err:
        convert.check_request(pb.GenerateRequest(**request_kwargs), LIMITS)
    assert str(err.value).startswith(message)


def test_stream_chunk_carries_the_delta_logprobs_and_final_usage():
    from serving.engine.outputs import RequestMetrics, RequestOutput

    out = RequestOutput(req_id="r", prompt="p", prompt_token_ids=[1, 2, 3], text="abc", token_ids=[7, 8, 9],
                        finished=True, finish_reason="stop", stop_reason=9, delta_text="c", delta_token_ids=[9],
                        logprobs=[[(7, -0.1)], [(8, -0.2)], [(9, -0.3), (4, -1.0)]],
                        metrics=RequestMetrics(arrival_time=0.0, num_cached_tokens=2))
    msg = convert.chunk(out, "m", _Tokenizer())
    assert list(msg.token_ids) == [9] and msg.text == "c" and msg.stop_token_id == 9
    assert [lp.token_id for lp in msg.logprobs] == [9] and msg.logprobs[0].top_logprobs[0].token == "<4>"
    assert (msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens) == (3, 3, 2)
    assert msg.finish_reason == pb.FINISH_REASON_STOP
    out.finish_reason, out.stop_reason = "length", 9
    assert convert.response(out, "m", _Tokenizer()).WhichOneof("stop_reason") is None
