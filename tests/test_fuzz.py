"""Fuzzing: random valid nets must merge to an equivalent model; mutated prototxt and caffemodel
bytes must give a clean MergeError or a valid output, never an uncaught exception or a hang.
FUZZ_EXAMPLES sets the mutated inputs per file kind (default 5000: 10,000 in all), FUZZ_NETS the
random valid nets (default 300)."""

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from harness import merge_and_check
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffe_bn_merge import MergeError
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.pipeline import merge
from caffe_bn_merge.synthetic.synth import NetBuilder

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5000"))
# Mutated blobs hold NaN and infinities; numpy's warnings about casting them are expected here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
SECONDS_PER_INPUT = 10


# --- random valid nets -----------------------------------------------------------------------

OPS = st.sampled_from(["conv", "conv1x1", "group", "deconv", "bn", "scale", "bias", "relu", "power", "dropout"])


def _build(ops: list[str], in_place: list[bool], seed: int) -> NetBuilder:
    b = NetBuilder("random", (1, 4, 6, 6), seed=seed)
    x = b.conv("data", 4, name="first")  # every net has weights
    for i, (op, same) in enumerate(zip(ops, in_place, strict=True)):
        top = None if same else f"t{i}"
        c = b.shapes[x][1]
        if op == "conv":
            x = b.conv(x, 4, bias=bool(i % 2), name=f"l{i}")
        elif op == "conv1x1":
            x = b.conv(x, 4, kernel=1, name=f"l{i}")
        elif op == "group":
            x = b.conv(x, c, group=c, bias=False, name=f"l{i}")
        elif op == "deconv":
            x = b.conv(x, 4, kernel=2, stride=1, pad=0, group=2 if c % 2 == 0 else 1, deconv=True, name=f"l{i}")
        elif op in ("bn", "scale", "bias"):
            x = getattr(b, op)(x, top=top, name=f"l{i}")
        elif op == "relu":
            x = b.relu(x, top=top)
        else:
            layer = b.unary("Power" if op == "power" else "Dropout", x, top=top, name=f"l{i}")
            if op == "power":
                layer.power_param.scale, layer.power_param.shift = 0.5 + i % 3, 0.1 * (i % 4)
            x = top or x
    return b


@settings(
    max_examples=int(os.environ.get("FUZZ_NETS", "300")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(st.lists(OPS, min_size=1, max_size=8), st.lists(st.booleans(), min_size=8, max_size=8), st.integers(0, 99))
def test_random_nets_merge_to_the_same_function(ops: list[str], in_place: list[bool], seed: int) -> None:
    b = _build(ops, in_place[: len(ops)], seed)
    with _scratch() as folder:
        merged = merge_and_check(b, folder, "reference")
        assert merged.layer_count("BatchNorm")[1] <= merged.layer_count("BatchNorm")[0]


@contextmanager
def _scratch():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


# --- mutated inputs --------------------------------------------------------------------------


def _seed_files(folder: Path) -> tuple[bytes, bytes]:
    b = NetBuilder("seed", (1, 3, 6, 6), seed=1)
    x = b.scale(b.bn(b.conv("data", 4, name="c1"), name="bn1"), name="s1")
    x = b.relu(x)
    b.bn(b.ip(x, 5, name="fc"), name="bn2", top="out")
    b.save(folder / "seed.prototxt", folder / "seed.caffemodel")
    return (folder / "seed.prototxt").read_bytes(), (folder / "seed.caffemodel").read_bytes()


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"]),
        st.integers(0, 2**31),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, value in mutations:
        i = where % max(len(buf), 1)
        if kind == "flip" and buf:
            buf[i] ^= 1 << (value % 8)
        elif kind == "set" and buf:
            buf[i] = value
        elif kind == "insert":
            buf[i:i] = bytes([value]) * (1 + value % 8)
        elif kind == "delete":
            del buf[i : i + 1 + value % 16]
        elif kind == "truncate":
            del buf[i:]
        elif kind == "duplicate":
            buf[i:i] = buf[i : i + 1 + value]
    return bytes(buf)


@contextmanager
def _time_limit(seconds: int):
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"one input took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _merge_or_clean_error(folder: Path, prototxt: bytes, caffemodel: bytes) -> None:
    model, weights = folder / "m.prototxt", folder / "m.caffemodel"
    model.write_bytes(prototxt)
    weights.write_bytes(caffemodel)
    out = (folder / "o.prototxt", folder / "o.caffemodel")
    for stale in out:
        stale.unlink(missing_ok=True)
    with _time_limit(SECONDS_PER_INPUT):
        try:
            merge(model, weights, *out)
        except MergeError:
            assert not any(p.exists() for p in out)  # failed: nothing under the output names
            return
        caffe_io.read_weights(out[1])  # succeeded: the output reads back
        caffe_io.read_net(out[0])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> tuple[Path, bytes, bytes]:
    folder = tmp_path_factory.mktemp("fuzz")
    return (folder, *_seed_files(folder))


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(MUTATIONS)
def test_mutated_caffemodels(seeds, mutations) -> None:
    folder, prototxt, caffemodel = seeds
    _merge_or_clean_error(folder, prototxt, _mutate(caffemodel, mutations))


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(MUTATIONS)
def test_mutated_prototxts(seeds, mutations) -> None:
    folder, prototxt, caffemodel = seeds
    _merge_or_clean_error(folder, _mutate(prototxt, mutations), caffemodel)


def test_mutation_changes_the_input() -> None:
    data = bytes(range(50))
    assert _mutate(data, [("flip", 3, 0)]) != data and _mutate(data, [("truncate", 10, 0)]) == data[:10]
    assert np.frombuffer(_mutate(data, [("set", 0, 7)]), np.uint8)[0] == 7
