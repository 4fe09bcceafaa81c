"""`python -m caffe_bn_merge` runs the `merge-bn` command line."""

from .cli import run

if __name__ == "__main__":  # not when a spawned worker process imports this module
    run()
