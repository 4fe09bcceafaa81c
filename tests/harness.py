"""One numeric harness for the tests: build or take a net, merge it, run both on OpenCV, compare."""

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import reference

from caffe_bn_merge import merge
from caffe_bn_merge.graph import build_graph
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.pipeline import MergeOptions, MergeResult
from caffe_bn_merge.synthetic.samples import SAMPLES
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


def altered_sample(
    folder: Path,
    rename: dict[str, str] | None = None,
    negative_variance: bool = False,
    batch_stats: bool = False,
) -> tuple[Path, Path]:
    """resnet_mini written to `folder` as net.prototxt + net.caffemodel with its layers renamed
    (`rename`: old -> new), the first BatchNorm's first channel given a small negative variance
    (still finite: folded with a warning), or every BatchNorm set to `use_global_stats: false`."""
    from caffe_bn_merge.io.emit import write_new_weights

    sample = Path(__file__).resolve().parent.parent / "sample_nets" / "resnet_mini"
    rename = rename or {}
    text = sample.with_suffix(".prototxt").read_text()
    text = re.sub(r'(\n\s*name: )"([^"]*)"', lambda m: f'{m[1]}"{rename.get(m[2], m[2])}"', text)
    if batch_stats:
        text = text.replace('type: "BatchNorm"', 'type: "BatchNorm"\n  batch_norm_param { use_global_stats: false }')
    types = {layer.name: layer.type for layer in caffe_io.read_net(sample.with_suffix(".prototxt")).layer}
    layers, spoiled = [], not negative_variance
    for name, stored in caffe_io.read_weights(sample.with_suffix(".caffemodel")).layers.items():
        blobs = [np.array(blob) for blob in stored.blobs]
        if not spoiled and types[name] == "BatchNorm":
            blobs[1][0] = -1e-6 * blobs[2].flat[0]  # variance -1e-6 after Caffe's scaling; eps is 1e-5
            spoiled = True
        layers.append((rename.get(name, name), types[name], blobs))
    model, weights = folder / "net.prototxt", folder / "net.caffemodel"
    model.write_text(text)
    write_new_weights(layers, weights)
    return model, weights


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")  # colours, cursor moves, titles


def run_in_terminal(args: list[str], columns: int, cwd: Path) -> str:
    """Run `python -m caffe_bn_merge ARGS` on a pseudo-terminal `columns` wide (stdin, stdout and
    stderr); what it showed, escape codes removed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    command = [sys.executable, "-m", "caffe_bn_merge", *args]
    child = subprocess.Popen(command, cwd=cwd, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert child.wait(timeout=300) in (0, 1)
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


def start_in_session(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`command` in a session of its own (a test can signal its process group), stdout discarded,
    stderr read as text."""
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def group_gone(pgid: int, seconds: float = 10) -> bool:
    """Whether every process of group `pgid` (a command and its workers) has ended, waiting up to
    `seconds`; when some are left, they are killed and the answer is False."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    return False


# The weighted real nets of ../shared/real_nets: name -> (prototxt, caffemodel, forward folds expected).
REAL_NETS = {
    "mobilenet_ssd_0.5": (
        "mobilenet_ssd_0.5_hx/MobileNetSSD_deploy_bn.DERIVED.prototxt",
        "mobilenet_ssd_0.5_hx/mobilenet_0.5.caffemodel",
        23,
    ),
    "cifar10_resnet20": (
        "cifar10_resnet20/res20_deploy.DERIVED.prototxt",
        "cifar10_resnet20/cifar10_res20_iter_64000.caffemodel",
        21,
    ),
    "emotion_mini_xception": ("emotion_mini_xception/deploy.prototxt", "emotion_mini_xception/weights.caffemodel", 14),
    "yoloface50k": ("yoloface50k/yoloface-50k.prototxt", "yoloface50k/yoloface-50k.caffemodel", 23),
    "landmark106_mbv2": ("landmark106_mbv2/landmark106.prototxt", "landmark106_mbv2/landmark106.caffemodel", 38),
    "ultraface_rfb320_nobn": ("ultraface_rfb320_nobn/RFB-320.prototxt", "ultraface_rfb320_nobn/RFB-320.caffemodel", 0),
}


def every_rule() -> NetBuilder:
    """A net where every rule acts and every affine layer type is read: forward folds into a
    Convolution, Deconvolution and InnerProduct, a backward fold into an unpadded Convolution, a
    standalone chain, Bias and Power layers, an axis -3 Scale, a Dropout, an in-place Scale that
    may be the identity."""
    b = NetBuilder("every_rule", (1, 3, 12, 12), seed=1)
    x = b.relu(b.scale(b.bn(b.conv("data", 8, name="c1"))))
    y = b.scale(b.bn(x, top="pre", name="pre_bn"), name="pre_scale")
    y = b.relu(b.bias(b.conv(y, 8, kernel=1, pad=0, name="c2"), name="c2_bias"))
    power = b.unary("Power", y, name="power")
    power.power_param.scale, power.power_param.shift = 0.5, 0.25
    b.unary("Dropout", y, name="drop")
    d = b.scale(b.bn(b.conv(y, 4, kernel=2, stride=2, pad=0, deconv=True, name="up")), axis=-3, name="up_scale")
    p = b.pool(b.relu(d), global_pool=True, name="gpool")
    s = b.scale(b.bn(p, top="alone", name="alone_bn"), name="alone_scale")
    b.scale(b.relu(b.scale(b.bn(b.ip(s, 6, name="fc"), name="fc_bn"), name="fc_scale")), name="maybe_identity")
    return b


REPLAY_NETS = {**SAMPLES, "every_rule": every_rule}  # the nets replayed merges are tested on
