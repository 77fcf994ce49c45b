"""The embedded demo task: integer arithmetic with worked solutions, and a small tokenizer for it.

Problems are `a + b`, `a - b` and `a * b` with operands of one to three digits, phrased plainly
("What is 308+94?"). The reply is a `<think>` block that works the problem digit by digit from the
right, the way it is taught on paper, then the bare result::

    <think>
    308+94, add digit by digit from the right:
    8+4=12 → 2
    0+9+1=10 → 02
    3+0+1=4 → 402
    so 308+94=402
    </think>
    402

Each step writes the result so far with the new digit prepended, so the model never has to reverse a
string: every line copies the previous one and adds one digit. Multiplication takes one such pass
per digit of the multiplier (partial products), then adds the partial products column by column.

The tokenizer is a byte-level BPE trained with HF `tokenizers` on the rendered chats, with the
release's markers and chat template (`<|user|>...<|end|><|assistant|>...<|end|>`), so it loads through
`sambay.tokenizer.load_tokenizer` like the released one. Digits are pre-tokenized one per token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from sambay.text.bpe import to_byte_level
from sambay.text.special import AddedToken

# The released chat template (tokenizer_config.json of Phi-4-mini-flash-reasoning), verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
# The release's markers in its order: (content, rstrip, special).
MARKERS = (
    ("<|endoftext|>", False, True), ("<|endofprompt|>", False, True), ("<|assistant|>", True, True),
    ("<|end|>", True, True), ("<|user|>", True, True), ("<|system|>", True, True),
    ("<|tool|>", True, False), ("<|/tool|>", True, False), ("<|tool_call|>", True, False),
    ("<|/tool_call|>", True, False), ("<|tool_response|>", True, False), ("<|tag|>", True, True),
)
# Words (with their leading space) and punctuation runs as in GPT-style patterns, but every digit alone.
PATTERN = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PHRASINGS = ("What is {a}{op}{b}?", "What is {a} {op} {b}?", "Compute {a}{op}{b}.", "Calculate {a} {op} {b}.")
OPS = ("+", "-", "*")


def _operand(rng: random.Random) -> int:
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _digit_steps(columns: list[list[int]], mul: bool = False, borrow: bool = False) -> tuple[list[str], str]:
    """Column-by-column steps (rightmost column first); returns the lines and the digits written."""
    lines, out, carry = [], "", 0
    for column in columns:
        if borrow:
            value = column[0] - column[1] - carry
            expr = f"{column[0]}-{column[1]}" + (f"-{carry}" if carry else "")
            carry = int(value < 0)
            digit = value + 10 * carry
            shown = f"{expr}={value}, borrow: {value}+10={digit}" if carry else f"{expr}={value}"
        else:
            value = (column[0] * column[1] if mul else sum(column)) + carry
            expr = ("*".join(map(str, column)) if mul else "+".join(map(str, column))) + (f"+{carry}" if carry else "")
            carry, digit = divmod(value, 10)
            shown = f"{expr}={value}"
        out = f"{digit}{out}"
        lines.append(f"{shown} → {out}")
    if carry:
        out = f"{carry}{out}"
        lines.append(f"carry {carry} → {out}")
    return lines, out


def _columns(numbers: list[int]) -> list[list[int]]:
    """Digits of ``numbers`` aligned from the right, one list per column (rightmost first)."""
    width = max(len(str(n)) for n in numbers)
    padded = [str(n).zfill(width) for n in numbers]
    return [[int(p[-1 - i]) for p in padded] for i in range(width)]


def worked_solution(a: int, op: str, b: int) -> tuple[str, int]:
    """The `<think>` reasoning (without tags) and the result of ``a op b``."""
    if op == "+":
        steps, out = _digit_steps(_columns([a, b]))
        lines = [f"{a}+{b}, add digit by digit from the right:", *steps]
        result = int(out)
    elif op == "-":
        big, small = max(a, b), min(a, b)
        steps, out = _digit_steps(_columns([big, small]), borrow=True)
        head = [f"{a}-{b}, subtract digit by digit from the right:"]
        if a < b:
            head = [f"{a} is less than {b}, so compute {b}-{a} and negate:"]
        result = int(out) if a >= b else -int(out)
        lines = [*head, *steps] + ([f"negate: {result}"] if a < b else [])
    elif op == "*":
        lines, partials = [f"{a}*{b}, multiply by each digit of {b} from the right:"], []
        for place, digit in enumerate(reversed(str(b))):
            steps, out = _digit_steps([[d, int(digit)] for d in reversed([int(c) for c in str(a)])], mul=True)
            partial = int(out) * 10**place
            shift = f", shifted: {partial}" if place else ""
            lines.append(f"{a}*{digit}: " + "; ".join(steps) + shift)
            partials.append(partial)
        if len(partials) > 1:
            steps, out = _digit_steps(_columns(partials))
            lines += ["add the partial products:", *steps]
        result = int(out) if len(partials) > 1 else partials[0]
    else:
        raise ValueError(f"unknown operator {op!r}")
    lines.append(f"so {a}{op}{b}={result}")
    return "\n".join(lines), result


def make_problem(rng: random.Random) -> dict:
    """One chat example: ``{"messages": [user, assistant], "answer": str, "task": operator}``."""
    a, b, op = _operand(rng), _operand(rng), rng.choice(OPS)
    reasoning, result = worked_solution(a, op, b)
    question = rng.choice(PHRASINGS).format(a=a, op=op, b=b)
    reply = f"<think>\n{reasoning}\n</think>\n{result}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
            "answer": str(result), "task": op}


def make_split(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """``n`` problems from ``seed``; questions in ``exclude`` are skipped (keeps splits disjoint)."""
    rng, out, seen = random.Random(seed), [], set(exclude or ())
    while len(out) < n:
        example = make_problem(rng)
        key = example["messages"][0]["content"].replace(" ", "")
        if key not in seen:
            seen.add(key)
            out.append(example)
    return out


def render(messages: list[dict]) -> str:
    """The chat template's text for a finished conversation (what the tokenizer is trained on)."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 384) -> Path:
    """Trains a byte-level BPE on ``texts`` and writes tokenizer.json + tokenizer_config.json.

    Args:
        texts: training text (rendered chats); markers in it are ignored by the trainer.
        out_dir: directory to write into (created).
        vocab_size: BPE vocabulary including the 256 byte tokens; markers are added after it.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    marker_texts = [m[0] for m in MARKERS]
    stripped = (_strip_markers(t, marker_texts) for t in texts)
    tokenizer.train_from_iterator(stripped, trainer)
    spec = json.loads(tokenizer.to_str())
    first = max(spec["model"]["vocab"].values()) + 1
    markers = [AddedToken(first + i, text, special, rstrip) for i, (text, rstrip, special) in enumerate(MARKERS)]
    for token in markers:  # as sambay.text.o200k: a vocab entry keeps the marker's id in HF tokenizers
        spec["model"]["vocab"][to_byte_level(token.content.encode("utf-8"))] = token.id
    spec["added_tokens"] = [token.to_hf() for token in markers]
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "added_tokens_decoder": {str(t.id): t.to_hf() for t in markers},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    ids = {m.content: m.id for m in markers}
    generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|end|>"], ids["<|endoftext|>"]],
                  "pad_token_id": ids["<|endoftext|>"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return out_dir


def _strip_markers(text: str, markers: list[str]) -> str:
    for marker in markers:
        text = text.replace(marker, "\n")
    return text
