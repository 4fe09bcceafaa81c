#!/usr/bin/env python3
"""Benchmark `merge-bn batch` on a synthetic fleet of MobileNet-SSD deployments, against `cp -r`.

    python bench/bench_batch.py [--count 120] [--seed 0] [--widths 0.1875,0.25,0.3125] [--repeat 5]
                                [--verify] [--keep DIR]

Makes a fleet (`caffe_bn_merge.synthetic.fleet.make_fleet`: `--count` folders of 1-3 caffemodels
each, MobileNet-SSD of `--widths` and several class counts, distinct weights, nothing broken),
runs one untimed round (byte-code compiled and cached as for an installed package, the fleet in
the page cache), then, `--repeat` times in turn, each command after `sync` and into a file system
cleared of the earlier commands' outputs:

1. `cp -r` of the fleet (the floor: the bytes read and written);
2. `merge-bn batch --jobs 1` and `merge-bn batch --jobs 2`, each a new process as a user runs it
   (interpreter start, discovery, workers, the JSON report included);
3. the machine's own scaling: a pure-Python loop (no files, little memory) run twice in one process,
   then once in each of two processes side by side. Two free cores give 2x; what this machine gives
   in that round bounds what `--jobs 2` can gain over `--jobs 1` (this machine's 2 cores are
   shared: the loop has measured 1.2-2.25x).

Each ratio is taken within one round (the same machine load for all its commands), and the median round
is shown with the spread, with the CPU time of all processes of each run (less sensitive to other
work on the machine than wall time), and the seconds each run spends outside converting (its wall
time less the deployments' own seconds over its processes: what keeps --jobs 2 from halving
--jobs 1). The per-deployment cost in a warm process for an architecture seen before comes from
the `--jobs 1` reports: the median `seconds` (and `cpu_seconds`) of rows with `net_cached`, with
their read / plan / write breakdown, next to the time `cp` takes per deployment.

Targets (issue 19): --jobs 2 wall <= 10x cp -r; --jobs 1 / --jobs 2 >= 1.8x; a repeated
architecture <= 5 ms + its copy time. The jobs ratio is also shown over the machine's scaling of
the same round (1.0: --jobs 2 gains what two processes of pure computation gain). Other work on the
machine skews all of this: read the load average printed with the figures.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caffe_bn_merge.synthetic.fleet import make_fleet  # noqa: E402

# The size issue 19 measured: ~1.7 MB (0.9-2.5) and a ~25 KB prototxt a deployment, as sample_nets/mobilenet_ssd
FLEET_WIDTHS = (0.1875, 0.25, 0.3125)

MERGE_BN = [sys.executable, "-m", "caffe_bn_merge"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_batch.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--count", type=int, default=120, help="deployment folders (default 120: ~200 caffemodels)")
    parser.add_argument("--seed", type=int, default=0, help="fleet seed (default 0)")
    parser.add_argument(
        "--widths",
        type=widths,
        default=FLEET_WIDTHS,
        help=f"MobileNet-SSD widths, comma-separated (default: {','.join(map(str, FLEET_WIDTHS))})",
    )
    parser.add_argument("--repeat", type=int, default=5, help="rounds of cp / jobs 1 / jobs 2 (default %(default)s)")
    parser.add_argument("--verify", action="store_true", help="also verify every output on OpenCV in the batch runs")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="build the fleet in DIR and keep it, with the reports")
    return parser


def widths(text: str) -> tuple[float, ...]:
    """`--widths`: comma-separated positive numbers."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None
    if not all(0 < value <= 4 for value in values):
        raise argparse.ArgumentTypeError(f"widths must be in (0, 4]: {text!r}")
    return values


def child_environment(root: Path) -> dict[str, str]:
    """This checkout on the path, and byte-code cached under `root` (as an installed package has it:
    PYTHONDONTWRITEBYTECODE, which this machine's shells set, would make every process compile
    every module of the package again)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return env | {"PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": str(root / "pycache")}


def timed_run(command: list[str], env: dict[str, str], copies: int = 1) -> tuple[float, float]:
    """Wall and CPU (user + system, all processes) seconds of `copies` processes of `command` side
    by side, which must succeed. The data written before are flushed to disk first, so that no
    command pays for another's writing."""
    os.sync()
    start, before = time.perf_counter(), os.times()
    processes = [subprocess.Popen(command, env=env) for _ in range(copies)]
    if any([process.wait() for process in processes]):
        raise SystemExit(f"failed: {shlex.join(command)}")
    after = os.times()
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return time.perf_counter() - start, cpu


# The machine's scaling: `LOOP_COUNT` steps of a pure-Python loop, ~0.6 s on this machine
LOOP = "s = 0\nfor i in range({}):\n    s += i * i"
LOOP_COUNT = 5_000_000


def one_round(root: Path, fleet: Path, number: int, verify: bool) -> dict[str, tuple[float, float]]:
    """cp -r, batch --jobs 1, batch --jobs 2 of the fleet, then the loop twice in one process and
    once in each of two side by side, one after the other: (wall, CPU) seconds. Each command
    writes into a file system as it found it: the copy and the outputs are removed after it (the
    page cache filling up with earlier rounds' files made `cp -r` 5x slower)."""
    env = child_environment(root)
    times = {"cp": timed_run(["cp", "-r", str(fleet), str(root / "copy")], env)}
    shutil.rmtree(root / "copy")
    for jobs in (1, 2):
        out, report = root / "out", root / f"report{number}_{jobs}.json"
        args = [str(fleet), "--out", str(out), "--jobs", str(jobs), "--report", str(report), "-q"]
        times[f"jobs{jobs}"] = timed_run([*MERGE_BN, "batch", *args, *(["--verify"] if verify else [])], env)
        shutil.rmtree(out)
    times["loop1"] = timed_run([sys.executable, "-c", LOOP.format(2 * LOOP_COUNT)], env)
    times["loop2"] = timed_run([sys.executable, "-c", LOOP.format(LOOP_COUNT)], env, copies=2)
    return times


