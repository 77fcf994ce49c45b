"""What an oversized request body costs the server: time, CPU and peak memory (issue 13).

    python3 benchmarks/body_cap.py [--at-once N] [--size-mb 50] [--chunked] [-- extra serve flags]

Starts `sambay serve --device cpu` on the embedded model, POSTs N bodies of ``--size-mb`` MB of JSON at
once (with Content-Length, or chunked), and prints the wall time, the server's CPU seconds (from
/proc/PID/stat) and its peak resident memory (VmHWM). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx


def _status(pid: int, key: str) -> float:
    """A /proc/PID/status memory field, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "sambay.cli", "serve", "--port", str(port), "--device", "cpu",
                               *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the server did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--at-once", type=int, default=1)
    p.add_argument("--size-mb", type=float, default=50.0)
    p.add_argument("--chunked", action="store_true")
    p.add_argument("serve_flags", nargs="*")
    args = p.parse_args()
    server, url = _start(args.serve_flags)
    body = json.dumps({"prompt": "hello " * (int(args.size_mb * 1e6) // 6), "max_tokens": 1}).encode()
    print(f"body {len(body) / 1e6:.1f} MB; server RSS {_status(server.pid, 'VmRSS'):.0f} MB")
    results, cpu0 = [], _cpu(server.pid)

    def post():
        started = time.monotonic()
        content = iter([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)]) if args.chunked else body
        try:
            r = httpx.post(url + "/v1/completions", content=content, timeout=300,
                           headers={"content-type": "application/json"})
            results.append((r.status_code, round(time.monotonic() - started, 2)))
        except httpx.HTTPError as e:
            results.append((repr(e), round(time.monotonic() - started, 2)))

    started = time.monotonic()
    threads = [threading.Thread(target=post) for _ in range(args.at_once)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    time.sleep(1)
    print(f"{args.at_once} at once: wall {wall:.2f} s, server CPU {_cpu(server.pid) - cpu0:.2f} s, server peak RSS "
          f"{_status(server.pid, 'VmHWM'):.0f} MB; answers {results}")
    server.terminate()
    server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
