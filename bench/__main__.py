"""Every benchmark as one table (`python -m bench`, `make bench`): figure, floor measured in the same run, ratio, goal.

    python -m bench [--quick] [--pull-mib N]

`--quick` shortens the fleet run (10 agents x 15 s) and the rounds, for a look rather than a figure.
"""

import argparse
import sys
import time
from collections.abc import Callable

from bench import common, fleet, pull, rpc, startup

parser = argparse.ArgumentParser(prog="python -m bench")
parser.add_argument("--quick", action="store_true", help="fewer rounds and a 15 s fleet")
parser.add_argument("--pull-mib", type=int, default=128, help="unpacked size of the pulled image (default 128)")
args = parser.parse_args()
began = time.monotonic()
rows: list[common.Row] = []
runs: tuple[tuple[str, Callable[[], list[common.Row]]], ...] = (
    ("start-up and memory", lambda: startup.rows(3 if args.quick else 7)),
    ("GetResource", lambda: rpc.rows(3 if args.quick else 7, 50)),
    ("fleet", lambda: fleet.rows(seconds=15.0 if args.quick else 45.0)),
    ("image pull", lambda: pull.rows(args.pull_mib, rounds=1 if args.quick else 3)),
)
for name, run in runs:
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    rows += run()
print(f"machine: {common.machine()}; medians of interleaved rounds; {time.monotonic() - began:.0f} s\n")
print(common.render(rows))
