"""Checking a merged model against its original on an engine: real Caffe (pycaffe, in its own
environment, see `pycaffe`), OpenCV dnn 4.x (run-time fusion off on both sides) or our float64
reference engine (`reference`, numpy only).

Compared blobs, matched by name (an in-place blob as the version its reader sees):
- gating (they decide pass / fail): the inputs of Softmax / DetectionOutput / ArgMax, which would
  otherwise hide errors, and every other net output;
- informational (reported, never failing): outputs computed from a Softmax (their input is compared
  on the scale where errors show) and outputs of DetectionOutput / ArgMax, whose NMS and argmax are
  discontinuous, so float32 noise can legitimately reorder boxes.
The library returns numbers; it never prints.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..defaults import DEFAULT_TOLERANCE
from ..errors import InputError, VerifyError
from ..graph import LayerNode, NetGraph, build_graph, input_shapes
from ..io.read import read_net

HIDING_TYPES = ("Softmax", "DetectionOutput", "ArgMax")  # their inputs are compared as well
DISCONTINUOUS_TYPES = ("DetectionOutput", "ArgMax")  # their outputs are informational
RESHAPING_TYPES = ("Flatten", "Reshape", "Permute", "Squeeze", "Split")  # move values, compute nothing

Runner = Callable[[Path, Path, dict[str, np.ndarray], list[tuple[str, str]]], list[np.ndarray]]


class MergedRunError(VerifyError):
    """An engine ran the original model but not the merged one."""


@dataclass(frozen=True)
class BlobError:
    """How far one blob of the merged model is from the original."""

    blob: str
    max_abs: float
    scale: float  # max |original|
    gating: bool = True  # False: reported only (after Softmax, DetectionOutput, ArgMax)

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `verify`: per-blob errors on one backend, judged against a tolerance."""

    backend: str
    tolerance: float
    inputs: str  # how the inputs were made, for the report
    errors: tuple[BlobError, ...]
    passed_over: tuple[str, ...] = ()  # with `auto`: each engine tried first, as "engine: why it could not"

    @property
    def max_relative(self) -> float:
        """The largest gating error; NaN when any is NaN (Python's `max` would skip it)."""
        return float(np.max([e.relative for e in self.errors if e.gating], initial=0.0))

    @property
    def passed(self) -> bool:
        return self.max_relative <= self.tolerance


@dataclass(frozen=True)
class ComparePoint:
    """A blob worth comparing: produced by `layer` as its top `top`."""

    layer: str
    top: str
    gating: bool


def compare_points(graph: NetGraph) -> dict[str, ComparePoint]:
    """Blob label -> where to read it, for the blobs worth comparing."""
    points: dict[str, ComparePoint] = {}
    for node in graph.layers:
        if node.type in HIDING_TYPES:
            for version in node.bottoms:
                producer = graph.producer(version)
                if producer is not None and not _after_softmax(graph, producer):
                    points[f"{version.name} (into {node.name})"] = ComparePoint(producer.name, version.name, True)
    for version in graph.outputs:
        producer = graph.producer(version)
        if producer is not None:
            gating = producer.type not in DISCONTINUOUS_TYPES and not _after_softmax(graph, producer)
            points[version.name] = ComparePoint(producer.name, version.name, gating)
    return points


def _after_softmax(graph: NetGraph, node: LayerNode | None) -> bool:
    """True when `node` is a Softmax or only reshapes the output of one."""
    while node is not None and node.type in RESHAPING_TYPES and len(node.bottoms) == 1:
        node = graph.producer(node.bottoms[0])
    return node is not None and node.type == "Softmax"


