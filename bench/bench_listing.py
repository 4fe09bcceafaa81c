#!/usr/bin/env python3
"""Benchmark what every task of a job array pays before converting: listing the whole fleet's tree
and checking every output (`merge-bn batch SRC --shard i/n --report R`), per deployment of the tree.

    python bench/bench_listing.py [--folders 2500] [--models 2] [--shard 1/64] [--repeat 5]
                                  [--checkout DIR ...]

Makes a tree of `--folders` deployment folders in 25 sites (`site_NN/dev_NNNNN/`), each with a deploy
prototxt (sample_nets/mobilenet_ssd's), `--models` caffemodels (a few bytes: listing never reads them)
and a text file, then times, each round in a new process per checkout (in turn), the work list of
shard `--shard` with the report check (`build_work_list` and the check `--report` adds: discovery,
every input's and output's identity, this shard's prototxts read). `--checkout` times other
checkouts of the package too (e.g. a `git archive` of an earlier commit), next to this one.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "sample_nets" / "mobilenet_ssd.prototxt"

# Run in a new process with a checkout's root on sys.path: seconds of one shard's work list.
CHILD = """
import sys, time
from pathlib import Path
from caffe_bn_merge.batch.command import _check_report
from caffe_bn_merge.batch.worklist import build_work_list, parse_shard
tree, shard = Path(sys.argv[1]), parse_shard(sys.argv[2])
start = time.perf_counter()
work = build_work_list([tree], tree.parent / "out", part=shard)
_check_report(tree.parent / "report.json", work)
print(time.perf_counter() - start, work.total, len(work.items))
"""


def make_tree(tree: Path, folders: int, models: int) -> None:
    """`folders` deployment folders under `tree`, in 25 sites."""
    deploy = DEPLOY.read_text()
    for i in range(folders):
        folder = tree / f"site_{i % 25:02d}" / f"dev_{i:05d}"
        folder.mkdir(parents=True)
        (folder / "deploy.prototxt").write_text(deploy)
        for j in range(models):
            (folder / f"model_{j}.caffemodel").write_bytes(b"\0" * 16)
        (folder / "notes.txt").write_text("calibrated 2026\n")


def time_listing(checkout: Path, tree: Path, shard: str) -> tuple[float, int, int]:
    """Seconds, deployments of the tree and of the shard, in a new process importing `checkout`."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), shard], check=True, capture_output=True, text=True, cwd=checkout
    )
    seconds, total, items = done.stdout.split()
    return float(seconds), int(total), int(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_listing.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=2500, help="deployment folders (default %(default)s)")
    parser.add_argument("--models", type=int, default=2, help="caffemodels a folder (default %(default)s)")
    parser.add_argument("--shard", default="1/64", help="the task's shard, i/n (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default %(default)s)")
    parser.add_argument("--checkout", type=Path, action="append", default=[], help="another checkout to time")
    args = parser.parse_args(argv)
    checkouts = [ROOT, *(path.resolve() for path in args.checkout)]
    with tempfile.TemporaryDirectory(prefix="bench_listing_") as folder:
        tree = Path(folder) / "fleet"
        make_tree(tree, args.folders, args.models)
        for checkout in checkouts:  # untimed: byte-code compiled, the tree in the page cache
            time_listing(checkout, tree, args.shard)
        times: dict[Path, list[float]] = {checkout: [] for checkout in checkouts}
        for _ in range(args.repeat):
            for checkout in checkouts:
                seconds, total, items = time_listing(checkout, tree, args.shard)
                times[checkout].append(seconds)
        shutil.rmtree(tree)
    print(f"tree: {args.folders} folders, {total} deployments; shard {args.shard}: {items} deployments")
    for checkout, values in times.items():
        median = statistics.median(values)
        print(
            f"{checkout}: {median:.3f} s ({min(values):.3f}-{max(values):.3f}) = "
            f"{1000 * median / total:.3f} ms per deployment of the tree"
            + (f"; {median / statistics.median(times[ROOT]):.2f}x this checkout's" if checkout != ROOT else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
