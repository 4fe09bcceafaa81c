"""Replayed merges (`pipeline.NetCache`, `rules.replay`, `io.layout`): for many nets and many weights
of each, a merge replayed from an earlier merge of the same caffemodel layout writes the very bytes,
plan and warnings that a fresh merge writes; weights whose answers to the rules' questions differ
(an identity Scale, non-finite statistics) are merged afresh, and a caffemodel of another layout
is never taken for a known one."""

import math
import random
from pathlib import Path

import numpy as np
import pytest
from harness import REAL_NETS, REPLAY_NETS

from caffe_bn_merge.errors import MergeError
from caffe_bn_merge.io import proto, read
from caffe_bn_merge.io.emit import write_new_weights
from caffe_bn_merge.io.layout import Layout
from caffe_bn_merge.pipeline import MergeOptions, NetCache, merge
from caffe_bn_merge.synthetic.synth import weights_for


def _layers(net: object, types: tuple[str, ...]) -> list[str]:
    return [layer.name for layer in net.layer if layer.type in types]


def _identity(blobs: list[np.ndarray], rng: random.Random) -> None:
    blobs[0][...] = 1
    if len(blobs) > 1:
        blobs[1][...] = 0


def _nan_mean(blobs: list[np.ndarray], rng: random.Random) -> None:
    blobs[0].flat[rng.randrange(blobs[0].size)] = np.nan


def _small_negative_variance(blobs: list[np.ndarray], rng: random.Random) -> None:
    blobs[1].flat[rng.randrange(blobs[1].size)] = -1e-7 * blobs[2].flat[0]  # still var + eps > 0


def _large_negative_variance(blobs: list[np.ndarray], rng: random.Random) -> None:
    blobs[1].flat[0] = -10 * blobs[2].flat[0]  # 1/sqrt of a negative number: not finite


def _zero_factor(blobs: list[np.ndarray], rng: random.Random) -> None:
    blobs[2][...] = 0  # Caffe reads mean = var = 0


def _infinite_weight(blobs: list[np.ndarray], rng: random.Random) -> None:
    blobs[0].flat[rng.randrange(blobs[0].size)] = np.inf


# perturbation -> (layer types it applies to, whether the rules' answers stay the same)
PERTURBATIONS = {
    _identity: (("Scale",), False),
    _nan_mean: (("BatchNorm",), False),
    _large_negative_variance: (("BatchNorm",), False),
    _small_negative_variance: (("BatchNorm",), True),
    _zero_factor: (("BatchNorm",), True),
    _infinite_weight: (("Convolution", "InnerProduct", "Deconvolution"), True),
}


def _write_variant(net: object, folder: Path, seed: int, changes: list) -> Path:
    """A caffemodel of `net`'s layout with weights of seed `seed`, `changes` applied to the blobs."""
    rng = random.Random(seed)
    blobs = {name: [np.array(b) for b in layer] for name, layer in weights_for(net, seed).items()}
    for change in changes:
        types, _ = PERTURBATIONS[change]
        change(blobs[rng.choice(_layers(net, types))], rng)
    types = {layer.name: layer.type for layer in net.layer}
    path = folder / f"w{seed}.caffemodel"
    write_new_weights([(name, types[name], layer) for name, layer in blobs.items()], path)
    return path


def _outcome(prototxt: Path, caffemodel: Path, out: Path, cache: NetCache | None) -> tuple:
    pair = (out.with_suffix(".prototxt"), out.with_suffix(".caffemodel"))
    result = merge(prototxt, caffemodel, *pair, cache=cache)
    plan = result.plan
    actions = [(a.rule, a.layers, a.target, a.bottoms, a.tops, a.reads) for a in plan.actions]
    maps = [(a.affine.scale.tobytes(), a.affine.shift.tobytes()) for a in plan.actions if a.affine is not None]
    described = (actions, maps, plan.kept, plan.reasons, result.layers_before, result.layers_after, result.warnings)
    hosts = [(h.name, [c.scale.tobytes() for c in h.chains], [np.asarray(b).tobytes() for b in h.folded.blobs])
             for h in result.hosts]  # fmt: skip
    return result.replayed, pair[0].read_bytes(), pair[1].read_bytes(), described, hosts


