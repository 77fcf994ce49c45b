"""`import sambay` works without a GPU, imports nothing heavy it does not need, and changes no global state."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys, torch
before = (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
import sambay
after = (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
assert before == after, (before, after)
heavy = [m for m in ("triton", "sambay.tokenizer", "sambay.generate", "jinja2", "fastapi") if m in sys.modules]
assert not heavy, heavy
assert sambay.SamplingParams.__name__ == "SamplingParams"  # the lazy public names resolve
print("ok")
"""


def test_import_has_no_side_effects():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
