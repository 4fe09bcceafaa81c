#!/usr/bin/env python3
"""Make the bundled sample nets (deterministic: same bytes on every run).

    python sample_nets/make_sample_nets.py [OUTDIR]     # default: this folder

The nets are defined in `caffe_bn_merge/synthetic/samples.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from caffe_bn_merge.synthetic.samples import write_samples


def main(outdir: Path) -> None:
    for stem in write_samples(outdir):
        print(f"wrote {stem}.prototxt/.caffemodel")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
