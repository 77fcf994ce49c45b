"""Training and fine-tuning SambaY-family models (issue 6).

    config.py     TrainConfig (run hyperparameters; the architecture is a preset name or a model dir)
    data.py       documents -> memory-mapped token shards -> packed windows; held-out split
    chat.py       chat JSONL -> ids + assistant-only loss mask (SFT)
    optim.py      AdamW param groups, cosine / WSD / constant schedules
    parallel.py   apply_ac / apply_compile / apply_fsdp / apply_ddp on an unmodified model
    state.py      atomic, pickle-free, resumable checkpoints
    setup.py      process group, tokenizer, data, model
    loop.py       `train(config)`: the loop
    memory.py     a step's memory, measured; on the CPU the micro-batch is split to fit
    progress.py   what a run prints: messages, a live bar on a terminal, plain lines elsewhere
    evaluate.py   held-out loss, bits per byte, greedy exact match
    metrics.py    JSONL (+ optional TensorBoard) logging
    arithmetic.py the embedded arithmetic task and its small tokenizer

Importing `sambay.train` imports nothing heavy; use `sambay.train.loop.train`.
"""
