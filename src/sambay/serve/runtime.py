"""What the HTTP layer needs around the scheduler: submission with HTTP errors, asyncio streams, metrics.

`AsyncStream` carries a request's outputs from the model thread to the event loop. `Runtime.submit`
maps the scheduler's refusals to OpenAI errors (429 queue full, 503 shutting down, 413 too long);
`Runtime.outputs` iterates a request's outputs, records metrics, and cancels the request (freeing its
slots) when the consumer stops early: a client that disconnects mid-stream (Starlette cancels the
response), or a non-streaming client that goes away. The latter is polled on a timer, every ``poll_s``
whether or not tokens arrive meanwhile: polling only when none had come for ``poll_s`` left a gone
client's slot busy until its generation ended (issue 13).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request as HTTPRequest

from sambay.generate import SamplingParams
from sambay.generate.core import EngineCore
from sambay.generate.requests import Output, PromptTooLong, QueueFull, Request, SchedulerClosed
from sambay.serve.errors import APIError
from sambay.serve.metrics import Metrics
from sambay.serve.protocol import Prepared
from sambay.tokenizer import Tokenizer


class _Channel:
    """One consumer's outputs on the loop: a deque and, while the consumer waits, one future to wake it
    (cheaper per token than an `asyncio.Queue`, whose every `get` makes a waiter and, with a timeout, a task)."""

    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: deque[Output] = deque()
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, output: Output) -> None:
        self.items.append(output)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Mailbox:
    """Hands outputs from the model thread to one event loop, with one wake-up per batch.

    A decode step produces an output for every running request; posting each with its own
    ``call_soon_threadsafe`` would wake the loop (a pipe write and a callback) once per request per
    step. Outputs posted while a hand-over is pending join it, so a step costs one wake-up.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._lock = loop, threading.Lock()
        self._items: list[tuple[_Channel, Output]] = []
        self._scheduled = False

    def post(self, channel: _Channel, output: Output) -> None:
        with self._lock:
            self._items.append((channel, output))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for channel, output in items:
            channel.put_nowait(output)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


class AsyncStream:
    """A request's outputs on an asyncio loop: `put` is the sink (any thread); `get` awaits the next one.

    Must be created on the loop that reads it; one consumer.
    """

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._mailbox = _MAILBOXES.setdefault(self._loop, _Mailbox(self._loop))
        self._channel = _Channel()

    def put(self, output: Output) -> None:
        """Thread-safe; outputs for a closed loop are dropped."""
        self._mailbox.post(self._channel, output)

    async def get(self, timeout: float | None = None) -> Output | None:
        """The next output, or None after ``timeout`` seconds."""
        channel = self._channel
        if not channel.items:
            channel.waiter = waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(waiter, timeout) if timeout is not None else await waiter
            except TimeoutError:
                return None
            finally:
                channel.waiter = None
        return channel.items.popleft()

    def ready(self) -> list[Output]:
        """The outputs already waiting, without blocking."""
        items = list(self._channel.items)
        self._channel.items.clear()
        return items


@dataclass
class Runtime:
    """The serving state shared by all routes."""

    tokenizer: Tokenizer
    scheduler: EngineCore  # or `RemoteScheduler`, its stand-in for a core in another process
    model_name: str
    defaults: SamplingParams  # sampling fields a request leaves unset
    api_key: str | None = None
    poll_s: float = 0.5  # how often a non-streaming request checks that its client is still there
    adapters: tuple[str, ...] = ()  # LoRA adapter names clients pass as "model", in slot order (slot 1 first)

    def __post_init__(self):
        self.metrics = Metrics(self.scheduler)
        # bytes of the longest token, a bound on its characters: a text of more characters than
        # (max_length - 1) times this cannot fit the context, whatever the tokenizer makes of it
        self.max_token_chars = max(len(self.tokenizer.token_bytes(i)) for i in range(self.tokenizer.vocab_size))

    @property
    def max_length(self) -> int:
        return self.scheduler.max_length

    @property
    def draining(self) -> bool:
        return self.scheduler.closing

    def check_model(self, name: str) -> int:
        """The adapter slot a request's ``model`` selects: 0 for the base model, k for the k-th adapter; an
        unknown name is a 404."""
        if name == self.model_name:
            return 0
        if name in self.adapters:
            return self.adapters.index(name) + 1
        served = ", ".join(repr(n) for n in (self.model_name, *self.adapters))
        raise APIError(404, f"model {name!r} does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    def submit(self, prepared: Prepared, adapter: int = 0) -> tuple[Request, AsyncStream]:
        """Queue a request (run with LoRA adapter slot ``adapter``, 0: the base model); refusals become
        OpenAI errors."""
        stream = AsyncStream()
        try:
            request = self.scheduler.submit(prepared.prompt, prepared.params, stream.put, adapter)
        except QueueFull as e:
            raise APIError(429, f"{e}; retry later", code="queue_full") from None
        except SchedulerClosed as e:
            raise APIError(503, str(e), code="shutting_down") from None
        except PromptTooLong as e:
            raise APIError(413, str(e), param="messages", code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        self.metrics.prompt_tokens.inc(len(prepared.prompt))
        return request, stream

    async def outputs(self, request: Request, stream: AsyncStream, http: HTTPRequest | None = None
                      ) -> AsyncIterator[Output]:
        """The request's outputs until its last; cancels it if the caller stops early or ``http`` disconnects."""
        async for batch in self.batches(request, stream, http):
            for output in batch:
                yield output

    async def batches(self, request: Request, stream: AsyncStream, http: HTTPRequest | None = None
                      ) -> AsyncIterator[list[Output]]:
        """As `outputs`, grouped: each batch holds every output that had arrived when the previous one was
        taken (one network write per batch for a stream that fell behind)."""
        finished, previous = False, None
        watch = None if http is None else _DisconnectWatch(http, self.poll_s)
        try:
            while not finished:
                output = await stream.get(None if watch is None else watch.timeout())
                if watch is not None and await watch.is_gone():
                    return
                if output is None:
                    continue
                batch = [output, *stream.ready()]
                for output in batch:
                    self.metrics.observe(request, output, previous)
                    previous = output.time if output.deltas else previous
                    finished = finished or output.finished
                yield batch
        finally:
            if not finished:
                request.cancel()


class _DisconnectWatch:
    """Asks whether an HTTP client is still there at most every ``poll_s`` seconds, on a timer: the check
    is due when its time comes, however many outputs arrived since the last one."""

    def __init__(self, http: HTTPRequest, poll_s: float):
        self.http, self.poll_s = http, poll_s
        self.due = time.monotonic() + poll_s

    def timeout(self) -> float:
        """How long the next wait for an output may last before the check is due."""
        return max(self.due - time.monotonic(), 0.0)

    async def is_gone(self) -> bool:
        """Whether the client disconnected; asks only when the check is due (a non-blocking receive)."""
        now = time.monotonic()
        if now < self.due:
            return False
        self.due = now + self.poll_s
        return await self.http.is_disconnected()
