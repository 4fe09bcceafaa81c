"""Finding deployments for `merge-bn batch`: which prototxt is a deploy net (by content), which
caffemodels go with it, and explicit CSV / JSON manifests instead of discovery."""

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ..defaults import MAX_PROTOTXT_MB
from ..errors import InputError, UsageError
from ..io.read import read_regular

PROTOTXT_SUFFIX, CAFFEMODEL_SUFFIX = ".prototxt", ".caffemodel"

DATA_TYPES = frozenset(
    {"Data", "ImageData", "AnnotatedData", "HDF5Data", "WindowData", "VideoData"}
    | {"DATA", "IMAGE_DATA", "HDF5_DATA", "WINDOW_DATA"}  # V1 (`layers { type: DATA }`) spellings
)
EVALUATION_TYPES = frozenset({"Accuracy", "DetectionEvaluate", "ACCURACY"})
SOLVER_FIELDS = ("base_lr", "net", "train_net", "test_net", "lr_policy")

_COMMENT = re.compile(r"#[^\n]*")
_TYPE = re.compile(r"\btype\s*:\s*\"?([A-Za-z0-9_]+)\"?")
_SOLVER = re.compile(rf"^\s*({'|'.join(SOLVER_FIELDS)})\s*:", re.MULTILINE)
_TRAIN_PHASE = re.compile(r"\binclude\s*\{[^}]*\bphase\s*:\s*TRAIN\b")
_INPUT = re.compile(r"^\s*(input|input_shape|input_dim)\s*[:{]", re.MULTILINE)
MERGED_STEM = "_merged"  # what `merge-bn` adds to the stems of the inputs for its default outputs


# --- discovery ----------------------------------------------------------------------------------


class Kind(StrEnum):
    """What a prototxt is, judged by its content."""

    DEPLOY = "deploy"
    TRAIN_TEST = "train/test net"
    SOLVER = "solver"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Classification:
    """A prototxt's kind and the evidence for it."""

    kind: Kind
    why: str


def classify_text(text: str) -> Classification:
    """Classify prototxt text: a solver has `base_lr` / `net:` / `train_net:` fields; a train/test
    net has data, loss or evaluation layers, or layers included in phase TRAIN; a deploy net
    declares its input (Input layer, `input`, `input_shape`, `input_dim`) and has none of those."""
    text = _COMMENT.sub("", text)
    solver = _SOLVER.search(text)
    if solver:
        return Classification(Kind.SOLVER, f"solver ({solver.group(1)}: field)")
    types = set(_TYPE.findall(text))
    for found, what in (
        (sorted(types & DATA_TYPES), "data layer"),
        (sorted(t for t in types if t.endswith(("Loss", "_LOSS"))), "loss layer"),
        (sorted(types & EVALUATION_TYPES), "evaluation layer"),
    ):
        if found:
            return Classification(Kind.TRAIN_TEST, f"train/test net ({what} {found[0]})")
    if _TRAIN_PHASE.search(text):
        return Classification(Kind.TRAIN_TEST, "train/test net (include { phase: TRAIN })")
    if "Input" in types or "INPUT" in types or _INPUT.search(text):
        return Classification(Kind.DEPLOY, "deploy net (declares its input)")
    return Classification(Kind.UNKNOWN, "no input declared and no data layer")


def classify_prototxt(path: Path) -> Classification:
    """`classify_text` of the file; an unreadable file is UNKNOWN."""
    try:
        limit = MAX_PROTOTXT_MB << 20
        text = read_regular(Path(path), "prototxt", limit, "merge-bn --max-prototxt-mb").decode(errors="replace")
    except InputError as err:
        return Classification(Kind.UNKNOWN, str(err))
    return classify_text(text)


@dataclass(frozen=True)
class Pairing:
    """A caffemodel and the deploy prototxt found for it; `problem` says why there is none."""

    caffemodel: Path
    prototxt: Path | None
    problem: str | None = None


def pair_folder(prototxts: Sequence[Path], caffemodels: Sequence[Path]) -> tuple[list[Pairing], list[str]]:
    """Pair each caffemodel of one folder with a prototxt of the same folder: the one of the same
    stem unless it is a train/test net or a solver; else the only deploy-looking one; among several,
    the only one named like `*deploy*`. Anything else is a Pairing with a problem, never a guess.
    Also returns notes: the train/test/solver prototxts skipped, deploy prototxts left unused."""
    own, notes = own_outputs(prototxts, caffemodels)
    prototxts, caffemodels = [p for p in prototxts if p not in own], [c for c in caffemodels if c not in own]
    kinds = {p: classify_prototxt(p) for p in sorted(prototxts)}
    notes += [f"skipped {p}: {c.why}" for p, c in kinds.items() if c.kind in (Kind.SOLVER, Kind.TRAIN_TEST)]
    by_stem = {p.stem: p for p in kinds}
    deploys = [p for p, c in kinds.items() if c.kind is Kind.DEPLOY]
    pairings = []
    for caffemodel in sorted(caffemodels):
        same = by_stem.get(caffemodel.stem)
        if same is not None and kinds[same].kind not in (Kind.SOLVER, Kind.TRAIN_TEST):
            pairings.append(Pairing(caffemodel, same))
            continue
        named = [p for p in deploys if "deploy" in p.name.lower()]
        if len(deploys) == 1 or len(named) == 1:
            pairings.append(Pairing(caffemodel, deploys[0] if len(deploys) == 1 else named[0]))
        elif deploys:
            listed = ", ".join(p.name for p in deploys)
            problem = (
                f"ambiguous: {len(deploys)} deploy prototxts beside it ({listed}) and none named "
                f"{caffemodel.stem}{PROTOTXT_SUFFIX}; list the pair in a --manifest"
            )
            pairings.append(Pairing(caffemodel, None, problem))
        else:
            skipped = [p.name for p, c in kinds.items() if c.kind is not Kind.DEPLOY]
            also = f" (not deploy nets: {', '.join(skipped)})" if skipped else ""
            problem = (
                f"no deploy prototxt: none named {caffemodel.stem}{PROTOTXT_SUFFIX} and no deploy-looking "
                f"prototxt in {caffemodel.parent}{also}"
            )
            pairings.append(Pairing(caffemodel, None, problem))
    used = {p.prototxt for p in pairings}
    notes += [f"unused deploy prototxt {p}: no caffemodel beside it" for p in deploys if p not in used]
    return pairings, notes