@pytest.mark.parametrize("name", sorted(REPLAY_NETS))
def test_replayed_merges_write_what_fresh_merges_write(name, tmp_path) -> None:
    """Twelve weights of one net through one NetCache, each against a fresh merge: same bytes,
    plan, maps, warnings and folded hosts. The first weights are recorded; every later one whose
    changes keep the rules' answers is replayed, others only when earlier weights got their plan."""
    builder = REPLAY_NETS[name]()
    prototxt = tmp_path / "net.prototxt"
    builder.save(prototxt, tmp_path / "first.caffemodel")
    net = read.read_net(prototxt)
    rng = random.Random(name)
    cache = NetCache()
    replayed, plans = 0, []
    for seed in range(12):
        eligible = [c for c, (types, _) in PERTURBATIONS.items() if _layers(net, types)]
        changes = rng.sample(eligible, min(len(eligible), rng.choice((0, 1, 1, 2)))) if seed else []
        caffemodel = _write_variant(net, tmp_path, seed, changes)
        cached = _outcome(prototxt, caffemodel, tmp_path / f"cached{seed}", cache)
        fresh = _outcome(prototxt, caffemodel, tmp_path / f"fresh{seed}", None)
        assert cached[1:] == fresh[1:], (seed, [c.__name__ for c in changes])
        same_answers = all(PERTURBATIONS[c][1] for c in changes)
        if seed and same_answers:
            assert cached[0], f"weights {seed} ({[c.__name__ for c in changes]}) were not replayed"
        plan = (fresh[3][0], *fresh[3][2:4])  # actions, kept, reasons
        if cached[0]:  # replayed: only ever a plan made for earlier weights
            assert plan in plans, (seed, [c.__name__ for c in changes])
        plans.append(plan)
        replayed += cached[0]
    assert replayed >= 3


def test_options_and_layouts_are_told_apart(tmp_path) -> None:
    """The same weights merged with other options, and stored in float64 (another layout): each
    is recorded on its own and replayed only for its own kind."""
    builder = REPLAY_NETS["every_rule"]()
    prototxt = tmp_path / "net.prototxt"
    builder.save(prototxt, tmp_path / "f32.caffemodel")
    builder.save(prototxt, tmp_path / "f64.caffemodel", dtype=np.float64)
    cache, seen = NetCache(), set()
    cached, fresh = ([tmp_path / f"{name}.{suffix}" for suffix in ("prototxt", "caffemodel")] for name in "ab")
    for options in (MergeOptions(), MergeOptions(backward=False, standalone=False)):
        for kind in ("f32", "f64", "f32", "f64"):
            weights = tmp_path / f"{kind}.caffemodel"
            result = merge(prototxt, weights, *cached, options, overwrite=True, cache=cache)
            merge(prototxt, weights, *fresh, options, overwrite=True)
            assert [p.read_bytes() for p in cached] == [p.read_bytes() for p in fresh]
            assert result.replayed == ((options, kind) in seen)
            seen.add((options, kind))


def test_a_caffemodel_of_another_layout_is_refused_as_a_fresh_merge_refuses_it(tmp_path) -> None:
    """A caffemodel whose layer was renamed (same size, one byte differs outside the values) is
    not taken for the known layout: merged afresh, it fails as a fresh merge fails."""
    builder = REPLAY_NETS["every_rule"]()
    prototxt, caffemodel = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    builder.save(prototxt, caffemodel)
    cache = NetCache()
    merge(prototxt, caffemodel, tmp_path / "a.prototxt", tmp_path / "a.caffemodel", cache=cache)
    renamed = tmp_path / "renamed.caffemodel"
    renamed.write_bytes(caffemodel.read_bytes().replace(b"fc_bn", b"fc_bm"))
    errors = []
    for cache_or_none in (cache, None):
        with pytest.raises(MergeError) as caught:
            merge(prototxt, renamed, tmp_path / "b.prototxt", tmp_path / "b.caffemodel", cache=cache_or_none)
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("seed", range(4))
def test_a_layout_matches_exactly_the_caffemodels_that_differ_only_in_values(tmp_path, seed) -> None:
    """Any one byte changed outside the values (names, shapes, lengths, tags), or a byte more or
    less, and the layout no longer matches; any values changed, and it still does, and indexes
    them as the caffemodel's own walk does."""
    builder = REPLAY_NETS[sorted(REPLAY_NETS)[seed]]()
    path = tmp_path / "net.caffemodel"
    builder.save(tmp_path / "net.prototxt", path)
    stored = read.read_weights(path)
    layout = Layout.of(stored)
    raw = bytearray(stored.buffer)
    rng = np.random.default_rng(seed)
    inside = np.zeros(len(raw), bool)
    for slot in layout.slots:
        inside[slot.start : slot.end] = True
    for position in rng.choice(np.flatnonzero(~inside), 200):
        changed = bytearray(raw)
        changed[position] ^= 1 + int(rng.integers(255))
        assert not layout.matches(memoryview(changed))
    assert not layout.matches(memoryview(raw + b"\0")) and not layout.matches(memoryview(raw[:-1]))
    values = bytearray(raw)
    chosen = rng.choice(np.flatnonzero(inside), 500)
    for position in chosen:
        values[position] = int(rng.integers(256))
    assert layout.matches(memoryview(values))
    (tmp_path / "values.caffemodel").write_bytes(values)
    walked = read.read_weights(tmp_path / "values.caffemodel")
    indexed = read.Weights(walked.path, walked.buffer, [])
    layout.index(indexed)
    assert indexed.records == walked.records and indexed.record_names == walked.record_names
    assert list(indexed.layers) == list(walked.layers)
    for name, layer in walked.layers.items():
        mine = indexed.layers[name]
        assert mine.legacy_shape == layer.legacy_shape
        assert [(b.dtype, b.shape, b.tobytes()) for b in mine.blobs] == [
            (b.dtype, b.shape, b.tobytes()) for b in layer.blobs
        ]


