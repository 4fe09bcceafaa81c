"""`python -m caffe_bn_merge` runs the `merge-bn` command line."""

import sys

from .cli import main

sys.exit(main())
