"""Evaluation: each module does one job, and all generation goes through the engine core.

- `reasoning`: the paper's reasoning protocol (prompts, answer extraction, Math-Verify grading, pass@k);
- `retrieval`: Phonebook and NIAH prompts generated locally and seeded, graded against context length;
- `perplexity`: loss, perplexity and bits per byte over a sliding window, and the batched scorer;
- `harness`: the lm-evaluation-harness backend (``lm_eval --model sambay``, or ``python -m sambay.eval``
  with lm-eval releases that do not read entry points; needs ``sambay[eval]``);
- `batching`: many requests through one `EngineCore`, each result handed over as it finishes;
- `results`: a resumable JSONL results file; `report`: progress bar and tables; `plot`: accuracy plots.

Nothing is imported here: `sambay.eval.harness` needs lm-eval, the others only what `sambay` needs
(plus `math-verify` to grade math and `faker` for the retrieval prompts, imported when used).
"""
