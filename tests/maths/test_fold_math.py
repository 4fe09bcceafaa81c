"""Property tests of the fold maths against a direct float64 evaluation of the layers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import conv2d, deconv2d

from caffe_bn_merge import net
from caffe_bn_merge.maths.affine import ChannelAffine, batchnorm_affine, scale_affine
from caffe_bn_merge.maths.fold_math import fold_backward, fold_forward, fold_forward_lazy


def _affine(rng: np.random.Generator, channels: int) -> ChannelAffine:
    return ChannelAffine(rng.normal(1.0, 0.5, channels), rng.normal(0.0, 0.5, channels))


def _apply(affine: ChannelAffine, y: np.ndarray) -> np.ndarray:
    shape = (1, -1) + (1,) * (y.ndim - 2)
    return y * affine.scale.reshape(shape) + affine.shift.reshape(shape)


def _close(want: np.ndarray, got: np.ndarray) -> None:
    assert np.max(np.abs(want - got)) <= 1e-10 * max(1.0, np.max(np.abs(want)))


conv_cases = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 2, 3]),
        "per_group_in": st.integers(1, 3),
        "per_group_out": st.integers(1, 3),
        "kernel": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "pad": st.integers(0, 1),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=60, deadline=None)
@given(conv_cases)
def test_forward_fold_into_convolution(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    g, cin, cout = case["groups"], case["groups"] * case["per_group_in"], case["groups"] * case["per_group_out"]
    w = rng.normal(size=(cout, cin // g, case["kernel"], case["kernel"]))
    b = rng.normal(size=cout) if case["bias"] else None
    x = rng.normal(size=(2, cin, 6, 5))
    affine = _affine(rng, cout)
    args = {"stride": case["stride"], "pad": case["pad"], "group": g}
    w2, b2 = fold_forward(w, b, affine, "conv", g)
    _close(_apply(affine, conv2d(x, w, b, **args)), conv2d(x, w2, b2, **args))


@settings(max_examples=60, deadline=None)
@given(conv_cases)
def test_forward_fold_into_deconvolution(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    g, cin, cout = case["groups"], case["groups"] * case["per_group_in"], case["groups"] * case["per_group_out"]
    w = rng.normal(size=(cin, cout // g, case["kernel"], case["kernel"]))
    b = rng.normal(size=cout) if case["bias"] else None
    x = rng.normal(size=(1, cin, 4, 3))
    affine = _affine(rng, cout)
    args = {"stride": case["stride"], "pad": min(case["pad"], case["kernel"] - 1), "group": g}
    w2, b2 = fold_forward(w, b, affine, "deconv", g)
    _close(_apply(affine, deconv2d(x, w, b, **args)), deconv2d(x, w2, b2, **args))


@settings(max_examples=60, deadline=None)
@given(conv_cases)
def test_backward_fold_into_unpadded_convolution(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    g, cin, cout = case["groups"], case["groups"] * case["per_group_in"], case["groups"] * case["per_group_out"]
    w = rng.normal(size=(cout, cin // g, case["kernel"], case["kernel"]))
    b = rng.normal(size=cout) if case["bias"] else None
    x = rng.normal(size=(1, cin, 6, 5))
    affine = _affine(rng, cin)
    args = {"stride": case["stride"], "group": g}
    w2, b2 = fold_backward(w, b, affine, "conv", g, cout)
    _close(conv2d(_apply(affine, x), w, b, **args), conv2d(x, w2, b2, **args))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_folds_into_innerproduct(
    n_out: int, channels: int, spatial: int, transpose: bool, bias: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    k = channels * spatial * spatial
    w = rng.normal(size=(k, n_out) if transpose else (n_out, k))
    b = rng.normal(size=n_out) if bias else None
    x = rng.normal(size=(3, channels, spatial, spatial))

    def ip(weights: np.ndarray, bias_: np.ndarray | None, inp: np.ndarray) -> np.ndarray:
        mat = weights if transpose else weights.T
        return inp.reshape(inp.shape[0], -1) @ mat + (0 if bias_ is None else bias_)

    layout = "ip_t" if transpose else "ip"
    out_affine, in_affine = _affine(rng, n_out), _affine(rng, channels)
    _close(_apply(out_affine, ip(w, b, x)), ip(*fold_forward(w, b, out_affine, layout, 1), x))
    _close(ip(w, b, _apply(in_affine, x)), ip(*fold_backward(w, b, in_affine, layout, 1, n_out), x))


def test_batchnorm_uses_moving_average_factor_and_eps() -> None:
    mean, var = np.array([1.0, -2.0]), np.array([4.0, 0.25])
    affine = batchnorm_affine(mean * 10, var * 10, 10.0, 1e-3)
    x = np.array([3.0, 5.0])
    _close((x - mean) / np.sqrt(var + 1e-3), affine.scale * x + affine.shift)


def test_batchnorm_factor_zero_means_zero_statistics() -> None:
    affine = batchnorm_affine(np.array([5.0]), np.array([7.0]), 0.0, 1e-5)
    assert affine.shift[0] == 0.0
    assert np.isclose(affine.scale[0], 1 / np.sqrt(1e-5))


def test_composition_order() -> None:
    first, second = (
        scale_affine(np.array([2.0]), np.array([1.0]), 1),
        scale_affine(np.array([3.0]), np.array([-1.0]), 1),
    )
    both = first.then(second)
    assert both.scale[0] == 6.0 and both.shift[0] == 2.0  # 3 * (2x + 1) - 1


@pytest.mark.parametrize("layout", ["conv", "ip", "deconv", "ip_t"])
def test_folding_straight_to_float32_rounds_once(layout: str) -> None:
    """Folding into the stored dtype gives exactly the float64 result rounded once."""
    rng = np.random.default_rng(1)
    shape = {"conv": (6, 2, 3, 3), "ip": (6, 20), "deconv": (4, 3, 2, 2), "ip_t": (20, 6)}[layout]
    groups = 2 if layout in ("conv", "deconv") else 1
    weights = rng.normal(size=shape).astype(np.float32)
    affine = _affine(rng, 6)
    wide, _ = fold_forward(weights, None, affine, layout, groups)
    narrow, _ = fold_forward(weights, None, affine, layout, groups, np.dtype(np.float32))
    assert narrow.dtype == np.float32
    np.testing.assert_array_equal(narrow, wide.astype(np.float32))


@pytest.mark.parametrize("block_bytes", [1, 100, 1 << 20])
def test_scaled_rows_blocks_are_the_whole_blob_in_order(block_bytes: int, monkeypatch) -> None:
    """Written block by block (a block smaller than a row, a few rows, all rows) or made whole,
    a row-scaled blob is the float64 product rounded once."""
    monkeypatch.setattr(net, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(2)
    weights = rng.normal(size=(7, 3, 2, 2)).astype(np.float32)
    affine = _affine(rng, 7)
    lazy, _ = fold_forward_lazy(weights, None, affine, "conv", 1, np.dtype(np.float32))
    expected = (weights.astype(np.float64) * affine.scale[:, None, None, None]).astype(np.float32)
    joined = bytearray()
    for size, fill in lazy.blocks():
        buffer = bytearray(size)
        fill(memoryview(buffer))
        joined += buffer
    assert joined == expected.tobytes() and lazy.nbytes == expected.nbytes
    np.testing.assert_array_equal(np.asarray(lazy), expected)
