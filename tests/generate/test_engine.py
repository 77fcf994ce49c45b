"""The Engine on a tiny random model: greedy == a manual argmax loop, ragged batches, n samples from one
prefill, seeds, stop conditions, stop strings, streaming text, logprobs, errors."""

from __future__ import annotations

import pytest
import torch

from sambay.generate import Engine, SamplingParams
from tests.generate.conftest import ScriptedModel, TableTokenizer, letters_tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)
PROMPTS = [[5, 17, 3], [40, 2, 9, 66, 11, 8, 1], [23]]


def manual_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Argmax over full forwards without a cache (the reference)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def tokens(result) -> list[list[list[int]]]:
    return [[c.token_ids for c in samples] for samples in result]


def test_greedy_equals_manual_argmax_loop(model):
    result = Engine(model).generate(PROMPTS[:2], GREEDY)
    for prompt, samples in zip(PROMPTS[:2], result, strict=True):
        assert samples[0].token_ids == manual_greedy(model, prompt, GREEDY.max_new_tokens)
        assert samples[0].finish_reason == "length"
        assert samples[0].prompt_tokens == len(prompt)


def test_ragged_batch_equals_each_prompt_alone(model):
    engine = Engine(model)
    together = tokens(engine.generate(PROMPTS, GREEDY))
    assert together == [tokens(engine.generate([p], GREEDY))[0] for p in PROMPTS]


def test_n_samples_share_one_prefill(model):
    engine, calls = Engine(model), []
    engine.generate(PROMPTS[:2], GREEDY.replace(n=3))  # builds the core; then count its prefill forwards
    forward = engine._core.runner.prefill
    engine._core.runner.prefill = lambda chunks: calls.append(len(chunks)) or forward(chunks)
    greedy = engine.generate(PROMPTS[:2], GREEDY.replace(n=3))
    assert calls == [2]  # one prefill of the two prompt rows, not six
    assert tokens(greedy) == [[t[0]] * 3 for t in tokens(Engine(model).generate(PROMPTS[:2], GREEDY))]


def test_a_stream_closed_early_frees_its_rows(model):
    engine = Engine(model)
    stream = engine.stream(PROMPTS, GREEDY.replace(max_new_tokens=50))
    next(stream)
    stream.close()
    assert engine._core.stats()["free_slots"] == 3 and not engine._core.scheduler.busy
    assert tokens(engine.generate(PROMPTS[:1], GREEDY)) == [[manual_greedy(model, PROMPTS[0], 8)]]


def test_sample_j_uses_seed_plus_j_and_a_faithful_copy_of_the_prefill(model):
    engine = Engine(model)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=11)
    fanned = tokens(engine.generate(PROMPTS[:2], params.replace(n=3)))
    for j in range(3):
        alone = tokens(engine.generate(PROMPTS[:2], params.replace(seed=11 + j)))
        assert [samples[j] for samples in fanned] == [samples[0] for samples in alone]
    assert len({tuple(t) for t in fanned[1]}) > 1


def test_seeded_output_does_not_depend_on_the_batch(model):
    engine = Engine(model)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=3, repetition_penalty=1.2)
    alone = tokens(engine.generate([PROMPTS[1]], params))[0]
    assert tokens(engine.generate([PROMPTS[1]], params))[0] == alone
    assert tokens(engine.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0]], params))[1] == alone


def test_max_new_tokens_gives_length(model):
    [[c]] = Engine(model).generate([PROMPTS[0]], GREEDY.replace(max_new_tokens=3))
    assert len(c.token_ids) == 3 and c.finish_reason == "length"


def test_max_seq_len_caps_the_generation(model):
    prompt = [1] * (model.config.max_seq_len - 2)
    [[c]] = Engine(model).generate([prompt], GREEDY.replace(max_new_tokens=10))
    assert len(c.token_ids) == 2 and c.finish_reason == "length"


def test_stop_token_gives_stop_and_no_text(model):
    reference = manual_greedy(model, PROMPTS[0], 8)
    stop_id = reference[3]
    first = reference.index(stop_id)
    tokenizer = letters_tokenizer()
    engine = Engine(model, tokenizer, stop_token_ids=[stop_id])
    [[c]] = engine.generate([PROMPTS[0]], GREEDY)
    assert c.token_ids == reference[: first + 1] and c.finish_reason == "stop"
    assert c.text == tokenizer.decode(reference[:first])
    [[c]] = engine.generate([PROMPTS[0]], GREEDY.replace(stop_token_ids=()))  # the request overrides
    assert c.token_ids == reference


