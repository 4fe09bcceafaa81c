"""Forward time of the float64 reference engine (`caffe_bn_merge.verification.reference`) on MobileNet-SSD.

    python bench/bench_reference.py [--runs 3]

Times `run_reference` on sample_nets/mobilenet_ssd (300x300) and, when `../shared/real_nets` is
beside the repo, on mobilenet_ssd_0.5_hx: the original and its merge (made in a temporary folder),
asking for the blobs `--verify` compares. Prints the best of `--runs` wall-clock times per model.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caffe_bn_merge import merge  # noqa: E402
from caffe_bn_merge.graph import build_graph  # noqa: E402
from caffe_bn_merge.io.read import read_net  # noqa: E402
from caffe_bn_merge.verification.compare import compare_points, random_inputs  # noqa: E402
from caffe_bn_merge.verification.reference import run_reference  # noqa: E402

REAL = ROOT.parent / "shared" / "real_nets" / "mobilenet_ssd_0.5_hx"
NETS = {
    "mobilenet_ssd (sample)": (
        ROOT / "sample_nets/mobilenet_ssd.prototxt",
        ROOT / "sample_nets/mobilenet_ssd.caffemodel",
    ),
    "mobilenet_ssd_0.5_hx": (REAL / "MobileNetSSD_deploy_bn.DERIVED.prototxt", REAL / "mobilenet_0.5.caffemodel"),
}


def best_time(model: Path, weights: Path, runs: int) -> float:
    """Best wall-clock seconds of `runs` evaluations of the gating compare points."""
    points = [p for p in compare_points(build_graph(read_net(model))).values() if p.gating]
    outputs = [(p.layer, p.top) for p in points]
    inputs = random_inputs(model)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run_reference(model, weights, inputs, outputs)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for label, (model, weights) in NETS.items():
            if not model.is_file():
                print(f"{label:24} skipped: {model} is missing")
                continue
            merged = (Path(tmp) / f"{model.stem}_merged.prototxt", Path(tmp) / f"{model.stem}_merged.caffemodel")
            merge(model, weights, *merged)
            original_s = best_time(model, weights, args.runs)
            merged_s = best_time(*merged, args.runs)
            print(f"{label:24} original {original_s:6.2f} s   merged {merged_s:6.2f} s   (best of {args.runs})")


if __name__ == "__main__":
    main()
