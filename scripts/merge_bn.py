#!/usr/bin/env python3
"""The classic entry point: `python scripts/merge_bn.py --model deploy.prototxt --weights model.caffemodel`.

Same flags as the `merge-bn` command; works from a source checkout without installing the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from caffe_bn_merge.cli import run

if __name__ == "__main__":
    run()