@pytest.mark.parametrize("name", sorted(REAL_NETS))
def test_real_nets_replay_what_fresh_merges_write(name, real_nets, tmp_path) -> None:
    """Each real third-party net with its own caffemodel layout (forks' fields, legacy shapes,
    their own parameters) and three sets of values of its own: replayed after the first, the same
    bytes as fresh merges."""
    prototxt, caffemodel, _ = REAL_NETS[name]
    prototxt, original = real_nets / prototxt, real_nets / caffemodel
    layout = Layout.of(read.read_weights(original))
    assert layout is not None
    raw = original.read_bytes()
    cache = NetCache()
    for seed in range(3):
        values = bytearray(raw)
        rng = np.random.default_rng(seed)
        for slot in layout.slots if seed else ():
            blob = np.frombuffer(values, slot.dtype, math.prod(slot.shape), slot.start)
            blob *= (1 + 0.01 * rng.standard_normal(blob.size)).astype(slot.dtype)  # the same signs
        weights = tmp_path / f"w{seed}.caffemodel"
        weights.write_bytes(values)
        cached = _outcome(prototxt, weights, tmp_path / f"cached{seed}", cache)
        fresh = _outcome(prototxt, weights, tmp_path / f"fresh{seed}", None)
        assert cached[1:] == fresh[1:]
        assert cached[0] == (seed > 0)


def _scalar_bias(path: Path, seed: int) -> None:
    """A one-channel Convolution + BatchNorm + Scale whose bias is stored with an empty shape (a
    0-d blob: some converters write them; its folded bias is written with shape [1])."""
    rng = np.random.default_rng(seed)

    def blob(values: list[float], dims: list[int] | None) -> object:
        stored = proto.BlobProto(data=np.asarray(values, np.float32).tolist())
        stored.shape.SetInParent()
        stored.shape.dim.extend(dims or [])
        return stored

    net = proto.NetParameter(name="n")
    net.layer.add(name="conv", type="Convolution").blobs.extend(
        [blob(rng.normal(size=27).tolist(), [1, 3, 3, 3]), blob([rng.normal()], None)]
    )
    net.layer.add(name="bn", type="BatchNorm").blobs.extend(
        [blob([0.1], [1]), blob([rng.uniform(0.5, 2)], [1]), blob([1], [1])]
    )
    net.layer.add(name="sc", type="Scale").blobs.extend([blob([rng.uniform(0.5, 2)], [1]), blob([0.2], [1])])
    path.write_bytes(net.SerializeToString())


def _only_an_identity(path: Path, seed: int) -> None:
    """A caffemodel whose only layer is an identity Scale: the merged caffemodel is empty."""
    write_new_weights([("sc", "Scale", [np.ones(3, np.float32), np.zeros(3, np.float32)])], path)


INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
UNRECORDABLE = {
    _scalar_bias: INPUT
    + 'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
    + "  convolution_param { num_output: 1 kernel_size: 3 } }\n"
    + 'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }\n'
    + 'layer { name: "sc" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }\n',
    _only_an_identity: INPUT
    + 'layer { name: "sc" type: "Scale" bottom: "data" top: "sc" scale_param { bias_term: true } }\n'
    + 'layer { name: "relu" type: "ReLU" bottom: "sc" top: "out" }\n',
}


@pytest.mark.parametrize("make", UNRECORDABLE, ids=lambda make: make.__name__)
def test_a_merge_that_cannot_be_recorded_still_converts(make, tmp_path) -> None:
    """What the recorded layout cannot write again (a 0-d blob written back with shape [1], a
    merged caffemodel with no layer left) is not recorded: every merge through the cache converts
    as a fresh merge does."""
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(UNRECORDABLE[make])
    cache = NetCache()
    for seed in range(3):
        make(tmp_path / f"w{seed}.caffemodel", seed)
        cached = _outcome(prototxt, tmp_path / f"w{seed}.caffemodel", tmp_path / f"cached{seed}", cache)
        fresh = _outcome(prototxt, tmp_path / f"w{seed}.caffemodel", tmp_path / f"fresh{seed}", None)
        assert cached[1:] == fresh[1:] and not cached[0]