def warm_rows(reports: list[Path]) -> list[dict]:
    """The converted rows of --jobs 1 runs whose prototxt came from the process's cache."""
    rows = [d for path in reports for d in json.loads(path.read_text())["deployments"]]
    return [d for d in rows if d["status"] == "converted" and d.get("net_cached")]


def outside(wall: float, report: Path, jobs: int) -> float:
    """The seconds of a run spent outside converting (start, discovery, workers' start, end): its
    wall time less the deployments' own seconds shared among its `jobs` processes."""
    return wall - sum(d["seconds"] for d in json.loads(report.read_text())["deployments"]) / jobs


def median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def run(root: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    count, repeat, verify = args.count, args.repeat, args.verify
    start = time.perf_counter()
    deployments = make_fleet(root / "fleet", count, args.seed, broken=None, widths=args.widths)
    made = time.perf_counter() - start
    n = sum(len(d.caffemodels) for d in deployments)
    size = sum(p.stat().st_size for p in (root / "fleet").rglob("*") if p.is_file())
    architectures = len({(d.width, d.classes) for d in deployments})
    subprocess.run([*MERGE_BN, "--help"], check=True, env=child_environment(root), capture_output=True)
    one_round(root, root / "fleet", -1, verify)  # untimed: byte-code compiled and cached, the fleet read once
    rounds = [one_round(root, root / "fleet", i, verify) for i in range(repeat)]
    cp, jobs1, jobs2 = ([r[k][0] for r in rounds] for k in ("cp", "jobs1", "jobs2"))
    cpu = {k: statistics.median(r[k][1] for r in rounds) for k in ("cp", "jobs1", "jobs2")}
    to_cp = [r["jobs2"][0] / r["cp"][0] for r in rounds]
    speedup = [r["jobs1"][0] / r["jobs2"][0] for r in rounds]
    machine = [r["loop1"][0] / r["loop2"][0] for r in rounds]
    start_end = {
        jobs: [outside(r[f"jobs{jobs}"][0], root / f"report{i}_{jobs}.json", jobs) for i, r in enumerate(rounds)]
        for jobs in (1, 2)
    }
    warm = warm_rows([root / f"report{i}_1.json" for i in range(repeat)])
    copy_ms = 1000 * statistics.median(cp) / n
    warm_ms = {k: 1000 * statistics.median(d[k] for d in warm) for k in ("seconds", "cpu_seconds", *STEPS)}
    return [
        ("fleet", f"{count} folders, {n} deployments, {architectures} architectures, {size / 1e6:.0f} MB"),
        ("", f"MobileNet-SSD of widths {', '.join(f'{w:g}' for w in args.widths)}, seed {args.seed}"),
        ("", f"made in {made:.1f} s; {repeat} rounds of cp / jobs 1 / jobs 2, median (min-max)"),
        ("cp -r, wall s", median_spread(cp) + f"; CPU {cpu['cp']:.2f} s"),
        (
            "batch --jobs 1, wall s",
            median_spread(jobs1) + f"  = {1000 * statistics.median(jobs1) / n:.1f} ms each; CPU {cpu['jobs1']:.2f} s",
        ),
        (
            "batch --jobs 2, wall s",
            median_spread(jobs2) + f"  = {1000 * statistics.median(jobs2) / n:.1f} ms each; CPU {cpu['jobs2']:.2f} s",
        ),
        ("jobs 2 / cp -r", median_spread(to_cp) + "x  (target <= 10x)"),
        ("jobs 1 / jobs 2", median_spread(speedup) + "x  (target >= 1.8x)"),
        (
            "machine, 1 / 2 processes",
            median_spread(machine) + "x  (the loop twice in one process / once in each of two side by side)",
        ),
        (
            "jobs ratio / machine's",
            median_spread([s / m for s, m in zip(speedup, machine, strict=True)])
            + "  (per round; 1: all that two processes gain here)",
        ),
        (
            "outside converting, s",
            f"jobs 1 {median_spread(start_end[1])}, jobs 2 {median_spread(start_end[2])}  (wall less the "
            "deployments' seconds / jobs: start, discovery, workers' start, end)",
        ),
        (
            "each round",
            "; ".join(
                f"cp {r['cp'][0]:.2f} j1 {r['jobs1'][0]:.2f} j2 {r['jobs2'][0]:.2f} loop {m:.2f}x"
                for r, m in zip(rounds, machine, strict=True)
            ),
        ),
        (
            "warm, repeated architecture",
            f"{warm_ms['seconds']:.1f} ms per deployment, CPU {warm_ms['cpu_seconds']:.1f} (median of {len(warm)}): "
            + ", ".join(f"{step.split('_')[0]} {warm_ms[step]:.1f}" for step in STEPS)
            + f"; cp {copy_ms:.1f} ms per deployment  (target <= 5 ms + cp)",
        ),
        ("", f"{sum(bool(d.get('replayed')) for d in warm)} of the {len(warm)} replayed a recorded merge"),
        ("verify", "on" if verify else "off"),
        ("machine", f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end"),
        ("command", shlex.join([*MERGE_BN, "batch", "FLEET", "--out", "OUT", "--jobs", "N", "--report", "R", "-q"])),
    ]


STEPS = ("read_seconds", "plan_seconds", "write_seconds")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        raise SystemExit("--count and --repeat must be at least 1")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)
        rows = run(args.keep, args)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_batch_") as folder:
            rows = run(Path(folder), args)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
