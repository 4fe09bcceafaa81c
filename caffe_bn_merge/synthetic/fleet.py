"""A synthetic fleet of MobileNet-SSD deployments, for the batch tests and benchmark.

Each deployment is a folder holding a deploy prototxt and 1-3 caffemodels: MobileNet-SSD of a
varied width (0.125-0.25 unless told) and class count, with weights of their own per snapshot.
Folders come in three layouts, cycling:

- ``same_stem``: ``mobilenet_ssd.prototxt`` + ``mobilenet_ssd.caffemodel``;
- ``snapshots``: ``MobileNetSSD_deploy.prototxt``, training snapshots
  ``mobilenet_iter_<N>.caffemodel``, and ``MobileNetSSD_train.prototxt``,
  ``MobileNetSSD_test.prototxt`` and ``solver.prototxt`` beside them;
- ``content``: a deploy prototxt whose name does not say so (``model.prototxt``) beside a
  ``train_val.prototxt``, and snapshots: only the contents tell which one is the deploy.

One deployment (the middle one) is broken on purpose: one of its caffemodels belongs to another net
(``broken="other_net"``, MobileNet-SSD of another width) or is cut in half (``"truncated"``).

The network itself is the sample nets' MobileNet-SSD (``samples.mobilenet_ssd``) at the
deployment's width and class count; each caffemodel is ``synth.weights_for`` that prototxt with a
seed of its own. Deterministic for a given (count, seed).
"""

import copy
import dataclasses
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from ..io import proto
from . import samples
from .synth import save_weights_for

WIDTHS = (0.125, 0.1875, 0.25)
CLASS_COUNTS = (2, 3, 5, 11, 21)
LAYOUTS = ("same_stem", "snapshots", "content")
BROKEN_KINDS = ("other_net", "truncated")


@dataclass(frozen=True)
class Deployment:
    """One folder of the fleet: its deploy prototxt, its caffemodels and what else lies beside them."""

    folder: Path
    prototxt: Path
    caffemodels: tuple[Path, ...]
    width: float
    classes: int
    layout: str
    extras: tuple[Path, ...] = ()  # train / test / solver prototxts beside the deploy
    broken: Path | None = None  # the caffemodel that cannot convert, if any

    @property
    def pairs(self) -> list[tuple[Path, Path]]:
        """(prototxt, caffemodel) of every snapshot: the batch work items of this folder."""
        return [(self.prototxt, caffemodel) for caffemodel in self.caffemodels]


def make_fleet(
    root: Path, count: int, seed: int = 0, broken: str | None = "other_net", widths: Sequence[float] = WIDTHS
) -> list[Deployment]:
    """Write `count` MobileNet-SSD deployment folders under `root`, each of one of `widths`; return
    them in creation order. `broken` is the kind of the one broken deployment ("other_net",
    "truncated"), or None for none."""
    if broken is not None and broken not in BROKEN_KINDS:
        raise ValueError(f"broken must be one of {BROKEN_KINDS} or None, not {broken!r}")
    rng = random.Random(seed)
    root = Path(root)
    fleet = []
    for index in range(count):
        width, classes = rng.choice(widths), rng.choice(CLASS_COUNTS)
        layout = LAYOUTS[index % len(LAYOUTS)]
        snapshots = 1 if layout == "same_stem" else rng.randint(1, 3)
        folder = root / f"line_{index % 4}" / f"customer_{index:03d}" if index % 5 else root / f"detector_{index:03d}"
        weight_seeds = [seed * 100_003 + index * 10 + s for s in range(snapshots)]
        deployment = _write_deployment(folder, layout, width, classes, weight_seeds, rng)
        if broken is not None and index == count // 2:
            deployment = _break(deployment, broken, weight_seeds[-1])
        fleet.append(deployment)
    return fleet


