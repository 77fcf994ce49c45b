"""`sambay serve` refuses capacity flags it cannot honour, before binding a port."""

from __future__ import annotations

import pytest

from sambay.cli import __main__ as cli


@pytest.mark.parametrize(("flags", "message"), [
    (["--cache-memory-gb", "0.0000001"], "constant state"),  # not even the slots' Mamba and window state
    (["--cache-memory-gb", "0.0001"], "less than one sequence"),  # some blocks, not a max-length sequence
    (["--cache-memory-gb", "0.05", "--slots", "2", "--max-length", "512", "--block-size", "16"], None),
    (["--block-size", "24"], "power of two"),
])
def test_capacity_flags(model_dir, capsys, monkeypatch, flags, message):
    served = []
    monkeypatch.setattr("sambay.serve.server.serve", lambda runtime, *a: served.append(runtime.scheduler.memory)
                        or runtime.scheduler.close(0))
    if message is None:  # a budget that fits: the pool is what remains after the slots' state
        assert cli.main(["serve", "--model", str(model_dir), "--device", "cpu", *flags]) == 0
        [memory] = served
        assert memory.slots == 2 and 0 < memory.total_bytes <= 0.05e9 and memory.kv_blocks >= 512 // 16
        return
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--model", str(model_dir), "--device", "cpu", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not served
