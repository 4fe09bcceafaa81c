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

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..defaults import DEFAULT_TOLERANCE, MAX_INPUT_ELEMENTS, MAX_PROTOTXT_MB
from ..errors import InputError, MergedRunError, VerifyError
from ..graph import LayerNode, NetGraph, build_graph, input_shapes
from ..io.read import read_net, read_regular

T = TypeVar("T")
HIDING_TYPES = ("Softmax", "DetectionOutput", "ArgMax")  # their inputs are compared as well
DISCONTINUOUS_TYPES = ("DetectionOutput", "ArgMax")  # their outputs are informational
RESHAPING_TYPES = ("Flatten", "Reshape", "Permute", "Squeeze", "Split")  # move values, compute nothing

Runner = Callable[[Path, Path, dict[str, np.ndarray], list[tuple[str, str]]], list[np.ndarray]]


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
        """The largest gating relative error; NaN when any of them is not finite (Python's `max`
        would skip a NaN that is not first)."""
        relative = [e.relative for e in self.errors if e.gating]
        return float(np.max(relative, initial=0.0)) if all(map(math.isfinite, relative)) else math.nan

    @property
    def passed(self) -> bool:
        """Every gating error finite and within the tolerance."""
        return math.isfinite(self.max_relative) and self.max_relative <= self.tolerance


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


@dataclass(frozen=True)
class InputLimits:
    """Bounds on what --verify reads: the prototxt's size, and the total number of input values."""

    prototxt_mb: int = MAX_PROTOTXT_MB
    elements: int = MAX_INPUT_ELEMENTS

    def check(self, what: str, count: int) -> None:
        if count > self.elements:
            raise InputError(
                f"{what}: {count:,} input values, more than the {self.elements:,} allowed; "
                "if it is right, raise the limit with --max-input-elements"
            )


def random_inputs(model: Path, seed: int = 0, limits: InputLimits = InputLimits()) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs shaped as the prototxt declares."""
    if seed < 0:
        raise InputError(f"--seed {seed}: the seed must be 0 or more")
    rng = np.random.default_rng(seed)
    shapes = _declared_shapes(model, limits)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _declared_shapes(model: Path, limits: InputLimits) -> dict[str, tuple[int, ...]]:
    """The net's input shapes, each with at least one dimension, every dimension positive, and
    within `limits` all together."""
    shapes = input_shapes(read_net(model, limits.prototxt_mb))
    if not shapes:
        raise VerifyError(f"{model}: no input shape (Input layer, input_shape or input_dim) to verify with")
    for name, shape in shapes.items():
        if not shape or min(shape) <= 0:
            raise InputError(
                f"{model}: input '{name}' has shape {list(shape)}; --verify needs every dimension "
                "declared and positive (Input layer's input_param { shape { dim: ... } })"
            )
    limits.check(f"{model}: its inputs {sorted(shapes)}", sum(math.prod(shape) for shape in shapes.values()))
    return shapes


def load_inputs(
    model: Path, specs: list[str], seed: int = 0, limits: InputLimits = InputLimits()
) -> dict[str, np.ndarray]:
    """Inputs from `name=path` specs (.npy arrays or images); inputs not given are seeded random.
    A bare `path` names the only input. Images are read as BGR pixel values in [0, 255], resized to
    the input's height and width, without mean or scale: give a .npy for other preprocessing."""
    shapes = _declared_shapes(model, limits)
    inputs = random_inputs(model, seed, limits)
    for spec in specs:
        name, _, path = spec.rpartition("=")
        if not name:
            if len(shapes) != 1:
                raise InputError(f"--input {spec}: the net has inputs {sorted(shapes)}; write NAME=PATH")
            name = next(iter(shapes))
        if name not in shapes:
            raise InputError(f"--input {spec}: the net has no input '{name}' (it has {sorted(shapes)})")
        inputs[name] = _read_input(Path(path), shapes[name], limits)
    return inputs


def _read_input(path: Path, shape: tuple[int, ...], limits: InputLimits) -> np.ndarray:
    """An input file read whole (8 bytes a value at most, so bounded by the limit), then decoded."""
    data = read_regular(path, "--input", limits.elements * 8 + NPY_HEADER_BYTES, "--max-input-elements")
    array = _read_npy(path, data) if path.suffix == ".npy" else _read_image(path, data, shape, limits)
    if array.size != math.prod(shape):
        raise InputError(f"{path}: holds {array.shape}, the input needs {shape}")
    return np.asarray(array, np.float32).reshape(shape)


NPY_HEADER_BYTES = 1 << 16  # numpy refuses longer .npy headers (max_header_size) anyway


