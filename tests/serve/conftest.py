"""Fixtures for the server tests: a tiny random model with the real tokenizer, and a live server on loopback.

The server runs uvicorn in a thread of the test process, on a free 127.0.0.1 port, with a scheduler of
8 slots; `client` is the official `openai` client pointed at it (no retries, bounded timeouts).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import sambay
from sambay.config import sambay_plan
from sambay.generate import Engine, SamplingParams
from sambay.generate.requests import SchedulerConfig
from sambay.tokenizer import write_tokenizer_json
from tests.conftest import RELEASED_CONFIG_DIR, random_model

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from sambay.serve.app import create_app  # noqa: E402  (after the importorskip of the serve extra)
from sambay.serve.server import ServeConfig, build_runtime  # noqa: E402

MODEL = "tiny-phi4"
GREEDY = SamplingParams(temperature=0, max_new_tokens=16)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A random model with the release's vocabulary (tiny width) and the release's tokenizer files. Its
    weights are large (`random_model`), so greedy outputs vary with the prompt and over a sequence: batch
    invariance, engine-process equality and stop tests can tell requests apart (the 0.02 init repeats one
    token)."""
    directory = tmp_path_factory.mktemp("models") / MODEL
    config = sambay.SambaYConfig(vocab_size=200064, d_model=16, n_heads=4, n_kv_heads=2, d_ff=16,
                                 plan=sambay_plan(8), window=5, max_seq_len=512)
    sambay.save_model(random_model(config, seed=1), directory)  # seed 1: 10+ distinct tokens in 16
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(RELEASED_CONFIG_DIR / name, directory / name)
    write_tokenizer_json(directory)
    return directory


@pytest.fixture(scope="session")
def engine(model_dir) -> Engine:
    torch.set_num_threads(1)  # tiny model: one thread is fastest and leaves a core to the HTTP side
    return Engine.load(model_dir, progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app in a background thread."""

    def __init__(self, app, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def runtime(engine, model_dir):
    scheduler = SchedulerConfig(slots=8, prefill_chunk=16, prefill_budget=32, max_waiting=64, block_size=16,
                                prefix_cache_bytes=10**7)  # prefix caching on, as `sambay serve` has it
    config = ServeConfig(model_dir=model_dir, scheduler=scheduler)
    runtime = build_runtime(engine, config)
    yield runtime
    runtime.scheduler.close(0)


@pytest.fixture(scope="session")
def server(runtime):
    with LiveServer(create_app(runtime), free_port()) as live:
        yield live


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def served(monkeypatch):
    """`serve` replaced by one that records the runtime and returns at once (CLI tests of `sambay serve`)."""
    runtimes = []
    monkeypatch.setattr("sambay.serve.server.serve", lambda runtime, *a: runtimes.append(runtime)
                        or runtime.scheduler.close(0))
    return runtimes
