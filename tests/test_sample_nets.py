"""The bundled sample nets: made by our deterministic script, each merges and matches on OpenCV."""

import importlib.util

import pytest
from conftest import ROOT
from harness import merge_and_check

from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.rules.plan import Rule

SAMPLES = ROOT / "sample_nets"
EXPECTED_FOLDS = {"mobilenet_ssd": 35, "resnet_mini": 10, "deconv_seg": 4, "no_bn": 0}


def _sample(name: str) -> tuple:
    return SAMPLES / f"{name}.prototxt", SAMPLES / f"{name}.caffemodel"


@pytest.mark.parametrize("name", EXPECTED_FOLDS)
def test_sample_net_matches_after_merge(name: str, tmp_path) -> None:
    merged = merge_and_check(_sample(name), tmp_path)
    assert len(merged.result.plan.by_rule(Rule.FORWARD)) == EXPECTED_FOLDS[name]
    assert merged.layer_count("BatchNorm")[1] == merged.layer_count("Scale")[1] == 0


def test_no_bn_sample_is_byte_identical(tmp_path) -> None:
    merged = merge_and_check(_sample("no_bn"), tmp_path)
    assert merged.merged[1].read_bytes() == _sample("no_bn")[1].read_bytes()
    assert caffe_io.read_net(merged.merged[0]) == caffe_io.read_net(_sample("no_bn")[0])


def test_samples_are_what_the_script_makes(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("make_sample_nets", SAMPLES / "make_sample_nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in EXPECTED_FOLDS:
        for suffix in (".prototxt", ".caffemodel"):
            assert (tmp_path / f"{name}{suffix}").read_bytes() == (SAMPLES / f"{name}{suffix}").read_bytes()
            assert (SAMPLES / f"{name}{suffix}").stat().st_size < 2_000_000
