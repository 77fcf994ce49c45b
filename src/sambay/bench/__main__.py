"""`python -m sambay.bench`: the same as `sambay bench` (useful where the console script is not installed)."""

from __future__ import annotations

import argparse

from sambay.cli import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sambay.bench", description=bench.__doc__)
    bench.add_arguments(parser)
    raise SystemExit(bench.main(parser.parse_args()))
