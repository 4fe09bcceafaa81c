"""Any non-finite difference fails verification, wherever it is: in any compared blob, at any
position of the array, as NaN or as an infinity, on either side (issue 16, item 8)."""

import itertools

import numpy as np
import pytest

from caffe_bn_merge.verification.compare import VerifyResult, blob_error

SHAPE = (1, 3, 4, 5)
BAD = (np.nan, np.inf, -np.inf)


def _clean(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE)


def _result(errors: list) -> VerifyResult:
    return VerifyResult("opencv", 1e-4, "random", tuple(errors))


@pytest.mark.parametrize("blobs", [1, 2, 5])
def test_a_non_finite_value_anywhere_fails(blobs: int) -> None:
    positions = [0, 7, int(np.prod(SHAPE)) - 1]
    for broken, position, value, side in itertools.product(range(blobs), positions, BAD, ("merged", "original")):
        errors = []
        for i in range(blobs):
            ref, out = _clean(i), _clean(i).copy()
            if i == broken:
                target = out if side == "merged" else ref
                target.flat[position] = value
            errors.append(blob_error(f"blob{i}", ref, out, gating=True))
        checked = _result(errors)
        assert not checked.passed, (blobs, broken, position, value, side)
        assert not np.isfinite(checked.max_relative)


def test_identical_finite_outputs_pass() -> None:
    errors = [blob_error(f"blob{i}", _clean(i), _clean(i), gating=True) for i in range(4)]
    assert _result(errors).passed


def test_a_non_finite_informational_blob_does_not_gate() -> None:
    out = _clean(0)
    out.flat[3] = np.nan
    errors = [blob_error("kept", _clean(1), _clean(1), True), blob_error("boxes", _clean(0), out, False)]
    assert _result(errors).passed
