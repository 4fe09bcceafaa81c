"""One numeric harness for the tests: build or take a net, merge it, run both on OpenCV, compare."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import reference

from caffe_bn_merge import merge
from caffe_bn_merge.graph import build_graph
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.pipeline import MergeOptions, MergeResult
from caffe_bn_merge.synthetic.synth import NetBuilder
from caffe_bn_merge.verification.compare import BlobError, compare_models

TOLERANCE = 1e-5  # max error relative to the output's magnitude


@dataclass
class Merged:
    """A merge and its numeric check."""

    result: MergeResult
    errors: list[BlobError]
    original: tuple[Path, Path]
    merged: tuple[Path, Path]

    @property
    def removed(self) -> set[str]:
        return self.result.plan.removed

    @property
    def kept(self) -> dict[str, str]:
        """Kept layer name -> reason code."""
        return {k.layer: k.refusal.reason.code for k in self.result.plan.kept}

    def layer_count(self, type_: str) -> tuple[int, int]:
        return self.result.layers_before[type_], self.result.layers_after[type_]


def save(builder: NetBuilder, folder: Path) -> tuple[Path, Path]:
    prototxt, caffemodel = folder / f"{builder.net.name}.prototxt", folder / f"{builder.net.name}.caffemodel"
    builder.save(prototxt, caffemodel)
    return prototxt, caffemodel


CLASSIC = MergeOptions(identity=False, backward=False, standalone=False)  # forward folds only


def merge_and_check(
    source: NetBuilder | tuple[Path, Path],
    folder: Path,
    engine: str | None = "opencv",
    options: MergeOptions = MergeOptions(),  # noqa: B008
    flavour: str | None = None,
) -> Merged:
    """Merge into `folder`, then compare merged and original to TOLERANCE on `engine`: "opencv"
    (OpenCV dnn, fusion off), "reference" (our float64 evaluator, for layers OpenCV lacks) or None.
    `flavour` (a BatchNorm layout) implies the reference evaluator with that fork's semantics."""
    original = save(source, folder) if isinstance(source, NetBuilder) else source
    merged = (folder / "merged.prototxt", folder / "merged.caffemodel")
    result = merge(*original, *merged, options)
    engines = {"opencv": compare_models, "reference": compare_reference, None: lambda *_: []}
    errors = engines[engine](original, merged) if flavour is None else compare_reference(original, merged, flavour)
    for error in (e for e in errors if e.gating):
        assert error.scale > 1e-3, f"{error.blob}: the original output is ~0, the check could not fail"
        assert error.relative <= TOLERANCE, f"{error.blob}: relative error {error.relative:.3g}"
    return Merged(result, errors, original, merged)


def compare_reference(original: tuple[Path, Path], merged: tuple[Path, Path], flavour: str = "bvlc") -> list[BlobError]:
    """Compare the net outputs of both models evaluated by `reference` in float64; the original's
    BatchNorm layers follow `flavour` (the merged model has none left, or BVLC ones)."""
    inputs = reference.random_inputs(original[0])
    want, got = reference.evaluate(*original, inputs, flavour), reference.evaluate(*merged, inputs)
    outputs = [v.name for v in build_graph(caffe_io.read_net(original[0])).outputs]
    return [BlobError(n, float(np.max(np.abs(want[n] - got[n]))), float(np.max(np.abs(want[n])))) for n in outputs]


def copy_sample(folder: Path, name: str = "resnet_mini") -> tuple[Path, Path]:
    """A bundled sample net copied to `folder` as net.prototxt + net.caffemodel (safe to spoil)."""
    sample = Path(__file__).resolve().parent.parent / "sample_nets" / name
    model, weights = folder / "net.prototxt", folder / "net.caffemodel"
    model.write_bytes(sample.with_suffix(".prototxt").read_bytes())
    weights.write_bytes(sample.with_suffix(".caffemodel").read_bytes())
    return model, weights


def seeded_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
