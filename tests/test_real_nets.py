"""Real third-party trained models from ../shared/real_nets: each converts and matches on OpenCV."""

import pytest
from harness import REAL_NETS as REAL
from harness import merge_and_check

from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.rules.plan import Rule


@pytest.mark.parametrize("name", REAL)
def test_real_net_matches_after_merge(name: str, real_nets, tmp_path) -> None:
    prototxt, caffemodel, folds = REAL[name]
    merged = merge_and_check((real_nets / prototxt, real_nets / caffemodel), tmp_path)
    assert len(merged.result.plan.by_rule(Rule.FORWARD)) == folds
    assert merged.kept == {}
    assert merged.layer_count("BatchNorm")[1] == merged.layer_count("Scale")[1] == 0


def test_ssd_compares_the_blobs_feeding_detection_output(real_nets, tmp_path) -> None:
    prototxt, caffemodel, _ = REAL["mobilenet_ssd_0.5"]
    merged = merge_and_check((real_nets / prototxt, real_nets / caffemodel), tmp_path)
    blobs = {error.blob.split(" ")[0] for error in merged.errors}
    assert {"mbox_loc", "mbox_conf_reshape", "mbox_priorbox"} <= blobs


def test_net_without_bn_comes_out_unchanged(real_nets, tmp_path) -> None:
    prototxt, caffemodel, _ = REAL["ultraface_rfb320_nobn"]
    merged = merge_and_check((real_nets / prototxt, real_nets / caffemodel), tmp_path)
    assert merged.merged[1].read_bytes() == (real_nets / caffemodel).read_bytes()
    assert caffe_io.read_net(merged.merged[0]) == caffe_io.read_net(real_nets / prototxt)
