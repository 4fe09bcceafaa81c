"""Questions answered at once (`rules.stacked`): for nets of BVLC BatchNorm and Scale layers and
weights of every kind the rules meet (NaN and infinite statistics, zero, negative and tiny factors,
negative variances, identity and scalar Scales), the stacked maps are the maps read one layer at a
time, bit for bit, and so are the actions' maps composed from them; they are refused exactly when
an answer differs; the negative variances counted at once are those `norms.negative_variance`
counts. Recordings that ask anything else are not stacked (and replay one layer at a time, as
tests/test_replay.py checks)."""

import functools
import random
from pathlib import Path

import numpy as np
import pytest
from harness import REPLAY_NETS

from caffe_bn_merge.io import read
from caffe_bn_merge.io.emit import write_new_weights
from caffe_bn_merge.pipeline import MergeOptions, NetCache, merge
from caffe_bn_merge.rules.norms import negative_variance, read_with
from caffe_bn_merge.rules.reasons import Refusal
from caffe_bn_merge.synthetic.synth import weights_for

STACKED_NETS = ("deconv_seg", "mobilenet_ssd", "resnet_mini")


BN_CHANGES = {  # blob 0 mean, 1 variance (both times the factor), 2 the factor
    "nan_mean": (0, np.nan), "inf_variance": (1, np.inf), "negative_variance": (1, -1e-7),
    "tiny_variance": (1, 1e-30), "zero_factor": (2, 0.0), "negative_factor": (2, -1.5),
    "subnormal_factor": (2, 1e-45), "inf_factor": (2, np.inf),
}  # fmt: skip
SCALE_VALUES = (np.nan, -np.inf, 0.0, -0.0, 1.0)


def _change(blobs: list[np.ndarray], layer_type: str, rng: random.Random) -> None:
    """One change of a kind the rules meet: a BatchNorm statistic or factor, a Scale that is (half)
    the identity, or one odd gamma or beta value."""
    if layer_type == "BatchNorm":
        blob, value = BN_CHANGES[rng.choice(sorted(BN_CHANGES))]
        if blob == 2:
            blobs[2][...] = value
        else:
            blobs[blob].flat[rng.randrange(blobs[blob].size)] = value
    elif rng.random() < 0.5:  # the identity, or half of it: gamma 1, or beta 0
        for blob, value in rng.choice((((0, 1.0), (1, 0.0)), ((0, 1.0),), ((1, 0.0),))):
            if blob < len(blobs):
                blobs[blob][...] = value
    else:
        blob = blobs[rng.randrange(len(blobs))]
        blob.flat[rng.randrange(blob.size)] = rng.choice(SCALE_VALUES)


def _variant(net: object, path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    blobs = {name: [np.array(b) for b in layer] for name, layer in weights_for(net, seed).items()}
    types = {layer.name: layer.type for layer in net.layer}
    affine = [name for name in blobs if types[name] in ("BatchNorm", "Scale")]
    for name in rng.sample(affine, rng.choice((0, 1, 1, 2, 3))):
        _change(blobs[name], types[name], rng)
    write_new_weights([(name, types[name], layer) for name, layer in blobs.items()], path)
    return path


def _recorded(prototxt: Path, caffemodel: Path, options: MergeOptions | None = None) -> object:
    """The merge a NetCache records for `caffemodel`."""
    options, cache = options or MergeOptions(), NetCache()
    merge(prototxt, caffemodel, prototxt.with_name("out.prototxt"), None, options, overwrite=True, cache=cache)
    entry = cache.parsed(prototxt, options, None)
    with read.open_weights(caffemodel) as stored:
        (recorded,) = cache.recorded(entry, options, stored)
    return recorded


@pytest.mark.parametrize("name", STACKED_NETS)
def test_stacked_maps_are_the_maps_read_one_layer_at_a_time(name, tmp_path) -> None:
    builder = REPLAY_NETS[name]()
    prototxt = tmp_path / "net.prototxt"
    builder.save(prototxt, tmp_path / "first.caffemodel")
    recorded = _recorded(prototxt, tmp_path / "first.caffemodel")
    stacked, rounds = recorded.stacked, recorded.rules.rounds
    assert stacked is not None
    net = read.read_net(prototxt)
    by_name = {layer.name: layer for layer in net.layer}
    refused = chained = 0
    for seed in range(40):
        with read.open_weights(_variant(net, tmp_path / f"w{seed}.caffemodel", seed)) as stored:
            read.index_weights(stored)
            layers = stored.layers
            questions = {q.read: q for round_ in rounds for q in round_.questions}
            one_at_a_time = {read_: read_with(q.reader, layers.get(read_[0])) for read_, q in questions.items()}
            same = all(
                isinstance(got, Refusal) if isinstance(q.answer, Refusal) else
                not isinstance(got, Refusal) and got.is_identity() == q.answer
                for q, got in zip(questions.values(), one_at_a_time.values(), strict=True)
            )  # fmt: skip
            given = stacked.maps(layers)
            assert (given is not None) == same, seed
            refused += given is None
            for read_, got in (given.maps if given else {}).items():
                expected = one_at_a_time[read_]
                assert got.scale.tobytes() == expected.scale.tobytes(), (seed, read_)
                assert got.shift.tobytes() == expected.shift.tobytes(), (seed, read_)
            for reads, got in (given.chains if given else {}).items():
                expected = functools.reduce(lambda a, b: a.then(b), (one_at_a_time[r] for r in reads))
                assert got.scale.tobytes() == expected.scale.tobytes(), (seed, reads)
                assert got.shift.tobytes() == expected.shift.tobytes(), (seed, reads)
            chained += len(given.chains) if given else 0
            counts = {n: negative_variance(by_name[n], layers[n], "auto") for n in stacked.batchnorms}
            assert stacked.negative_variance(layers) == {n: c for n, c in counts.items() if c}, seed
    assert 0 < refused < 40 and chained > 0


def test_recordings_that_ask_anything_else_are_not_stacked(tmp_path) -> None:
    """Layers a rule edits, Bias and Power (every_rule), another BatchNorm layout (--bn-flavour
    nvcaffe), and a net with nothing to ask (no_bn)."""
    for name, options in (("every_rule", MergeOptions()), ("no_bn", MergeOptions()),
                          ("mobilenet_ssd", MergeOptions(bn_flavour="nvcaffe"))):  # fmt: skip
        folder = tmp_path / f"{name}_{options.bn_flavour}"
        folder.mkdir()
        REPLAY_NETS[name]().save(folder / "net.prototxt", folder / "net.caffemodel")
        assert _recorded(folder / "net.prototxt", folder / "net.caffemodel", options).stacked is None, name
