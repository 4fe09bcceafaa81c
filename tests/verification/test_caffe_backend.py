"""Real Caffe (CPU pycaffe from scripts/install_pycaffe.sh) against OpenCV dnn, and merged against original.

Skipped when pycaffe is not installed, except in CI, where that fails and names the install script.
"""

from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from caffe_bn_merge import merge
from caffe_bn_merge.graph import build_graph
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.verification.compare import VerifyError, compare_points, random_inputs, run_opencv
from caffe_bn_merge.verification.pycaffe import ENV_HOME, ENV_PYTHON, pycaffe_python, run_caffe

SAMPLES = ROOT / "sample_nets"
NAMES = ("resnet_mini", "mobilenet_ssd", "deconv_seg", "no_bn")
ENGINE_TOLERANCE = 1e-4  # pycaffe vs OpenCV: two engines, float32 summation orders differ
MERGE_TOLERANCE = 1e-5  # merged vs original, both on pycaffe


def _sample(name: str) -> tuple[Path, Path]:
    return SAMPLES / f"{name}.prototxt", SAMPLES / f"{name}.caffemodel"


def _points(model: Path) -> dict[str, tuple[str, str]]:
    """Label -> (layer, top) of the blobs verification compares (gating ones: the continuous maps)."""
    points = compare_points(build_graph(caffe_io.read_net(model)))
    return {label: (p.layer, p.top) for label, p in points.items() if p.gating}


def _relative(reference: np.ndarray, value: np.ndarray) -> tuple[float, float]:
    assert reference.shape == value.shape, f"shape {value.shape} != {reference.shape}"
    scale = float(np.max(np.abs(reference), initial=0.0))
    return float(np.max(np.abs(reference - value), initial=0.0)) / scale, scale


@pytest.mark.parametrize("name", NAMES)
def test_pycaffe_matches_opencv(name: str, pycaffe: Path) -> None:
    model, weights = _sample(name)
    points = _points(model)
    inputs = random_inputs(model)
    wanted = list(points.values())
    caffe_values = run_caffe(model, weights, inputs, wanted)
    opencv_values = run_opencv(model, weights, inputs, wanted)
    assert len(caffe_values) == len(points)
    for label, got, want in zip(points, caffe_values, opencv_values, strict=True):
        assert got.dtype == np.float64
        relative, scale = _relative(want, got)
        assert scale > 1e-3, f"{name} {label}: output ~0, the check could not fail"
        assert relative <= ENGINE_TOLERANCE, f"{name} {label}: pycaffe vs OpenCV relative error {relative:.3g}"


def test_ssd_compares_the_blobs_feeding_detection_output(pycaffe: Path) -> None:
    model, weights = _sample("mobilenet_ssd")
    points = _points(model)
    blobs = {label.split(" ")[0]: point for label, point in points.items()}
    assert {"mbox_loc", "mbox_conf_reshape", "mbox_priorbox"} <= set(blobs)
    inputs = random_inputs(model)
    wanted = [blobs["mbox_loc"], blobs["mbox_conf_reshape"], blobs["mbox_priorbox"]]
    loc, conf, priors = run_caffe(model, weights, inputs, wanted)
    assert loc.shape[-1] % 4 == 0 and priors.shape[0] == 1 and priors.shape[1] == 2
    assert priors.shape[2] == loc.shape[-1]  # one prior box (4 numbers) per location output
    assert np.all(priors[0, 1] > 0)  # variances
    assert conf.size * 4 == loc.size * conf.shape[-1]


def test_in_place_layers_give_the_blob_as_the_layer_left_it(pycaffe: Path) -> None:
    """conv1 -> conv1/bn -> conv1/scale -> conv1/relu all write blob `conv1`: each value is its own."""
    model, weights = _sample("resnet_mini")
    inputs = random_inputs(model)
    layers = ["conv1/relu", "conv1", "conv1/bn", "conv1/scale"]  # any order
    relu, conv, bn, scale = run_caffe(model, weights, inputs, [(layer, "conv1") for layer in layers])
    reference = run_opencv(model, weights, inputs, [(layer, "conv1") for layer in layers])
    for layer, got, want in zip(layers, (relu, conv, bn, scale), reference, strict=True):
        assert _relative(want, got)[0] <= ENGINE_TOLERANCE, layer
    assert np.min(conv) < 0 and np.min(relu) == 0
    assert not np.allclose(conv, bn) and not np.allclose(bn, scale)
    np.testing.assert_array_equal(relu, np.maximum(scale, 0))


