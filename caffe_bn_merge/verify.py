"""Checking a merged model against its original on a real engine (OpenCV dnn 4.x, fusion off).

Compared blobs: the inputs of Softmax / DetectionOutput / ArgMax (which would otherwise hide errors)
and every net output, except those of discontinuous layers (DetectionOutput's NMS, ArgMax) and
those computed from a Softmax (its input is compared instead, on the scale where errors show).
Blobs are matched by name; an in-place blob is compared as the version the reading layer sees.
The library returns numbers; it never prints.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .caffe_io import read_net
from .errors import MergeError
from .graph import LayerNode, NetGraph, build_graph, input_shapes

HIDING_TYPES = ("Softmax", "DetectionOutput", "ArgMax")  # their inputs are compared as well
DISCONTINUOUS_TYPES = ("DetectionOutput", "ArgMax")  # their outputs are not compared
RESHAPING_TYPES = ("Flatten", "Reshape", "Permute", "Squeeze", "Split")  # move values, compute nothing


@dataclass(frozen=True)
class BlobError:
    """How far one blob of the merged model is from the original."""

    blob: str
    max_abs: float
    scale: float  # max |original|

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


class VerifyError(MergeError):
    """The engine is missing or cannot run one of the models."""

    exit_code = 2


def compare_points(graph: NetGraph) -> dict[str, tuple[str, str]]:
    """Blob label -> (layer, top) that produces it, for the blobs worth comparing."""
    points: dict[str, tuple[str, str]] = {}
    for node in graph.layers:
        if node.type in HIDING_TYPES:
            for version in node.bottoms:
                producer = graph.producer(version)
                if producer is not None and not _after_softmax(graph, producer):
                    points[f"{version.name} (into {node.name})"] = (producer.name, version.name)
    for version in graph.outputs:
        producer = graph.producer(version)
        if producer is not None and producer.type not in DISCONTINUOUS_TYPES and not _after_softmax(graph, producer):
            points[version.name] = (producer.name, version.name)
    return points


def _after_softmax(graph: NetGraph, node: LayerNode | None) -> bool:
    """True when `node` is a Softmax or only reshapes the output of one."""
    while node is not None and node.type in RESHAPING_TYPES and len(node.bottoms) == 1:
        node = graph.producer(node.bottoms[0])
    return node is not None and node.type == "Softmax"


def random_inputs(model: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs shaped as the prototxt declares."""
    rng = np.random.default_rng(seed)
    shapes = input_shapes(read_net(model))
    if not shapes:
        raise VerifyError(f"{model}: no input shape (Input layer, input_shape or input_dim) to verify with")
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def run_opencv(
    model: Path, weights: Path, inputs: dict[str, np.ndarray], outputs: list[tuple[str, str]]
) -> list[np.ndarray]:
    """Values of `outputs` ((layer, top) pairs) computed by OpenCV dnn with its run-time fusion off.
    OpenCV 4.x renames a Convolution layer after its top, so a layer is looked up under both names."""
    try:
        import cv2
    except ImportError as err:
        raise VerifyError("OpenCV is not installed: pip install 'caffe-bn-merge[verify]'") from err
    try:
        net = cv2.dnn.readNetFromCaffe(str(model), str(weights))
        net.enableFusion(False)
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        for name, value in inputs.items():
            net.setInput(value, name)
        known = set(net.getLayerNames())
        layers = [layer if layer in known else top for layer, top in outputs]
        return [np.array(out, np.float64) for out in net.forward(layers)]
    except cv2.error as err:
        raise VerifyError(f"OpenCV could not run {model}: {str(err).strip().splitlines()[-1]}") from err


def compare_models(
    original: tuple[Path, Path], merged: tuple[Path, Path], inputs: dict[str, np.ndarray] | None = None
) -> list[BlobError]:
    """Per-blob error of `merged` against `original` (each a (prototxt, caffemodel) pair)."""
    inputs = inputs if inputs is not None else random_inputs(original[0])
    want = compare_points(build_graph(read_net(original[0])))
    have = compare_points(build_graph(read_net(merged[0])))
    labels = [label for label in want if label in have]
    if not labels:
        raise VerifyError(f"{merged[0]}: no output blob in common with {original[0]}")
    reference = run_opencv(*original, inputs, [want[label] for label in labels])
    result = run_opencv(*merged, inputs, [have[label] for label in labels])
    return [
        BlobError(label, float(np.max(np.abs(ref - out), initial=0.0)), float(np.max(np.abs(ref), initial=0.0)))
        for label, ref, out in zip(labels, reference, result, strict=True)
    ]
