"""Supervised fine-tuning examples: a chat rendered with the model's template, loss on assistant turns only.

For each assistant message the tokens it contributes are its content (the `<think>` reasoning
included) and the `<|end|>` that closes it: the model must learn when to stop. Everything else
(system and user turns, the `<|assistant|>` header the prompt already ends with, the final
`<|endoftext|>`) is context without loss.

The spans are found by rendering prefixes: the ids of ``messages[:i]`` plus the generation prompt are
a prefix of the ids of the whole chat (markers cut the text, so BPE never merges across a turn
boundary), and the ids of ``messages[:i + 1]`` without the final `<|endoftext|>` end right after the
assistant's `<|end|>`. A template for which that does not hold is rejected, not silently mis-masked.
"""

from __future__ import annotations

from collections.abc import Sequence

from sambay.text.chat_template import Message
from sambay.tokenizer import Tokenizer


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """Token ids of a finished conversation and a 0/1 loss mask over them.

    Args:
        tokenizer: has a chat template.
        messages: ``[{"role": ..., "content": ...}, ...]`` with at least one assistant message.

    Returns:
        (ids, mask), equally long; ``mask[j] == 1`` where token j belongs to an assistant turn.

    Raises:
        ValueError: no assistant message, or the template's renderings are not prefixes of each other.
    """
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    eos = tokenizer.eos_token_id
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise ValueError("an SFT example needs at least one assistant message")
    for i in assistant_turns:
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)) if i else 0
        upto = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if upto and upto[-1] == eos:
            upto = upto[:-1]
        if ids[: len(upto)] != upto or start > len(upto):
            raise ValueError("the chat template does not render conversations as prefixes of each other")
        mask[start : len(upto)] = [1] * (len(upto) - start)
    return ids, mask
