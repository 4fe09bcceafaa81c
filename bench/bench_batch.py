#!/usr/bin/env python3
"""Benchmark `merge-bn batch` on a synthetic fleet of MobileNet-SSD deployments.

    python bench/bench_batch.py [--count 50] [--seed 0] [--verify] [--keep DIR]

Makes a fleet (`caffe_bn_merge.synthetic.fleet.make_fleet`, nothing broken: every pair converts), then times:

1. merge() alone on every (prototxt, caffemodel) pair, in this process: the single-model conversion
   time, summed;
2. `merge-bn batch --jobs 1` (in this process) and `merge-bn batch --jobs 2` (worker processes), one
   run each, wall time including discovery, the work list and the JSON report.

Prints a short table: the jobs 1 / jobs 2 ratio and the per-deployment overhead of the batch run
beyond the single-model conversion time ((batch --jobs 1 wall - merge() sum) / deployments).
One run of each, on whatever else the machine is doing: read the figures as rough.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from caffe_bn_merge.batch import command
from caffe_bn_merge.pipeline import merge
from caffe_bn_merge.synthetic.fleet import make_fleet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_batch.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--count", type=int, default=50, help="deployment folders in the fleet (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="fleet seed (default 0)")
    parser.add_argument("--verify", action="store_true", help="also verify every output on OpenCV in the batch runs")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="build the fleet and outputs in DIR and keep them")
    return parser


def timed(action: object) -> tuple[float, object]:
    start = time.perf_counter()
    value = action()
    return time.perf_counter() - start, value


def run(root: Path, count: int, seed: int, verify: bool) -> list[tuple[str, str]]:
    made, fleet = timed(lambda: make_fleet(root / "fleet", count, seed, broken=None))
    pairs = [pair for deployment in fleet for pair in deployment.pairs]
    scratch = root / "scratch"
    scratch.mkdir()
    merge(*pairs[0], scratch / "warm.prototxt", scratch / "warm.caffemodel")  # imports, caches
    alone, cpu_before = 0.0, cpu_seconds()
    for i, (prototxt, caffemodel) in enumerate(pairs):
        seconds, _ = timed(
            lambda p=prototxt, c=caffemodel, i=i: merge(p, c, scratch / f"{i}.prototxt", scratch / f"{i}.caffemodel")
        )
        alone += seconds
    alone_cpu = cpu_seconds() - cpu_before
    walls, cpus = {}, {}
    for jobs in (1, 2):
        args = [str(root / "fleet"), "--out", str(root / f"out{jobs}"), "--jobs", str(jobs), "-q"]
        args += ["--report", str(root / f"report{jobs}.json")] + (["--verify"] if verify else [])
        before = cpu_seconds()
        walls[jobs], code = timed(lambda a=args: command.main(a))
        cpus[jobs] = cpu_seconds() - before
        if code != 0:
            raise SystemExit(f"batch --jobs {jobs} exited {code}: see {root / f'report{jobs}.json'}")
    report = json.loads((root / "report1.json").read_text())
    in_items = sum(d["seconds"] for d in report["deployments"])
    n = len(pairs)
    return [
        ("fleet", f"{count} folders, {n} deployments (prototxt + caffemodel pairs), made in {made:.1f} s"),
        ("merge() alone, summed", f"{alone:.2f} s ({1000 * alone / n:.1f} ms per deployment), CPU {alone_cpu:.2f} s"),
        (
            "batch --jobs 1, wall",
            f"{walls[1]:.2f} s ({1000 * walls[1] / n:.1f} ms per deployment), CPU {cpus[1]:.2f} s",
        ),
        (
            "batch --jobs 2, wall",
            f"{walls[2]:.2f} s ({1000 * walls[2] / n:.1f} ms per deployment), CPU {cpus[2]:.2f} s",
        ),
        ("jobs 1 / jobs 2", f"{walls[1] / walls[2]:.2f}x"),
        ("overhead per deployment", f"{1000 * (walls[1] - alone) / n:.1f} ms (batch --jobs 1 wall - merge() sum) / n"),
        ("  in CPU time", f"{1000 * (cpus[1] - alone_cpu) / n:.1f} ms (batch --jobs 1 CPU - merge() CPU) / n"),
        (
            "  of which in the item",
            f"{1000 * (in_items - alone) / n:.1f} ms (report's per-item seconds - merge() sum) / n",
        ),
        ("verify", "on" if verify else "off"),
        (
            "machine",
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end (other work skews all of this)",
        ),
    ]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.count < 1:
        raise SystemExit("--count must be at least 1")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)
        rows = run(args.keep, args.count, args.seed, args.verify)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_batch_") as folder:
            rows = run(Path(folder), args.count, args.seed, args.verify)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