def test_default_stop_ids_come_from_the_tokenizer(model):
    reference = manual_greedy(model, PROMPTS[0], 8)
    tokenizer = TableTokenizer({}, stop_ids=(reference[0],))
    [[c]] = Engine(model, tokenizer).generate([PROMPTS[0]], GREEDY)
    assert c.token_ids == reference[:1] and c.finish_reason == "stop"


TEXT = {1: b"He", 2: b"llo", 3: b"\n#", 4: b"#x", 5: b" world", 6: "é".encode()[:1], 7: "é".encode()[1:]}


def scripted_engine(model, script: list[int]) -> Engine:
    return Engine(ScriptedModel(model, script, prompt_len=2), TableTokenizer(TEXT))


def stream_texts(engine: Engine, params: SamplingParams) -> list[tuple[str, str | None]]:
    return [(d.text, d.finish_reason) for step in engine.stream([[9, 9]], params) for d in step]


def test_stop_string_across_tokens_is_cut_from_the_output(model):
    engine = scripted_engine(model, [1, 2, 3, 4, 5])
    params = GREEDY.replace(stop=["\n##"])
    assert stream_texts(engine, params) == [("He", None), ("llo", None), ("", None), ("", "stop")]
    [[c]] = engine.generate([[9, 9]], params)
    assert c.text == "Hello" and c.token_ids == [1, 2, 3, 4]


def test_held_back_text_is_released_when_it_is_not_a_stop(model):
    engine = scripted_engine(model, [1, 3, 5, 6, 7])
    params = GREEDY.replace(stop=["\n##"], max_new_tokens=5)
    assert stream_texts(engine, params) == [("He", None), ("", None), ("\n# world", None), ("", None),
                                            ("é", "length")]


def test_held_back_text_is_released_at_length(model):
    engine = scripted_engine(model, [1, 3])
    assert stream_texts(engine, GREEDY.replace(stop=["\n##"], max_new_tokens=2)) == [("He", None),
                                                                                      ("\n#", "length")]


def test_streamed_text_concatenates_to_the_decoded_tokens(model):
    tokenizer = letters_tokenizer()
    engine = Engine(model, tokenizer, stop_token_ids=[])
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=7, n=2)
    text, ids = {}, {}
    for step in engine.stream(PROMPTS[:2], params):
        for d in step:
            text[d.index] = text.get(d.index, "") + d.text
            ids.setdefault(d.index, []).append(d.token_id)
    assert sorted(text) == [0, 1, 2, 3]
    assert all(text[i] == tokenizer.decode(ids[i]) for i in text)


def test_logprobs_of_the_chosen_token_and_the_top(model):
    [[c]] = Engine(model).generate([PROMPTS[0]], GREEDY.replace(logprobs=3, max_new_tokens=4))
    assert len(c.logprobs) == 4
    for token, lp in zip(c.token_ids, c.logprobs, strict=True):
        assert lp.token_id == token and lp.top[0] == (token, lp.logprob)
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0


def test_ids_beyond_the_tokenizer_are_never_generated(model):
    engine = Engine(model, letters_tokenizer(vocab_size=40), stop_token_ids=[])
    params = SamplingParams(temperature=5.0, seed=0, max_new_tokens=30)
    [[c]] = engine.generate([PROMPTS[0]], params)
    assert max(c.token_ids) < 40


@pytest.mark.parametrize(("prompts", "params", "message"), [
    ([[]], GREEDY, "at least one token"),
    ([], GREEDY, "at least one prompt"),
    ([[1000]], GREEDY, "token ids must be in"),
    ([[1] * 512], GREEDY, "max_seq_len"),
    ([[1]], GREEDY.replace(stop=["x"]), "stop strings need a tokenizer"),
    (["text"], GREEDY, "no tokenizer"),
])
def test_bad_requests_raise(model, prompts, params, message):
    with pytest.raises(ValueError, match=message):
        Engine(model).generate(prompts, params)


def test_stream_does_not_leave_inference_mode_on(model):
    stream = Engine(model).stream([PROMPTS[0]], GREEDY)
    next(stream)
    assert not torch.is_inference_mode_enabled()
    stream.close()
