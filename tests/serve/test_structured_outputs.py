"""Reasoning budgets and structured outputs through the server, with the official `openai` client.

The embedded model (it reasons in ``<think>`` before it answers) behind a live server on 127.0.0.1:
32 concurrent requests, some with a JSON schema, a choice, a regex or a budget and some with none, each
answer valid (`jsonschema` for the schemas) and each reasoning within its budget; the reasoning a grammar
request returns is the one the model writes without it; ``reasoning_tokens`` in the usage of responses
and of a stream's final chunk; ``reasoning_effort`` named budgets; and clear 400s for an invalid schema,
an unsupported ``response_format`` type, a regex that nothing can satisfy, and mixed-up fields.
"""

from __future__ import annotations

import concurrent.futures
import json
import re

import pytest

from sambay.default_model import default_model_dir
from sambay.generate import REASONING_DEFAULTS, Engine
from sambay.generate.requests import SchedulerConfig
from sambay.serve import schemas
from sambay.serve.app import create_app
from sambay.serve.protocol import prepare_chat
from sambay.serve.server import ServeConfig, build_runtime
from tests.serve.conftest import LiveServer, free_port, openai

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "default_model"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "operation"],
          "properties": {"answer": {"type": "integer", "minimum": -999, "maximum": 9999},
                         "operation": {"enum": ["add", "subtract", "multiply"]}}}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "arithmetic", "schema": SCHEMA, "strict": True}}
CHOICES = ["402", "57", "I do not know"]
REGEX = r"The answer is -?[0-9]{1,4}\."


@pytest.fixture(scope="module")
def embedded():
    engine = Engine.load(default_model_dir(), progress=False)
    scheduler = SchedulerConfig(slots=16, max_length=512, prefill_chunk=64, prefill_budget=256, max_waiting=64)
    runtime = build_runtime(engine, ServeConfig(model_dir=default_model_dir(), model_name=MODEL, scheduler=scheduler))
    with LiveServer(create_app(runtime), free_port()) as live:
        yield engine, live
    runtime.scheduler.close(0)


@pytest.fixture
def client(embedded):
    with openai.OpenAI(base_url=f"{embedded[1].url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


QUESTIONS = ["What is 308+94?", "What is 95-38?", "What is 12*7?", "What is 640+271?"]
KINDS = {  # request extras → the check of the answer
    "schema": ({"response_format": JSON_FORMAT}, lambda a: jsonschema.validate(json.loads(a), SCHEMA) or True),
    "choice": ({"extra_body": {"guided_choice": CHOICES}}, lambda a: a in CHOICES),
    "regex": ({"extra_body": {"guided_regex": REGEX}}, lambda a: re.fullmatch(REGEX, a) is not None),
    "budget": ({"extra_body": {"max_reasoning_tokens": 6}}, lambda a: a.strip() != ""),
    "schema+budget": ({"response_format": JSON_FORMAT, "extra_body": {"max_reasoning_tokens": 4}},
                      lambda a: jsonschema.validate(json.loads(a), SCHEMA) or True),
    "plain": ({}, lambda a: a.strip() != ""),
    "object": ({"response_format": {"type": "json_object"}, "extra_body": {"max_reasoning_tokens": 0}},
               lambda a: a.startswith("{")),  # any object: this model, never taught JSON, may not close one
    "completion+regex": (None, None),
}


def test_32_concurrent_mixed_requests_are_valid(client):
    jobs = [(QUESTIONS[i % len(QUESTIONS)], list(KINDS)[i % len(KINDS)]) for i in range(32)]

    def run(job: tuple[str, str]):
        question, kind = job
        if kind == "completion+regex":  # a raw prompt: the grammar applies from the first token
            r = client.completions.create(model=MODEL, prompt=question + " ", max_tokens=40, temperature=0,
                                          extra_body={"guided_regex": REGEX})
            return kind, r.choices[0].text, None, r.choices[0].finish_reason, r.usage
        extras, _ = KINDS[kind]
        r = client.chat.completions.create(model=MODEL, messages=ask(question), max_tokens=240, temperature=0,
                                           **extras)
        m = r.choices[0].message
        return kind, m.content, m.model_extra.get("reasoning_content"), r.choices[0].finish_reason, r.usage

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs))
    for kind, content, _, finish, usage in results:
        assert usage.completion_tokens_details is not None
        reasoning = usage.completion_tokens_details.reasoning_tokens
        if kind == "completion+regex":
            assert re.fullmatch(REGEX, content) and finish == "stop" and reasoning == 0
            continue
        budget = KINDS[kind][0].get("extra_body", {}).get("max_reasoning_tokens")
        assert budget is None or reasoning <= budget, (kind, reasoning)
        if kind == "object":
            assert KINDS[kind][1](content), content
            continue
        assert finish == "stop" and KINDS[kind][1](content), (kind, content)
        assert reasoning > 0


