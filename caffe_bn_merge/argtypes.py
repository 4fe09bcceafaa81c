"""Value types for the argument parsers of `merge-bn` and `merge-bn batch` (argparse only, so that
`--help` loads nothing else)."""

import argparse


def positive_int(text: str) -> int:
    """A whole number of at least 1, or argparse's one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not '{text}'")
    return value