def _write_deployment(
    folder: Path, layout: str, width: float, classes: int, weight_seeds: list[int], rng: random.Random
) -> Deployment:
    folder.mkdir(parents=True, exist_ok=True)
    net = mobilenet_ssd_net(width, classes)
    extras: list[Path] = []
    if layout == "same_stem":
        deploy = folder / "mobilenet_ssd.prototxt"
        caffemodels = [folder / "mobilenet_ssd.caffemodel"]
    else:
        iterations = sorted(rng.sample(range(10, 120), len(weight_seeds)))
        caffemodels = [folder / f"mobilenet_iter_{it * 1000}.caffemodel" for it in iterations]
        if layout == "snapshots":
            deploy = folder / "MobileNetSSD_deploy.prototxt"
            train, test = folder / "MobileNetSSD_train.prototxt", folder / "MobileNetSSD_test.prototxt"
            train.write_text(text_format.MessageToString(training_net(net, "TRAIN")))
            test.write_text(text_format.MessageToString(training_net(net, "TEST")))
            solver = folder / "solver.prototxt"
            solver.write_text(solver_text(train.name, test.name))
            extras += [train, test, solver]
        else:
            deploy = folder / "model.prototxt"
            train_val = folder / "train_val.prototxt"
            both = training_net(net, "TRAIN")
            both.layer.insert(1, training_net(net, "TEST").layer[0])  # the TEST-phase data layer too
            train_val.write_text(text_format.MessageToString(both))
            extras.append(train_val)
    deploy.write_text(text_format.MessageToString(net))
    for caffemodel, weight_seed in zip(caffemodels, weight_seeds, strict=True):
        save_weights_for(deploy, caffemodel, weight_seed)
    return Deployment(folder, deploy, tuple(caffemodels), width, classes, layout, tuple(extras))


def _break(deployment: Deployment, kind: str, weight_seed: int) -> Deployment:
    """Replace the last caffemodel of `deployment` by another net's weights, or by its first half."""
    victim = deployment.caffemodels[-1]
    if kind == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    else:
        width = next(w for w in WIDTHS if w != deployment.width)
        with tempfile.TemporaryDirectory() as scratch:
            other = Path(scratch) / "other_net.prototxt"
            other.write_text(text_format.MessageToString(mobilenet_ssd_net(width, deployment.classes)))
            save_weights_for(other, victim, weight_seed)
    return dataclasses.replace(deployment, broken=victim)


# --- the nets -----------------------------------------------------------------------------------------


def mobilenet_ssd_net(width: float, classes: int) -> object:
    """The deploy NetParameter of the sample MobileNet-SSD at `width`, for `classes` classes."""
    return samples.mobilenet_ssd(width, classes).net


def training_net(deploy: object, phase: str) -> object:
    """A train (or test) net for `deploy`, as SSD training writes it: an AnnotatedData layer in
    place of the Input layer, and MultiBoxLoss (TRAIN) or DetectionEvaluate (TEST) at the end."""
    net = copy.deepcopy(deploy)
    data = net.layer[0]
    data.Clear()
    data.name, data.type = "data", "AnnotatedData"
    data.top.extend(["data", "label"])
    data.include.add(phase=getattr(proto, phase))
    if phase == "TRAIN":
        heads = [layer for layer in net.layer if layer.type not in ("Reshape", "Softmax", "DetectionOutput")]
        heads = [layer for layer in heads if layer.name != "mbox_conf_flatten"]
        del net.layer[:]
        net.layer.extend(heads)
        loss = net.layer.add(name="mbox_loss", type="MultiBoxLoss", top=["mbox_loss"])
        loss.bottom.extend(["mbox_loc", "mbox_conf", "mbox_priorbox", "label"])
        loss.include.add(phase=proto.TRAIN)
    else:
        evaluate = net.layer.add(name="detection_eval", type="DetectionEvaluate", top=["detection_eval"])
        evaluate.bottom.extend(["detection_out", "label"])
        evaluate.include.add(phase=proto.TEST)
    return net


def solver_text(train: str, test: str) -> str:
    """An SSD solver prototxt naming `train` and `test` nets."""
    return (
        f'train_net: "{train}"\ntest_net: "{test}"\ntest_iter: 673\ntest_interval: 10000\n'
        'base_lr: 0.0005\ndisplay: 10\nmax_iter: 120000\nlr_policy: "multistep"\ngamma: 0.5\n'
        'weight_decay: 5e-05\nsnapshot: 1000\nsnapshot_prefix: "mobilenet"\nsolver_mode: CPU\n'
        'type: "RMSProp"\neval_type: "detection"\nap_version: "11point"\n'
    )
