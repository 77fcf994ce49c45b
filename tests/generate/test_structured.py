"""Structured outputs through the engine: grammars (llguidance) that start after the reasoning.

On the embedded model: a JSON-schema answer parses and validates (`jsonschema`), a choice is one of the
choices, a regex answer matches; the reasoning before it is the one the model writes without a grammar
(the grammar starts only after ``</think>``); a request that is not a reasoning request, or whose prompt
already holds the block, is constrained from its first token; grammar rows are the same asynchronous and
synchronous. Unusable grammars are refused at submission with the reason. The bitmask op and the step
bitmask are checked against plain loops.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sambay.default_model import default_model_dir
from sambay.generate import Engine, SamplingParams
from sambay.generate.constraints import CLOSE_TEXT, OPEN_TEXT, Ban, Force, Guide, step_bitmask
from sambay.generate.guided import GuidedDecoding, grammar_compiler
from sambay.generate.sampling import apply_token_bitmask
from sambay.text.reasoning import split_reasoning
from tests.generate.test_reasoning_budget import chat, greedy, run_core

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "operation"],
          "properties": {"answer": {"type": "integer", "minimum": -999, "maximum": 9999},
                         "operation": {"enum": ["add", "subtract", "multiply"]}}}
JSON = GuidedDecoding.from_schema(SCHEMA)
CHOICE = GuidedDecoding(choice=("402", "four hundred", "no idea"))
REGEX = GuidedDecoding(regex=r"The answer is [0-9]{1,4}\.")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(default_model_dir(), progress=False)


def answer(text: str) -> str:
    return split_reasoning(text).content


def test_a_json_schema_answer_parses_and_validates_and_the_reasoning_is_untouched(engine):
    free = engine.generate([chat(engine)], greedy())[0][0]
    c = engine.generate([chat(engine)], greedy(guided=JSON))[0][0]
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(answer(c.text)), SCHEMA)
    assert split_reasoning(c.text).reasoning == split_reasoning(free.text).reasoning  # the grammar starts after
    assert c.reasoning_tokens == free.reasoning_tokens


def test_choice_and_regex_answers(engine):
    for guided, check in ((CHOICE, lambda a: a in CHOICE.choice), (REGEX, lambda a: re.fullmatch(REGEX.regex, a))):
        c = engine.generate([chat(engine, "What is 95-38?")], greedy(guided=guided))[0][0]
        assert c.finish_reason == "stop" and check(answer(c.text)), c.text


def test_a_budget_and_a_grammar_together(engine):
    c = engine.generate([chat(engine, "What is 127*46?")], greedy(guided=JSON, max_reasoning_tokens=5))[0][0]
    assert c.reasoning_tokens == 5 and c.finish_reason == "stop"
    jsonschema.validate(json.loads(answer(c.text)), SCHEMA)


def test_without_reasoning_the_grammar_applies_from_the_first_token(engine):
    for prompt in (chat(engine), chat(engine) + engine.tokenizer.encode(OPEN_TEXT + CLOSE_TEXT)):
        reasoning = len(prompt) > len(chat(engine))  # the second prompt holds the whole (empty) block
        c = engine.generate([prompt], greedy(guided=JSON, reasoning=reasoning))[0][0]
        assert c.finish_reason == "stop" and c.reasoning_tokens == 0
        jsonschema.validate(json.loads(c.text), SCHEMA)  # no think block in the output at all


def test_grammar_rows_are_the_same_asynchronous_and_synchronous(engine):
    questions = ["What is 308+94?", "What is 127*46?", "What is 95-38?"]
    sampled = SamplingParams(temperature=0.8, seed=5, n=2, max_new_tokens=120, reasoning=True, guided=CHOICE)
    requests = [(chat(engine, q), p) for q in questions
                for p in (greedy(guided=JSON), greedy(guided=REGEX, max_reasoning_tokens=4), greedy(), sampled)]
    together = run_core(engine, requests, overlap=True, slots=8)
    assert together == run_core(engine, requests, overlap=False, slots=8)


@pytest.mark.parametrize(("guided", "message"), [
    (GuidedDecoding.from_schema({"type": "foo"}), "invalid json_schema: Invalid type: foo"),
    (GuidedDecoding.from_schema({"type": "object", "properties": 5}), "properties must be an object"),
    (GuidedDecoding(regex="(?=a)b"), "look-around"),
    (GuidedDecoding(regex="(("), "invalid regex"),
    (GuidedDecoding(regex=r"[^\s\S]+"), "unsatisfiable regex: no text the model can write matches it"),
])
def test_unusable_grammars_are_refused_at_submission_with_the_reason(engine, guided, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.generate([chat(engine)], greedy(guided=guided))


def test_guided_decoding_takes_exactly_one_grammar():
    for bad in ({}, {"regex": "a", "json_object": True}, {"choice": ()}, {"choice": ("a", "")},
                {"json_schema": "{not json"}, {"json_schema": "[1]"}):
        with pytest.raises(ValueError):
            GuidedDecoding(**bad)
    assert GuidedDecoding(choice=["a", "b"]).choice == ("a", "b")


# masks ------------------------------------------------------------------------------------------------


def test_apply_token_bitmask_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 2), dtype=torch.int32, generator=g)  # 64 bits: 64..69 masked
    out = apply_token_bitmask(logits, bitmask)
    for r in range(3):
        for i in range(70):
            allowed = i < 64 and (int(bitmask[r, i // 32]) >> (i % 32)) & 1
            assert out[r, i] == (logits[r, i] if allowed else float("-inf"))


def test_step_bitmask_forces_bans_and_fills_grammar_rows(engine):
    compiler = grammar_compiler(engine.tokenizer, sorted(engine.stop_token_ids))
    matcher = compiler.matcher(CHOICE)
    mask = step_bitmask([Force(40), Ban((0, 33, 375)), matcher], compiler, compiler.words)
    bits = (torch.from_numpy(mask.copy()).unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = [set(np.flatnonzero(row.flatten().numpy()).tolist()) for row in bits]
    assert allowed[0] == {40} and allowed[1] == set(range(32 * compiler.words)) - {0, 33, 375}
    assert allowed[2] == {t for t in range(engine.tokenizer.vocab_size)
                          if any(c.encode().startswith(engine.tokenizer.token_bytes(t)) for c in CHOICE.choice)
                          and engine.tokenizer.token_bytes(t)}


def test_a_grammar_row_bans_stop_tokens_while_thinking_and_completes_the_close(engine):
    tok = engine.tokenizer
    compiler = grammar_compiler(tok, sorted(engine.stop_token_ids))
    guide = Guide(token_bytes=tok.token_bytes, encode=tok.encode, reasoning=True, matcher=compiler.matcher(CHOICE),
                  compiler=compiler, stop_ids=engine.stop_token_ids)
    guide.begin(b"")
    opener = tok.encode(OPEN_TEXT)
    assert guide.next() == Force(opener[0])  # the block is opened for sure
    for token in opener:
        guide.accept(token)
    ban = Ban(tuple(sorted(engine.stop_token_ids)))
    for token in tok.encode("1+1\n</think"):
        assert guide.next() == ban  # no ending inside the block: the answer would be missing
        guide.accept(token)
    assert guide.tracker.held == b"</think" and guide.next() == Force(tok.encode(">\n")[0])


def test_the_cli_flags(engine, monkeypatch, capsys, tmp_path):
    from sambay.cli import __main__ as cli
    from sambay.cli import generate

    monkeypatch.setattr(generate, "load_engine", lambda options, console: engine)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))

    def run(*flags: str) -> dict:
        assert cli.main(["generate", "--temperature", "0", "--json", *flags, "What is 308+94?"]) == 0
        [choice] = json.loads(capsys.readouterr().out)["choices"]
        return choice

    choice = run("--choice", "402,57,no idea")
    assert choice["content"] == "402" and choice["reasoning_tokens"] > 20  # the model's own reasoning, then 402
    choice = run("--json-schema", str(schema), "--max-reasoning-tokens", "4")
    assert choice["reasoning_tokens"] == 4 and choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["content"]), SCHEMA)
    choice = run("--max-reasoning-tokens", "0", "--regex", REGEX.regex)
    assert choice["reasoning_tokens"] == 0 and re.fullmatch(REGEX.regex, choice["content"])
    for flags in (["--choice", "a,b", "--regex", "a"], ["--raw", "--max-reasoning-tokens", "3"]):
        with pytest.raises(SystemExit) as exited:  # one grammar at most; a budget needs a chat prompt
            cli.main(["generate", *flags, "x"])
        assert exited.value.code == 2
