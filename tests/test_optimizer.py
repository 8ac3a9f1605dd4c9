"""The prompt and context optimizer, on the bundled model's real tokenizer and the real all-MiniLM-L6-v2."""
import copy

import pytest

from serving.control.embeddings import Embedder
from serving.control.optimizer import (MESSAGE_OVERHEAD_TOKENS, REPLY_PRIMING_TOKENS, OptimizerPlan,
                                       count_chat_tokens, optimize, optimizer_config, tokenizer_counter)
from serving.control.optimizer.config import ContextConfig, TrimHistoryConfig
from serving.control.optimizer.chunks import chunk_entry
from serving.engine.chat import chat_prompt_ids
from serving.loaders import default_model_path, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def count(tokenizer):
    return tokenizer_counter(tokenizer)


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def plan(**steps) -> OptimizerPlan:
    fields = dict(whitespace=False, dedupe=False, context=None, trim_history=None, max_tokens_cap=None)
    return OptimizerPlan(**{**fields, **steps})


def msg(role, content):
    return {"role": role, "content": content}


SYSTEM = "You are the support assistant of Acme Store. Answer politely and only about Acme products and orders."

QUESTION = "I was charged twice for my order last week. How do I get a refund for the duplicate charge?"
CHUNKS = [
    "To reset your password, open Settings > Security and choose 'Send reset link'. The link expires after "
    "30 minutes.",
    "Refunds: you can request a refund within 30 days of purchase from Orders > Request refund. Refunds go back "
    "to the original payment method within 5-7 business days.",
    "Our support desk is open Monday to Friday, 8am to 6pm CET. Urgent outages can be reported by phone at any "
    "time.",
    "Shipping: standard delivery takes 3-5 business days within the EU; express delivery arrives the next "
    "business day if ordered before 2pm.",
    "Duplicate or incorrect charges are refunded automatically once our billing team confirms them: open a "
    "billing ticket with the order number, the date and the amount of both charges, and the refund of the "
    "duplicate is issued to the same card within 48 hours. You get an email when it is on its way.",
    "You can change the email address on your account under Profile > Contact details. A confirmation email is "
    "sent to the new address.",
    "Two-factor authentication can be enabled with any TOTP app such as Google Authenticator or 1Password.",
    "Gift cards never expire and can be combined with discount codes at checkout.",
]
REFUND_CHUNKS = (1, 4)


def conversation(num_turns: int) -> list[dict]:
    messages = [msg("system", SYSTEM)]
    for t in range(num_turns):
        messages.append(msg("user", f"Question number {t}: where is parcel {t} of my order {1000 + t}?"))
        messages.append(msg("assistant", f"Parcel {t} of order {1000 + t} left our warehouse on day {t} and "
                                         f"should arrive within three business days."))
    messages.append(msg("user", QUESTION))
    return messages


# -- config and precedence --

def test_precedence_route_over_tenant_over_default():
    config = optimizer_config({
        "default": {"whitespace": True, "max_tokens_cap": 1024},
        "tenants": {"acme": {"dedupe": True, "trim_history": {"max_prompt_tokens": 3000}, "max_tokens_cap": 512}},
        "routes": {"small": {"max_tokens_cap": 128, "trim_history": False,
                             "context": {"max_tokens": 800, "min_similarity": 0.3}}},
    })
    both = config.plan_for("acme", "small")
    assert both == OptimizerPlan(whitespace=True, dedupe=True, trim_history=None, max_tokens_cap=128,
                                 context=ContextConfig(max_tokens=800, min_similarity=0.3))
    assert config.plan_for("acme", None) == OptimizerPlan(
        whitespace=True, dedupe=True, context=None, trim_history=TrimHistoryConfig(max_prompt_tokens=3000),
        max_tokens_cap=512)
    assert config.plan_for("other", "small").dedupe is False  # tenant settings stay with their tenant
    assert config.plan_for("other", "unknown-route") == OptimizerPlan(
        whitespace=True, dedupe=False, context=None, trim_history=None, max_tokens_cap=1024)
    assert optimizer_config(None).plan_for("acme", "small").enabled_steps == ()


def test_narrower_scope_replaces_a_step_whole():
    config = optimizer_config({"tenants": {"a": {"trim_history": {"max_prompt_tokens": 100, "keep_last_turns": 3}}},
                               "routes": {"r": {"trim_history": {"keep_last_turns": 5}}}})
    assert config.plan_for("a", "r").trim_history == TrimHistoryConfig(keep_last_turns=5)