def own_outputs(prototxts: Sequence[Path], caffemodels: Sequence[Path]) -> tuple[set[Path], list[str]]:
    """The files of one folder that `merge-bn` wrote (`<stem>_merged.<suffix>` beside `<stem>.<suffix>`),
    and merged pairs (a `*_merged` caffemodel whose same-stem prototxt has no BatchNorm left), with
    a note for each: converting them again would only copy them."""
    names = {f.name for f in (*prototxts, *caffemodels)}
    own: set[Path] = set()
    notes = []
    for f in sorted((*prototxts, *caffemodels)):
        source = f.name[: -len(f.suffix) - len(MERGED_STEM)] + f.suffix
        if f.stem.endswith(MERGED_STEM) and source in names:
            own.add(f)
            notes.append(f"skipped {f}: output of an earlier merge of {source}")
    for caffemodel in sorted(set(caffemodels) - own):
        prototxt = caffemodel.with_suffix(PROTOTXT_SUFFIX)
        if caffemodel.stem.endswith(MERGED_STEM) and prototxt in prototxts and not _has_batchnorm(prototxt):
            own |= {caffemodel, prototxt}
            notes.append(f"skipped {caffemodel}: already merged (no BatchNorm in {prototxt.name})")
    return own, notes


def _has_batchnorm(prototxt: Path) -> bool:
    try:
        text = _COMMENT.sub("", prototxt.read_text(errors="replace"))
    except OSError:
        return True  # unreadable: left to pairing, which reports it
    return bool({"BatchNorm", "BN", "BATCHNORM"} & set(_TYPE.findall(text)))


@dataclass
class Discovery:
    """What `discover` found under one SRC folder."""

    root: Path
    pairings: list[Pairing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: set[Path] = field(default_factory=set)  # every file seen (resolved): never to be written over


def discover(root: Path, ignore: Iterable[Path] = ()) -> Discovery:
    """Walk `root` (recursively, not following folder links, skipping the folders in `ignore`, e.g.
    OUTDIR) and pair the caffemodels of each folder with `pair_folder`."""
    root = Path(root)
    ignored = {Path(p).resolve() for p in ignore}
    found = Discovery(root)
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(d for d in subfolders if (here / d).resolve() not in ignored)
        files = [here / name for name in sorted(names)]
        found.files.update(f.resolve() for f in files)
        prototxts = [f for f in files if f.suffix.lower() == PROTOTXT_SUFFIX and f.is_file()]
        caffemodels = [f for f in files if f.suffix.lower() == CAFFEMODEL_SUFFIX and f.is_file()]
        if not prototxts and not caffemodels:
            continue
        pairings, notes = pair_folder(prototxts, caffemodels)
        found.pairings += pairings
        found.notes += notes
    return found


@dataclass(frozen=True)
class ManifestEntry:
    """One row of a manifest: paths resolved against the manifest's folder; `out` as written."""

    prototxt: Path
    caffemodel: Path
    out: str | None = None


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Read a CSV (header `prototxt,caffemodel[,out]`) or JSON (a list of objects with those keys)
    manifest. Relative paths are relative to the manifest's folder. Raises UsageError."""
    path = Path(path)
    try:
        text = read_regular(path, "--manifest").decode()
    except InputError as err:
        raise UsageError(str(err)) from None
    rows = _json_rows(path, text) if path.suffix.lower() == ".json" else _csv_rows(path, text)
    base = path.parent
    entries = []
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("prototxt", "caffemodel") if not row.get(key)]
        if missing:
            raise UsageError(f"{path}: entry {number} has no {' or '.join(missing)}")
        out = row.get("out") or None
        entries.append(ManifestEntry(base / row["prototxt"], base / row["caffemodel"], out))
    if not entries:
        raise UsageError(f"{path}: the manifest lists no deployment")
    return entries


def _csv_rows(path: Path, text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(line for line in text.splitlines() if line.strip())
    header = [name.strip() for name in reader.fieldnames or []]
    if "prototxt" not in header or "caffemodel" not in header or set(header) - {"prototxt", "caffemodel", "out"}:
        raise UsageError(f"{path}: the CSV header must be prototxt,caffemodel[,out], not {','.join(header)}")
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _json_rows(path: Path, text: str) -> list[dict[str, str]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UsageError(f"{path}: a JSON manifest is a list of {{prototxt, caffemodel[, out]}} objects")
    for number, row in enumerate(rows, start=1):
        extra = set(row) - {"prototxt", "caffemodel", "out"}
        wrong = [k for k, v in row.items() if v is not None and not isinstance(v, str)]
        if extra or wrong:
            raise UsageError(
                f"{path}: entry {number} has unknown keys or non-string values: {sorted(extra | set(wrong))}"
            )
    return rows
