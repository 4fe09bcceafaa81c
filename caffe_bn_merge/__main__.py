"""`python -m caffe_bn_merge` runs the `merge-bn` command line."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process imports this module
    sys.exit(main())