@pytest.mark.parametrize("raw, message", [
    ({"default": {"dedup": True}}, "optimizer.default.dedup: Extra inputs are not permitted"),
    ({"routes": {"r": {"max_tokens_cap": 0}}}, "optimizer.routes.r.max_tokens_cap: must be at least 1"),
    ({"routes": {"r": {"max_tokens_cap": True}}}, "optimizer.routes.r.max_tokens_cap: true is not a setting"),
    ({"tenants": {"a": {"trim_history": {}}}}, "optimizer.tenants.a.trim_history: trim_history needs"),
    ({"tenants": {"a": {"context": {"max_tokens": 10, "min_similarity": 2}}}},
     "optimizer.tenants.a.context.min_similarity: Input should be less than or equal to 1"),
])
def test_config_errors_name_the_field(raw, message):
    with pytest.raises(ValueError) as e:
        optimizer_config(raw)
    assert str(e.value).startswith(message)


# -- token counting --

def test_chat_token_count_tracks_the_chat_template(tokenizer, count):
    messages = conversation(3)
    real = len(chat_prompt_ids(tokenizer, messages))
    approx = count_chat_tokens(messages, count)
    assert approx == sum(count(m["content"]) for m in messages) + MESSAGE_OVERHEAD_TOKENS * len(messages) \
        + REPLY_PRIMING_TOKENS
    assert abs(approx - real) <= len(messages)  # off by at most a token per message, never per content token


# -- whitespace --

CODE = "```python\ndef total(xs):\n\n\n    return  sum(xs)   \n```"


def test_whitespace_collapses_prose_and_keeps_code(count):
    content = f"\n\nPlease  fix   this:   \n\n\n\n{CODE}\n\n\n  - nested   item  \nThanks.  \n\n"
    result = optimize([msg("user", content)], plan(whitespace=True), count)
    assert result.messages[0]["content"] == f"Please fix this:\n\n{CODE}\n\n  - nested item\nThanks."
    assert CODE in result.messages[0]["content"]  # byte for byte, trailing spaces and blank lines too
    report = result.report
    assert report.steps == ("whitespace",)
    assert report.tokens_saved == count_chat_tokens([msg("user", content)], count) \
        - count_chat_tokens(result.messages, count) > 0


def test_whitespace_leaves_unclosed_fence_and_clean_text_alone(count):
    content = "Look:\n```\nx  =  1\n\n\n"
    messages = [msg("user", content), msg("assistant", "ok"), msg("user", "Clean text.")]
    result = optimize(messages, plan(whitespace=True), count)
    assert result.messages == messages
    assert result.report.steps == () and result.report.tokens_saved == 0


# -- dedupe --

RULES = "Always answer in English, keep answers under 100 words, and never promise delivery dates."


def test_dedupe_drops_verbatim_and_near_verbatim_repeats(count):
    messages = [msg("system", f"{SYSTEM}\n\n{RULES}"),
                msg("user", f"{RULES}\n\nWhere is my order?"),
                msg("assistant", f"{RULES}\n\nIt is on its way."),  # assistant text is never touched
                msg("user", f"**always answer in english,  keep answers under 100 words and never promise "
                            f"delivery dates**\n\n{SYSTEM.upper()}\n\nAnd my refund?")]
    result = optimize(messages, plan(dedupe=True), count)
    assert [m["content"] for m in result.messages] == [
        messages[0]["content"], "Where is my order?", messages[2]["content"], "And my refund?"]
    assert result.report.steps == ("dedupe",)
    assert "dropped 3 repeated" in result.report.notes[0]
    assert result.report.tokens_saved == count_chat_tokens(messages, count) \
        - count_chat_tokens(result.messages, count) > 0


def test_dedupe_keeps_what_is_not_really_duplicated(count):
    messages = [msg("system", f"{SYSTEM}\n\n{RULES}\n\n{CODE}"),
                msg("user", "Never answer in English, keep answers under 100 words, and never promise delivery "
                            "dates.\n\nThanks a lot.\n\n" + CODE),  # one word differs; a code copy stays
                msg("assistant", "Sure."),
                msg("user", "Thanks a lot.\n\nAnother question about my order."),  # too short to be an instruction
                msg("user", RULES)]  # only a repeat: the message is never emptied
    result = optimize(messages, plan(dedupe=True), count)
    assert result.messages == messages
    assert result.report.steps == () and result.report.tokens_saved == 0


# -- trim history --

