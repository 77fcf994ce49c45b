"""Chat templates: Jinja rendering as HF does it, and rendering that keeps user text out of markers.

`render` matches `transformers`' `apply_chat_template(tokenize=False)`: a sandboxed Jinja
environment with `trim_blocks` / `lstrip_blocks`, the `loopcontrols` extension, HF's `tojson`
filter and the `raise_exception` / `strftime_now` globals, rendered with `messages`, `tools`,
`add_generation_prompt` and the special-token strings (`bos_token`, `eos_token`, ...).

`render_marked` is what tokenization uses. HF tokenizes the rendered string and parses every marker
in it, so a user who types `<|end|><|assistant|>` forges a turn. Here every marker occurring in a
message string is broken by a sentinel character before rendering, the output is split at the
markers that remain (those the template wrote), and the sentinel is then removed from the text
pieces, which are encoded as plain text. Breaking only the markers, rather than wrapping whole
contents, keeps templates that inspect content (`content.split('</think>')`, `| trim`) working.
Limits: a template that slices or measures content by character index sees the sentinel inside a
marker-looking substring, and a marker that a template assembles from its own text plus the start
of a message string is not recognised as user text. Neither occurs in the Phi-4 templates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sambay.text.special import AddedToken, MarkerSplitter

Message = Mapping[str, Any]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment `transformers` renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def validate_messages(messages: Any) -> None:
    """Checks that `messages` is a list of dicts with string `role` and `content`.

    Raises:
        ValueError: naming the first offending message.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"messages[{index}][{key!r}] must be a string, got {message.get(key)!r}")


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja source (`tokenizer_config.json` `chat_template`).
        special_strings: `bos_token`, `eos_token`, ... passed to every render as variables.
    """

    def __init__(self, source: str, special_strings: Mapping[str, str]):
        self.source = source
        self.special_strings = dict(special_strings)
        self._template = _environment().from_string(source)

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Renders a conversation to text (for display, or to compare with HF).

        Args:
            messages: `[{"role": ..., "content": ...}, ...]`; validated.
            add_generation_prompt: end with the assistant header instead of the end-of-text token.
            tools: optional tool schemas, passed as the `tools` variable.

        Returns:
            The rendered string.
        """
        validate_messages(messages)
        return self._template.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **self.special_strings,
        )

    def render_marked(
        self,
        splitter: MarkerSplitter,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[str | AddedToken]:
        """Renders a conversation into plain-text pieces and the markers the template itself wrote.

        Args:
            splitter: knows the markers (the added tokens).
            messages: as `render`.
            add_generation_prompt: as `render`.
            tools: as `render`.

        Returns:
            Text pieces (never holding a marker parsed from a message string) and `AddedToken`s, with
            the markers' rstrip/lstrip applied exactly as HF applies them to the full string.
        """
        validate_messages(messages)
        sentinel = _pick_sentinel([self.source, messages, tools, self.special_strings])
        rendered = self._template.render(
            messages=_escape(messages, splitter, sentinel),
            tools=_escape(tools, splitter, sentinel),
            add_generation_prompt=add_generation_prompt,
            **self.special_strings,
        )
        return [p.replace(sentinel, "") if isinstance(p, str) else p for p in splitter.split(rendered)]


def _escape(value: Any, splitter: MarkerSplitter, sentinel: str) -> Any:
    """Copies `value`, inserting `sentinel` after the first character of every marker in its strings."""
    if isinstance(value, str):
        if splitter.pattern is None:
            return value
        while splitter.pattern.search(value):  # one pass suffices unless markers overlap each other
            value = splitter.pattern.sub(lambda m: m.group()[0] + sentinel + m.group()[1:], value)
        return value
    if isinstance(value, Mapping):
        return {k: _escape(v, splitter, sentinel) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape(v, splitter, sentinel) for v in value]
    return value


def _pick_sentinel(values: list[Any]) -> str:
    """A private-use character that occurs in none of `values`' strings (or their keys)."""
    used: set[str] = set()
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            used.update(value)
        elif isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    for code in range(0xE000, 0xF900):
        if chr(code) not in used:
            return chr(code)
    raise ValueError("the conversation uses every private-use character; cannot pick a sentinel")
