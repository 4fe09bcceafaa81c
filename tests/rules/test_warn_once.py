"""A BatchNorm with negative variance (still finite) is warned about once when it folds, whichever
rule folds it, and not at all when it is kept as it is (issue 16, item 11)."""

import numpy as np
import pytest
from harness import save

from caffe_bn_merge import merge
from caffe_bn_merge.pipeline import MergeOptions
from caffe_bn_merge.synthetic.synth import NetBuilder

CLASSIC = MergeOptions(backward=False, standalone=False)


def _net(where: str) -> NetBuilder:
    b = NetBuilder(f"neg_{where}", (1, 3, 8, 8), seed=3)
    top = b.conv("data", 4, name="c") if where == "forward" else b.relu(b.conv("data", 4, name="c"))
    b.bn(top, name="bn", eps=1e-3)
    b.blobs["bn"][1][1] = -1e-6 * b.blobs["bn"][2][0]  # stored variance is scaled by the factor
    if where == "backward":
        b.conv(top, 2, kernel=1, pad=0, name="reader")
    else:
        b.relu(top)
    return b


@pytest.mark.parametrize(
    ("where", "options", "warnings"),
    [
        ("forward", MergeOptions(), 1),
        ("backward", MergeOptions(), 1),
        ("standalone", MergeOptions(), 1),
        ("standalone", CLASSIC, 0),
        ("forward", CLASSIC, 1),
    ],
)
def test_negative_variance_is_warned_once_when_folded(where, options, warnings, tmp_path, caplog) -> None:
    caplog.set_level("WARNING")
    result = merge(*save(_net(where), tmp_path), tmp_path / "m.prototxt", tmp_path / "m.caffemodel", options)
    assert ("bn" in result.plan.removed or any(a.target == "bn" for a in result.plan.actions)) == bool(warnings)
    said = [r for r in caplog.records if "negative variance" in r.getMessage()]
    assert len(said) == warnings, [r.getMessage() for r in said]
    assert all("'bn'" in r.getMessage() for r in said)


def test_statistics_are_scaled_as_built() -> None:
    assert np.sum(_net("forward").blobs["bn"][1] < 0) == 1
