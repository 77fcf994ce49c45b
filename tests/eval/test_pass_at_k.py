"""pass@k (the unbiased estimator) and the run summary against values computed by hand."""

from __future__ import annotations

import math

import pytest

from sambay.eval.reasoning import pass_at_k, summarize


def test_pass_at_k_by_hand():
    # n = 4 samples, c = 1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    # n = 5, c = 2, k = 3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 8)


def _records(verdicts: dict[int, list[bool]], tokens: int = 10) -> list[dict]:
    return [{"problem": p, "sample": j, "correct": v, "output_tokens": tokens + j, "finish_reason": "stop"}
            for p, vs in verdicts.items() for j, v in enumerate(vs)]


def test_summary_of_fixed_verdicts():
    verdicts = {0: [False, True, False, False], 1: [False] * 4, 2: [True] * 4}
    summary = summarize(_records(verdicts), n=4)
    assert summary["problems"] == 3 and summary["samples"] == 12
    assert summary["pass_at_1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert summary["pass_at_k"] == pytest.approx({"1": (0.25 + 0 + 1) / 3, "2": (0.5 + 0 + 1) / 3, "4": 2 / 3})
    assert summary["mean_output_tokens"] == pytest.approx(11.5)


def test_summary_leaves_out_samples_beyond_n():
    verdicts = {0: [True, False, True, True, True, True, True, True]}  # a run with n = 8 in the same file
    summary = summarize(_records(verdicts), n=2)
    assert summary["samples"] == 2
    assert summary["pass_at_k"] == pytest.approx({"1": 0.5, "2": 1.0})
