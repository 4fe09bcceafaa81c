"""Real third-party trained models from ../shared/real_nets: each converts and matches on OpenCV."""

import pytest
from harness import merge_and_check

from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.rules.plan import Rule

REAL = {
    "mobilenet_ssd_0.5": (
        "mobilenet_ssd_0.5_hx/MobileNetSSD_deploy_bn.DERIVED.prototxt",
        "mobilenet_ssd_0.5_hx/mobilenet_0.5.caffemodel",
        23,
    ),
    "cifar10_resnet20": (
        "cifar10_resnet20/res20_deploy.DERIVED.prototxt",
        "cifar10_resnet20/cifar10_res20_iter_64000.caffemodel",
        21,
    ),
    "emotion_mini_xception": ("emotion_mini_xception/deploy.prototxt", "emotion_mini_xception/weights.caffemodel", 14),
    "yoloface50k": ("yoloface50k/yoloface-50k.prototxt", "yoloface50k/yoloface-50k.caffemodel", 23),
    "landmark106_mbv2": ("landmark106_mbv2/landmark106.prototxt", "landmark106_mbv2/landmark106.caffemodel", 38),
    "ultraface_rfb320_nobn": ("ultraface_rfb320_nobn/RFB-320.prototxt", "ultraface_rfb320_nobn/RFB-320.caffemodel", 0),
}


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