def _read_npy(path: Path, data: bytearray) -> np.ndarray:
    """A .npy array of real numbers (numpy's own reader: no pickles, a bounded header)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: not a readable .npy array ({reason})") from err
    if array.dtype.kind not in "biuf":
        raise InputError(f"{path}: holds {array.dtype} values; --input needs real numbers (int or float)")
    return array


def _read_image(path: Path, data: bytearray, shape: tuple[int, ...], limits: InputLimits) -> np.ndarray:
    """Decode with OpenCV once the header's size (read by Pillow, which decodes nothing to get it)
    is within `limits`: a small compressed file can declare billions of pixels."""
    cv2 = _import_cv2()
    channels = 3 if shape[1] == 3 else 1
    width, height = _image_size(path, data)
    limits.check(f"{path}: a {width}x{height} image", width * height * channels)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise InputError(f"{path}: not an image OpenCV can read; give a .npy array instead")
    image = cv2.resize(image, (shape[-1], shape[-2])).astype(np.float32)
    return image.reshape(shape[-2], shape[-1], -1).transpose(2, 0, 1)[np.newaxis]


def _image_size(path: Path, data: bytearray) -> tuple[int, int]:
    """Width and height from the image's header alone."""
    try:
        from PIL import Image
    except ImportError as err:
        raise VerifyError("image inputs need Pillow: pip install 'caffe-bn-merge[verify]'") from err
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as err:
        size = str(err).split(",")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        raise InputError(f"{path}: {size}: more input values than --max-input-elements allows") from err
    except (OSError, ValueError, SyntaxError) as err:  # Pillow's errors for files it cannot identify
        raise InputError(f"{path}: not an image whose size can be read ({err}); give a .npy array instead") from err


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
    limits: InputLimits = InputLimits(),
) -> list[BlobError]:
    """Per-blob error of `merged` against `original` (each a (prototxt, caffemodel) pair)."""
    original, merged = _paths(original), _paths(merged)
    inputs = inputs if inputs is not None else random_inputs(original[0], limits=limits)
    want = compare_points(build_graph(read_net(original[0], limits.prototxt_mb)))
    have = compare_points(build_graph(read_net(merged[0], limits.prototxt_mb)))
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
        blob_error(label, ref, out, want[label].gating)
        for label, ref, out in zip(labels, reference, result, strict=True)
    ]


def blob_error(label: str, reference: np.ndarray, merged: np.ndarray, gating: bool) -> BlobError:
    """How far `merged` is from `reference` (NaN when either holds a NaN: numpy's max keeps it)."""
    return BlobError(
        label,
        float(np.max(np.abs(reference - merged), initial=0.0)),
        float(np.max(np.abs(reference), initial=0.0)),
        gating,
    )


def verify(
    original: tuple[Path, Path],
    merged: tuple[Path, Path],
    backend: str = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
    input_specs: list[str] | None = None,
    seed: int = 0,
    limits: InputLimits = InputLimits(),
) -> VerifyResult:
    """Run both models on the same inputs (within `limits`) and judge the merged one against
    `tolerance`. `auto` takes the first engine of `BACKENDS` that runs the original model, and says
    which it passed over; an engine that runs the original but not the merged model fails
    verification (`MergedRunError`)."""
    original, merged = _paths(original), _paths(merged)
    inputs = load_inputs(original[0], input_specs or [], seed, limits)
    described = ", ".join(input_specs) if input_specs else f"random normal, seed {seed}"
    engine, errors, passed_over = first_engine(
        backend, tuple(BACKENDS), lambda name: compare_models(original, merged, inputs, name, limits), "run"
    )
    return VerifyResult(engine, tolerance, described, tuple(errors), tuple(passed_over))


def first_engine(
    backend: str, engines: Sequence[str], attempt: Callable[[str], T], what: str
) -> tuple[str, T, list[str]]:
    """`attempt(backend)`; with `auto`, `attempt` on each of `engines` in turn until one does not
    raise VerifyError: its name, its result, and why each engine before it could not. A
    `MergedRunError` is a verdict on the merged model, never passed over."""
    passed_over: list[str] = []
    for engine in engines if backend == "auto" else (backend,):
        try:
            return engine, attempt(engine), passed_over
        except MergedRunError:
            raise
        except VerifyError as err:
            if backend != "auto":
                raise
            passed_over.append(f"{engine}: {err}")
    reasons = "; ".join(reversed(passed_over))  # the last engine first: the reference engine, always there
    raise VerifyError(f"no engine can {what} the models: {reasons}")


def _paths(pair: tuple[Path | str, Path | str]) -> tuple[Path, Path]:
    return Path(pair[0]), Path(pair[1])