def test_trim_drops_oldest_turns_whole(count):
    messages = conversation(6)
    messages.insert(5, msg("system", "The customer is a premium member."))  # a system message mid-way
    full = count_chat_tokens(messages, count)
    budget = full - 60  # two old turns have to go (each is about 50 tokens)
    result = optimize(messages, plan(trim_history=TrimHistoryConfig(max_prompt_tokens=budget)), count)
    kept = result.messages
    assert count_chat_tokens(kept, count) <= budget
    assert [m for m in messages if m["role"] == "system"] == [m for m in kept if m["role"] == "system"]
    assert kept[-1] == messages[-1]
    kept_users = [m for m in kept if m["role"] == "user"]
    users = [m for m in messages if m["role"] == "user"]
    assert kept_users == users[len(users) - len(kept_users):]  # a suffix of the turns, no holes
    assert len(kept_users) == len(users) - 2
    for i, m in enumerate(kept):  # every kept question still has its answer right after it
        if m["role"] == "user" and m is not kept[-1]:
            following = kept[i + 1] if kept[i + 1]["role"] != "system" else kept[i + 2]
            assert following["role"] == "assistant" and following["content"].startswith(
                m["content"].split(":")[0].replace("Question number", "Parcel"))
    assert set(map(str, kept)) <= set(map(str, messages))  # no message was cut or rewritten
    assert result.report.num_messages_dropped == 4
    assert result.report.tokens_saved == full - count_chat_tokens(kept, count)


def test_trim_keep_last_turns_and_within_budget(count):
    messages = conversation(4)
    result = optimize(messages, plan(trim_history=TrimHistoryConfig(keep_last_turns=2)), count)
    assert result.messages == [messages[0], *messages[-3:]]
    roomy = optimize(messages, plan(trim_history=TrimHistoryConfig(max_prompt_tokens=10_000)), count)
    assert roomy.messages == messages and roomy.report.steps == ()


def test_trim_unmeetable_budget_changes_nothing(count):
    messages = conversation(4)
    needed = count_chat_tokens([messages[0], messages[-1]], count)
    result = optimize(messages, plan(trim_history=TrimHistoryConfig(max_prompt_tokens=needed - 1,
                                                                    keep_last_turns=1)), count)
    assert result.messages == messages
    assert result.report.steps == () and result.report.tokens_saved == 0
    assert result.report.notes == (f"trim_history: not trimmed: system messages and the last turn need {needed} "
                                   f"tokens, over max_prompt_tokens={needed - 1}",)
    exact = optimize(messages, plan(trim_history=TrimHistoryConfig(max_prompt_tokens=needed)), count)
    assert exact.messages == [messages[0], messages[-1]]


# -- context selection --

def test_context_picks_the_refund_chunks(count, embedder):
    messages = [msg("system", SYSTEM), msg("user", QUESTION)]
    config = ContextConfig(max_tokens=400, min_similarity=0.3)
    result = optimize(messages, plan(context=config), count, context_chunks=CHUNKS, embedder=embedder)
    report = result.report
    assert report.chunks_kept == REFUND_CHUNKS
    assert report.chunks_dropped == (0, 2, 3, 5, 6, 7)
    assert max(report.chunk_similarities[i] for i in report.chunks_dropped) < 0.3 \
        <= min(report.chunk_similarities[i] for i in REFUND_CHUNKS)
    assert result.messages[0] == messages[0]  # the system prompt is untouched, byte for byte
    assert result.messages[1] == msg("user", f"Context:\n[2] {CHUNKS[1]}\n\n[5] {CHUNKS[4]}\n\n{QUESTION}")
    unoptimised = optimize(messages, plan(), count, context_chunks=CHUNKS)  # without the step: every chunk
    assert unoptimised.messages[1]["content"] == "Context:\n" + "\n\n".join(
        f"[{i + 1}] {c}" for i, c in enumerate(CHUNKS)) + f"\n\n{QUESTION}"
    assert unoptimised.report.chunks_kept == tuple(range(8))
    assert report.tokens_before == count_chat_tokens(unoptimised.messages, count)
    assert report.tokens_saved == report.tokens_before - count_chat_tokens(result.messages, count) > 0
    assert report.steps == ("context",)