@pytest.mark.parametrize("name", NAMES)
def test_merged_matches_original_on_pycaffe(name: str, pycaffe: Path, tmp_path: Path) -> None:
    original = _sample(name)
    merged = (tmp_path / f"{name}_merged.prototxt", tmp_path / f"{name}_merged.caffemodel")
    merge(*original, *merged)
    want, have = _points(original[0]), _points(merged[0])
    labels = [label for label in want if label in have]
    assert labels, "no compared blob in common"
    inputs = random_inputs(original[0], seed=1)
    reference = run_caffe(*original, inputs, [want[label] for label in labels])
    result = run_caffe(*merged, inputs, [have[label] for label in labels])
    for label, ref, out in zip(labels, reference, result, strict=True):
        relative, scale = _relative(ref, out)
        assert scale > 1e-3, f"{name} {label}: output ~0, the check could not fail"
        assert relative <= MERGE_TOLERANCE, f"{name} {label}: merged vs original relative error {relative:.3g}"


def test_inputs_of_another_shape_reshape_the_net(pycaffe: Path) -> None:
    model, weights = _sample("resnet_mini")
    inputs = {"data": np.random.default_rng(3).standard_normal((2, 3, 24, 40)).astype(np.float32)}
    (out,) = run_caffe(model, weights, inputs, [("conv1", "conv1")])
    (want,) = run_opencv(model, weights, inputs, [("conv1", "conv1")])
    assert out.shape == (2, 16, 24, 40)
    assert _relative(want, out)[0] <= ENGINE_TOLERANCE


def test_unknown_layer_or_top_is_one_line_error(pycaffe: Path) -> None:
    model, weights = _sample("resnet_mini")
    inputs = random_inputs(model)
    with pytest.raises(VerifyError, match="no layer 'nope'") as err:
        run_caffe(model, weights, inputs, [("nope", "conv1")])
    assert "\n" not in str(err.value)
    with pytest.raises(VerifyError, match="does not write 'res2a'"):
        run_caffe(model, weights, inputs, [("conv1", "res2a")])
    with pytest.raises(VerifyError, match="not an input"):
        run_caffe(model, weights, {"image": inputs["data"]}, [("conv1", "conv1")])


def test_caffe_fatal_check_is_one_line_error(pycaffe: Path, tmp_path: Path) -> None:
    """Weights that do not fit the prototxt: Caffe aborts on a failed check; we report its message."""
    model, weights = _sample("resnet_mini")
    text = model.read_text(encoding="utf-8")
    assert text.count("num_output: 16") > 1
    narrowed = tmp_path / "narrowed.prototxt"
    narrowed.write_text(text.replace("num_output: 16", "num_output: 8", 1), encoding="utf-8")
    with pytest.raises(VerifyError, match=r"Caffe: .*conv1.*shape") as err:
        run_caffe(narrowed, weights, random_inputs(model), [("conv1", "conv1")])
    assert "\n" not in str(err.value)


def test_missing_pycaffe_points_to_the_install_script(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_PYTHON, raising=False)
    monkeypatch.setenv(ENV_HOME, str(tmp_path / "nothing"))
    assert pycaffe_python() is None
    model, weights = _sample("no_bn")
    with pytest.raises(VerifyError, match=r"scripts/install_pycaffe\.sh"):
        run_caffe(model, weights, random_inputs(model), [("conv1", "conv1")])
    monkeypatch.setenv(ENV_PYTHON, str(tmp_path / "python"))
    assert pycaffe_python() is None
    with pytest.raises(VerifyError, match=f"{ENV_PYTHON}=.* is not a Python executable"):
        run_caffe(model, weights, random_inputs(model), [("conv1", "conv1")])


def test_python_without_caffe_points_to_the_install_script(monkeypatch) -> None:
    import sys

    monkeypatch.setenv(ENV_PYTHON, sys.executable)  # this interpreter has no caffe
    model, weights = _sample("no_bn")
    with pytest.raises(VerifyError, match=r"cannot import pycaffe.*scripts/install_pycaffe\.sh"):
        run_caffe(model, weights, random_inputs(model), [("conv1", "conv1")])