def random_inputs(model: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs shaped as the prototxt declares."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in _declared_shapes(model).items()}


def _declared_shapes(model: Path) -> dict[str, tuple[int, ...]]:
    shapes = input_shapes(read_net(model))
    if not shapes:
        raise VerifyError(f"{model}: no input shape (Input layer, input_shape or input_dim) to verify with")
    return shapes


def load_inputs(model: Path, specs: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from `name=path` specs (.npy arrays or images); inputs not given are seeded random.
    A bare `path` names the only input. Images are read as BGR pixel values in [0, 255], resized to
    the input's height and width, without mean or scale: give a .npy for other preprocessing."""
    shapes = _declared_shapes(model)
    inputs = random_inputs(model, seed)
    for spec in specs:
        name, _, path = spec.rpartition("=")
        if not name:
            if len(shapes) != 1:
                raise InputError(f"--input {spec}: the net has inputs {sorted(shapes)}; write NAME=PATH")
            name = next(iter(shapes))
        if name not in shapes:
            raise InputError(f"--input {spec}: the net has no input '{name}' (it has {sorted(shapes)})")
        inputs[name] = _read_input(Path(path), shapes[name])
    return inputs


def _read_input(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: no such input file")
    array = np.load(path, allow_pickle=False) if path.suffix == ".npy" else _read_image(path, shape)
    if array.size != int(np.prod(shape)):
        raise InputError(f"{path}: holds {array.shape}, the input needs {shape}")
    return np.asarray(array, np.float32).reshape(shape)


def _read_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    cv2 = _import_cv2()
    image = cv2.imread(str(path), cv2.IMREAD_COLOR if shape[1] == 3 else cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise InputError(f"{path}: not an image OpenCV can read; give a .npy array instead")
    image = cv2.resize(image, (shape[-1], shape[-2])).astype(np.float32)
    return image.reshape(shape[-2], shape[-1], -1).transpose(2, 0, 1)[np.newaxis]


def _import_cv2() -> object:
    try:
        import cv2
    except ImportError as err:
        raise VerifyError("OpenCV is not installed: pip install 'caffe-bn-merge[verify]'") from err
    return cv2


def run_opencv(
    model: Path, weights: Path, inputs: dict[str, np.ndarray], outputs: list[tuple[str, str]]
) -> list[np.ndarray]:
    """Values of `outputs` ((layer, top) pairs) computed by OpenCV dnn with its run-time fusion off.
    OpenCV 4.x renames a Convolution layer after its top, so a layer is looked up under both names."""
    cv2 = _import_cv2()
    try:
        net = opencv_net(model, weights)
        for name, value in inputs.items():
            net.setInput(value, name)
        known = set(net.getLayerNames())
        layers = [layer if layer in known else top for layer, top in outputs]
        return [np.array(out, np.float64) for out in net.forward(layers)]
    except cv2.error as err:
        cause = " ".join(line.strip().removeprefix("> ") for line in str(err).strip().splitlines())
        raise VerifyError(f"OpenCV could not run {model}: {cause}") from err


def opencv_net(model: Path, weights: Path) -> object:
    """The model as an OpenCV dnn net with run-time fusion off, on OpenCV's own backend (raises
    cv2.error)."""
    cv2 = _import_cv2()
    net = cv2.dnn.readNetFromCaffe(str(model), str(weights))
    net.enableFusion(False)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    return net


def _run_caffe(
    model: Path, weights: Path, inputs: dict[str, np.ndarray], outputs: list[tuple[str, str]]
) -> list[np.ndarray]:
    from .pycaffe import run_caffe

    return run_caffe(model, weights, inputs, outputs)


def _run_reference(
    model: Path, weights: Path, inputs: dict[str, np.ndarray], outputs: list[tuple[str, str]]
) -> list[np.ndarray]:
    from .reference import run_reference

    return run_reference(model, weights, inputs, outputs)


# Every engine by name, in the order `auto` tries them: real Caffe, then OpenCV, then our float64
# reference engine (numpy only, so `--verify` works with the core dependencies alone).
BACKENDS: dict[str, Runner] = {"caffe": _run_caffe, "opencv": run_opencv, "reference": _run_reference}


def compare_models(
    original: tuple[Path, Path],
    merged: tuple[Path, Path],
    inputs: dict[str, np.ndarray] | None = None,
    backend: str = "opencv",
) -> list[BlobError]:
    """Per-blob error of `merged` against `original` (each a (prototxt, caffemodel) pair)."""
    original, merged = _paths(original), _paths(merged)
    inputs = inputs if inputs is not None else random_inputs(original[0])
    want = compare_points(build_graph(read_net(original[0])))
    have = compare_points(build_graph(read_net(merged[0])))
    labels = [label for label in want if label in have]
    if not labels:
        raise VerifyError(f"{merged[0]}: no output blob in common with {original[0]}")
    run = BACKENDS[backend]
    reference = run(*original, inputs, [(want[label].layer, want[label].top) for label in labels])
    try:
        result = run(*merged, inputs, [(have[label].layer, have[label].top) for label in labels])
    except VerifyError as err:
        raise MergedRunError(f"{backend} runs the original model but not the merged one: {err}") from err
    return [
        BlobError(
            label,
            float(np.max(np.abs(ref - out), initial=0.0)),
            float(np.max(np.abs(ref), initial=0.0)),
            want[label].gating,
        )
        for label, ref, out in zip(labels, reference, result, strict=True)
    ]


def verify(
    original: tuple[Path, Path],
    merged: tuple[Path, Path],
    backend: str = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
    input_specs: list[str] | None = None,
    seed: int = 0,
) -> VerifyResult:
    """Run both models on the same inputs and judge the merged one against `tolerance`. `auto`
    takes the first engine of `BACKENDS` that runs the original model, and says which it passed
    over; an engine that runs the original but not the merged model fails verification
    (`MergedRunError`)."""
    original, merged = _paths(original), _paths(merged)
    inputs = load_inputs(original[0], input_specs or [], seed)
    described = ", ".join(input_specs) if input_specs else f"random normal, seed {seed}"
    passed_over: list[str] = []
    for engine in BACKENDS if backend == "auto" else (backend,):
        try:
            errors = compare_models(original, merged, inputs, engine)
        except MergedRunError:
            raise  # a verdict on the merged model: another engine must not pass it
        except VerifyError as err:
            if backend != "auto":
                raise
            passed_over.append(f"{engine}: {err}")
            continue
        return VerifyResult(engine, tolerance, described, tuple(errors), tuple(passed_over))
    raise VerifyError(f"no engine can run {original[0]}: {'; '.join(passed_over)}")


def _paths(pair: tuple[Path | str, Path | str]) -> tuple[Path, Path]:
    return Path(pair[0]), Path(pair[1])