def test_context_respects_the_token_budget(count, embedder):
    messages = [msg("user", QUESTION)]
    best, second = 4, 1  # by similarity
    best_tokens, second_tokens = count(chunk_entry(best, CHUNKS[best])), count(chunk_entry(second, CHUNKS[second]))
    assert best_tokens > second_tokens

    def kept(max_tokens):
        config = ContextConfig(max_tokens=max_tokens, min_similarity=0.3)
        return optimize(messages, plan(context=config), count, context_chunks=CHUNKS, embedder=embedder).report

    assert kept(best_tokens + second_tokens).chunks_kept == (1, 4)
    assert kept(best_tokens).chunks_kept == (4,)
    assert kept(second_tokens).chunks_kept == (1,)  # the best does not fit, so it is skipped for the next
    nothing = kept(second_tokens - 1)
    assert nothing.chunks_kept == ()
    assert optimize(messages, plan(context=ContextConfig(max_tokens=second_tokens - 1, min_similarity=0.3)),
                    count, context_chunks=CHUNKS, embedder=embedder).messages == messages  # no empty block
    everything = kept(10_000)
    assert everything.chunks_kept == (1, 4)  # min_similarity still applies


# -- max_tokens cap --

@pytest.mark.parametrize("requested, expected", [(None, 256), (1000, 256), (100, 100)])
def test_max_tokens_cap(count, requested, expected):
    result = optimize([msg("user", "Hi")], plan(max_tokens_cap=256), count, max_tokens=requested)
    assert result.max_tokens == result.report.max_tokens == expected
    assert result.report.max_tokens_requested == requested
    assert result.report.steps == (("max_tokens_cap",) if expected != requested else ())
    assert result.report.tokens_saved == 0


# -- all together --

def test_all_steps_combined(tokenizer, count, embedder):
    messages = conversation(6)
    messages[0] = msg("system", f"{SYSTEM}\n\n{RULES}")
    messages[-1] = msg("user", f"{RULES}\n\n{QUESTION}   \n\n\n{CODE}")
    original = copy.deepcopy(messages)
    all_steps = plan(whitespace=True, dedupe=True, context=ContextConfig(max_tokens=300, min_similarity=0.3),
                     trim_history=TrimHistoryConfig(max_prompt_tokens=400), max_tokens_cap=200)
    result = optimize(messages, all_steps, count, max_tokens=500, context_chunks=CHUNKS, embedder=embedder)
    report = result.report
    assert messages == original  # the caller's input is never changed
    assert report.steps == ("whitespace", "dedupe", "context", "trim_history", "max_tokens_cap")
    assert [r.step for r in report.step_reports] == list(report.steps)
    assert report.chunks_kept == REFUND_CHUNKS
    assert result.messages[0] == messages[0]
    assert result.messages[-1]["content"] == f"Context:\n[2] {CHUNKS[1]}\n\n[5] {CHUNKS[4]}\n\n{QUESTION}\n\n{CODE}"
    assert count_chat_tokens(result.messages, count) <= 400 and result.max_tokens == 200
    # The report's figures are the counted tokens: before is the prompt as sent with every chunk in.
    baseline = optimize(messages, plan(), count, context_chunks=CHUNKS).messages
    assert report.tokens_before == count_chat_tokens(baseline, count)
    assert report.tokens_after == count_chat_tokens(result.messages, count)
    assert report.tokens_saved == sum(r.tokens_saved for r in report.step_reports) > 0
    steps = report.step_reports
    assert all(a.tokens_after == b.tokens_before for a, b in zip(steps, steps[1:]))
    assert all(r.tokens_saved > 0 for r in steps[:4])
    assert len(report.notes) == 5
    assert chat_prompt_ids(tokenizer, result.messages)  # the chat template renders the result
    again = optimize(messages, all_steps, count, max_tokens=500, context_chunks=CHUNKS, embedder=embedder)
    assert again == result  # deterministic


def test_no_plan_changes_nothing(count):
    messages = conversation(2)
    result = optimize(messages, plan(), count, max_tokens=50)
    assert result.messages == messages and result.max_tokens == 50
    assert result.report.step_reports == () and result.report.tokens_saved == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(messages=[]), "messages must be a non-empty list"),
    (dict(messages=[{"role": "user", "content": None}]), "messages[0] needs a string 'role' and a string 'content'"),
    (dict(context_chunks=["a", 3]), "context_chunks[1] must be a string, not int"),
    (dict(context_chunks="abc"), "context_chunks must be a list of strings"),
    (dict(messages=[msg("system", "s")], context_chunks=["a"]), "context_chunks need a user message"),
    (dict(max_tokens=0), "max_tokens must be a positive integer, not 0"),
])
def test_bad_input_is_refused_by_name(count, kwargs, message):
    kwargs = {"messages": [msg("user", "hi")], **kwargs}
    with pytest.raises(ValueError) as e:
        optimize(kwargs.pop("messages"), plan(whitespace=True), count, **kwargs)
    assert str(e.value).startswith(message)
