"""The lm-evaluation-harness backend: its log-likelihoods equal the model's own, its generations are the
engine's, and a local task YAML over a local JSONL file runs through `lm_eval.simple_evaluate` offline."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported: never reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from sambay.eval.harness import SambayLM  # noqa: E402
from sambay.generate import Engine, SamplingParams  # noqa: E402
from tests.conftest import random_model, small_config  # noqa: E402


@pytest.fixture(scope="module")
def lm(tokenizer) -> SambayLM:
    """A tiny random model behind the embedded model's tokenizer (512 ids), a short context for rolling windows."""
    model = random_model(small_config(vocab_size=512, max_seq_len=256))
    return SambayLM(engine=Engine(model, tokenizer), batch_size=4, batch_tokens=64, max_length=24)


def own_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The model's own: one forward over context + continuation, log-softmax at the continuation."""
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(ids)[0, len(context) - 1 : -1].float(), dim=-1)  # (len(continuation), vocab)
    target = torch.tensor(continuation)
    return logprobs[torch.arange(len(continuation)), target].sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_equals_the_models_own(lm, tokenizer):
    pairs = [("What is 12+7?", " 19"), ("Calculate 3 - 5.", " -2 exactly"), ("", "hello"), ("x", "")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs[:3])]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=False):
        whole = tokenizer.encode(context + continuation)
        ctx = tokenizer.encode(context) if context else [tokenizer.eos_token_id]
        cont = whole[len(ctx) :] if context else whole
        expected, expected_greedy = own_logprob(lm.model, ctx, cont)
        assert logprob == pytest.approx(expected, rel=1e-5) and greedy == expected_greedy


def test_loglikelihood_rolling_equals_the_models_own(lm, tokenizer):
    short, long = "What is 12+7?", "Calculate 300 - 5. The answer is 295, and 295 + 5 = 300 again."
    results = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (s,), i)
                                        for i, s in enumerate([short, long])])
    ids = tokenizer.encode(short)
    assert results[0] == pytest.approx(own_logprob(lm.model, [tokenizer.eos_token_id], ids)[0], rel=1e-5)
    ids = tokenizer.encode(long)
    assert len(ids) > lm.max_length  # several windows: the harness's own, each scored by the model alone here
    windows = [lm_eval.utils.make_disjoint_window(w) for w in lm_eval.utils.get_rolling_token_windows(
        token_list=ids, prefix_token=tokenizer.eos_token_id, max_seq_len=lm.max_length, context_len=1)]
    assert [t for _, predicted in windows for t in predicted] == ids  # every token predicted once
    expected = sum(own_logprob(lm.model, list(context), list(predicted))[0] for context, predicted in windows)
    assert results[1] == pytest.approx(expected, rel=1e-5)


def test_generate_until_is_the_engines_greedy_output(lm, tokenizer):
    contexts = ["What is 2+2?", "Compute 9*9."]
    requests = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 12}), i)
                for i, c in enumerate(contexts)]
    texts = lm.generate_until(requests)
    params = SamplingParams(temperature=0, max_new_tokens=12, stop=("\n\n",))
    expected = [samples[0].text for samples in lm.engine.generate(contexts, params)]
    assert texts == expected and all("\n\n" not in t for t in texts)


def test_a_local_task_through_simple_evaluate(lm, tokenizer, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    rows = [{"question": "What is 2+3?", "choices": ["5", "6", "7"], "label": 0},
            {"question": "What is 7+8?", "choices": ["14", "15", "16"], "label": 1},
            {"question": "What is 9-4?", "choices": ["5", "4", "3"], "label": 0}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(textwrap.dedent(f"""\
        task: sambay_local_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {tmp_path / "hf-cache"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list:
          - metric: acc
        """))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # skip indexing ~10k YAMLs
    results = simple_evaluate(model=lm, tasks=["sambay_local_mc"], task_manager=tasks, log_samples=True)
    expected = []
    for r in rows:  # lm-eval scores each choice after "question" + " " (its default target delimiter)
        scores = [lm.loglikelihood([Instance("loglikelihood", {}, (r["question"], " " + c), 0)], True)[0][0]
                  for c in r["choices"]]
        expected.append(float(scores.index(max(scores)) == r["label"]))
    assert results["results"]["sambay_local_mc"]["acc,none"] == pytest.approx(sum(expected) / len(rows))
    logged = results["samples"]["sambay_local_mc"]
    assert len(logged) == 3 and all(len(s["resps"]) == 3 for s in logged)


def test_registered_by_name_and_entry_point():
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model

    assert get_model("sambay") is SambayLM
    (point,) = [p for p in entry_points(group="lm_eval.models") if p.name == "sambay"]
    assert point.load() is SambayLM


def test_model_args_win_over_lm_evals_flags():
    """lm-eval passes --device (default cuda:0) and --batch_size (default 1) too; model_args take precedence."""
    lm = SambayLM.create_from_arg_string("device=cpu,dtype=float32,batch_size=3",
                                         {"device": "cuda:0", "batch_size": 1, "max_batch_size": None})
    assert lm.slots == 3 and lm.device.type == "cpu" and lm.model.config.vocab_size == 512  # the embedded model