def test_the_reasoning_is_the_same_with_and_without_a_grammar(client):
    plain = client.chat.completions.create(model=MODEL, messages=ask("What is 308+94?"), max_tokens=240,
                                           temperature=0)
    guided = client.chat.completions.create(model=MODEL, messages=ask("What is 308+94?"), max_tokens=240,
                                            temperature=0, response_format=JSON_FORMAT)
    assert guided.choices[0].message.model_extra["reasoning_content"] == \
        plain.choices[0].message.model_extra["reasoning_content"]
    assert plain.choices[0].message.content.strip() == "402"  # the model's own answer, unconstrained
    jsonschema.validate(json.loads(guided.choices[0].message.content), SCHEMA)
    assert guided.usage.completion_tokens_details.reasoning_tokens == \
        plain.usage.completion_tokens_details.reasoning_tokens > 0


def test_a_stream_reports_reasoning_tokens_in_its_final_usage(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ask("What is 95-38?"), max_tokens=240, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"max_reasoning_tokens": 5, "guided_choice": CHOICES}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens_details.reasoning_tokens == 5
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content in CHOICES


def test_a_budget_of_zero_skips_the_reasoning(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("What is 308+94?"), max_tokens=60, temperature=0,
                                       extra_body={"max_reasoning_tokens": 0})
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert (r.choices[0].message.model_extra["reasoning_content"] or "").strip() == ""
    assert r.choices[0].message.content.strip().isdigit() and r.choices[0].finish_reason == "stop"


def test_reasoning_effort_names_a_budget(embedded):
    engine = embedded[0]
    for effort, budget in schemas.REASONING_EFFORT_BUDGETS.items():
        req = schemas.ChatCompletionRequest(messages=ask("hi"), reasoning_effort=effort)
        assert prepare_chat(req, engine.tokenizer, 512, REASONING_DEFAULTS).params.max_reasoning_tokens == budget
    assert schemas.REASONING_EFFORT_BUDGETS == {"low": 1024, "medium": 4096, "high": 16384}  # as documented


@pytest.mark.parametrize(("body", "message"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
     "invalid json_schema: Invalid type: foo"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs {\"json_schema\": {\"schema\""),
    ({"response_format": {"type": "xml"}}, "response_format type 'xml' is not supported; use one of text, "
                                           "json_object, json_schema"),
    ({"guided_regex": "[^\\s\\S]"}, "unsatisfiable regex: no text the model can write matches it"),
    ({"guided_regex": "(?=a)b"}, "look-around"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "at most one of"),
    ({"max_reasoning_tokens": 5, "reasoning_effort": "low"}, "not both"),
])
def test_unusable_requests_are_a_400_with_the_reason(client, body, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ask("What is 1+1?"), max_tokens=8, extra_body=body)
    assert message in caught.value.body["message"]


def test_a_completion_takes_no_reasoning_budget(client):
    with pytest.raises(openai.BadRequestError, match="applies to chat completions"):
        client.completions.create(model=MODEL, prompt="1+1=", max_tokens=4, extra_body={"max_reasoning_tokens": 3})
