"""Finding deployments for `merge-bn batch`: which prototxt is a deploy net (by content), which
caffemodels go with it, and explicit CSV / JSON manifests instead of discovery."""

import csv
import json
import os
import re
import stat
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from ..errors import InputError, UsageError
from ..io.files import RealPaths, net_digest, open_regular

PROTOTXT_SUFFIX, CAFFEMODEL_SUFFIX = ".prototxt", ".caffemodel"

DATA_TYPES = frozenset(
    {"Data", "ImageData", "AnnotatedData", "HDF5Data", "WindowData", "VideoData"}
    | {"DATA", "IMAGE_DATA", "HDF5_DATA", "WINDOW_DATA"}  # V1 (`layers { type: DATA }`) spellings
)
EVALUATION_TYPES = frozenset({"Accuracy", "DetectionEvaluate", "ACCURACY"})
TELLING_TYPES = DATA_TYPES | EVALUATION_TYPES | {"Input", "INPUT"}  # layer types classification looks at
SOLVER_FIELDS = ("base_lr", "net", "train_net", "test_net", "lr_policy")
MAX_CLASSIFIED_BYTES = 16 << 20  # prototxts larger than this are not read by discovery
MERGED_STEM = "_merged"  # what `merge-bn` adds to the stems of the inputs for its default outputs
MAX_MANIFEST_BYTES = 256 << 20  # about a million deployments

# Patterns start with a literal (no \\b or ^), which `re` finds fast; `_fields` checks what precedes.
_COMMENT = re.compile(r"#[^\n]*")
_TYPE = re.compile(r"type\s*:\s*\"?([A-Za-z0-9_]+)")
_SOLVER = re.compile(r"(?:base_lr|lr_policy|net)\s*:")  # each of SOLVER_FIELDS ends with one of these
_TRAIN_PHASE = re.compile(r"include\s*\{[^}]*\bphase\s*:\s*TRAIN\b")
_INPUT = re.compile(r"(?:input|input_shape|input_dim)\s*[:{]")
_WORD_CHARS = frozenset("_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


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
    digest: bytes | None = None  # of the bytes classified (the whole file): which net it is


def classify_text(text: str) -> Classification:
    """Classify prototxt text: a solver has `base_lr` / `net:` / `train_net:` fields; a train/test
    net has data, loss or evaluation layers, or layers included in phase TRAIN; a deploy net
    declares its input (Input layer, `input`, `input_shape`, `input_dim`) and has none of those."""
    text = _COMMENT.sub("", text)
    solver = _solver_field(text)
    if solver:
        return Classification(Kind.SOLVER, f"solver ({solver}: field)")
    telling = {t for t in set(_TYPE.findall(text)) if t in TELLING_TYPES or t.endswith(("Loss", "_LOSS"))}
    types = {m.group(1) for m in _TYPE.finditer(text) if m.group(1) in telling and _starts_word(text, m.start())}
    for found, what in (
        (sorted(types & DATA_TYPES), "data layer"),
        (sorted(t for t in types if t.endswith(("Loss", "_LOSS"))), "loss layer"),
        (sorted(types & EVALUATION_TYPES), "evaluation layer"),
    ):
        if found:
            return Classification(Kind.TRAIN_TEST, f"train/test net ({what} {found[0]})")
    if any(_starts_word(text, m.start()) for m in _TRAIN_PHASE.finditer(text)):
        return Classification(Kind.TRAIN_TEST, "train/test net (include { phase: TRAIN })")
    if "Input" in types or "INPUT" in types or any(_starts_line(text, m.start()) for m in _INPUT.finditer(text)):
        return Classification(Kind.DEPLOY, "deploy net (declares its input)")
    return Classification(Kind.UNKNOWN, "no input declared and no data layer")


def _solver_field(text: str) -> str | None:
    """The first of SOLVER_FIELDS found first on its line, if any."""
    for match in _SOLVER.finditer(text):
        start = match.start()
        while start and text[start - 1] in _WORD_CHARS:
            start -= 1
        name = text[start : match.end()].split(":")[0].strip()
        if name in SOLVER_FIELDS and _starts_line(text, start):
            return name
    return None


def _starts_word(text: str, start: int) -> bool:
    return start == 0 or text[start - 1] not in _WORD_CHARS


def _starts_line(text: str, start: int) -> bool:
    return not text[text.rfind("\n", 0, start) + 1 : start].strip()


def classify_prototxt(path: Path) -> Classification:
    """`classify_text` of the file; a file that cannot be read, or is larger than
    MAX_CLASSIFIED_BYTES (not read at all), is UNKNOWN."""
    try:
        head = _read_head(path)
    except OSError as err:
        return Classification(Kind.UNKNOWN, f"cannot read ({err.strerror})")
    if head is None:
        return Classification(Kind.UNKNOWN, "not a regular file")
    if len(head) > MAX_CLASSIFIED_BYTES:
        return Classification(
            Kind.UNKNOWN,
            f"larger than {MAX_CLASSIFIED_BYTES >> 20} MiB, not read (deploy prototxts are far smaller); "
            "list it in a --manifest if it is one",
        )
    return _classify_bytes(head)


_CLASSIFIED: dict[bytes, "Classification"] = {}  # by the hash of the bytes: fleets repeat a few nets
_CLASSIFIED_KEPT = 4096


def _classify_bytes(head: bytes) -> Classification:
    """`classify_text` of the bytes, once per distinct content."""
    key = net_digest(head)
    found = _CLASSIFIED.get(key)
    if found is None:
        found = replace(classify_text(head.decode("utf-8", errors="replace")), digest=key)
        if len(_CLASSIFIED) < _CLASSIFIED_KEPT:
            _CLASSIFIED[key] = found
    return found


def _read_head(path: Path) -> bytes | None:
    """Up to MAX_CLASSIFIED_BYTES + 1 bytes of the regular file `path` (None when it is not one:
    a FIFO is never waited on); raises OSError."""
    try:
        fd = open_regular(path, "prototxt")
    except InputError:
        return None
    with open(fd, "rb") as handle:  # asking for no more than the file holds: a read allocates what it asks
        size = os.fstat(fd).st_size
        head = handle.read(min(size, MAX_CLASSIFIED_BYTES) + 1)
        if size < len(head) <= MAX_CLASSIFIED_BYTES:  # it grew since
            head += handle.read(MAX_CLASSIFIED_BYTES + 1 - len(head))
        return head


@dataclass(frozen=True)
class Pairing:
    """A caffemodel and the deploy prototxt found for it; `problem` says why there is none."""

    caffemodel: Path
    prototxt: Path | None
    problem: str | None = None
    net: bytes | None = None  # the prototxt's `net_digest`, when it was read whole


def pair_folder(prototxts: Sequence[Path], caffemodels: Sequence[Path]) -> tuple[list[Pairing], list[str]]:
    """Pair each caffemodel of one folder with a prototxt of the same folder: the one of the same
    stem unless it is a train/test net or a solver; else the only deploy-looking one; among several,
    the only one named like `*deploy*`. Anything else is a Pairing with a problem, never a guess.
    Also returns notes: the train/test/solver prototxts skipped, deploy prototxts left unused."""
    own, notes = own_outputs(prototxts, caffemodels)
    prototxts, caffemodels = [p for p in prototxts if p not in own], [c for c in caffemodels if c not in own]
    kinds = {p: classify_prototxt(p) for p in sorted(prototxts)}
    notes += [f"skipped {p}: {c.why}" for p, c in kinds.items() if c.kind is not Kind.DEPLOY]
    by_stem = {p.stem: p for p in kinds}
    deploys = [p for p, c in kinds.items() if c.kind is Kind.DEPLOY]
    pairings = []
    for caffemodel in sorted(caffemodels):
        same = by_stem.get(caffemodel.stem)
        if same is not None and kinds[same].kind not in (Kind.SOLVER, Kind.TRAIN_TEST):
            pairings.append(Pairing(caffemodel, same, net=kinds[same].digest))
            continue
        named = [p for p in deploys if "deploy" in p.name.lower()]
        if len(deploys) == 1 or len(named) == 1:
            deploy = deploys[0] if len(deploys) == 1 else named[0]
            pairings.append(Pairing(caffemodel, deploy, net=kinds[deploy].digest))
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


@dataclass
class Discovery:
    """What `walk` listed under one SRC folder (no file read), and what `pair` made of it."""

    root: Path
    folders: dict[Path, tuple[list[Path], list[Path]]] = field(default_factory=dict)  # prototxts, caffemodels
    pairings: list[Pairing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: set[Path] = field(default_factory=set)  # every file seen (resolved): never to be written over
    unread: list[str] = field(default_factory=list)  # "<path>: <why>" of folders and inputs not read

    @property
    def caffemodels(self) -> list[Path]:
        return [caffemodel for _, caffemodels in self.folders.values() for caffemodel in caffemodels]


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
    """Whether the prototxt names a BatchNorm-like layer type (when it cannot be read: True, so
    that pairing reports it)."""
    try:
        head = _read_head(prototxt)
    except OSError:
        return True
    if head is None or len(head) > MAX_CLASSIFIED_BYTES:
        return True
    text = _COMMENT.sub("", head.decode("utf-8", errors="replace"))
    return bool({"BatchNorm", "BN", "BATCHNORM"} & set(_TYPE.findall(text)))


def discover(root: Path, ignore: Iterable[Path] = ()) -> Discovery:
    """`walk` `root`, then `pair` every folder."""
    return pair(walk(root, ignore))


def walk(root: Path, ignore: Iterable[Path] = (), real: RealPaths | None = None) -> Discovery:
    """List `root` (recursively, not following folder links, skipping the folders in `ignore`,
    e.g. OUTDIR): the prototxts and caffemodels of each folder, reading no file. Never raises on
    what it finds: a folder it cannot list, and a .prototxt / .caffemodel it cannot reach (symlink
    loop, broken link), go to `unread`; one that is not a regular file (a FIFO...) to `notes`."""
    root = Path(root)
    real = real or RealPaths()
    ignored = {_resolved(Path(p), real) for p in ignore} - {None}
    found = Discovery(root)

    def folder_error(err: OSError) -> None:
        found.unread.append(f"{err.filename}: cannot read the folder ({err.strerror})")

    for folder, subfolders, names in os.walk(root, onerror=folder_error):
        here = Path(folder)
        subfolders[:] = sorted(d for d in subfolders if _resolved(here / d, real) not in ignored)
        inputs: dict[str, list[Path]] = {PROTOTXT_SUFFIX: [], CAFFEMODEL_SUFFIX: []}
        for name in sorted(names):
            path = here / name
            resolved = _resolved(path, real)
            if resolved is not None:
                found.files.add(resolved)
            if path.suffix.lower() in inputs:
                usable = _input_file(path, resolved, found)
                inputs[path.suffix.lower()] += [path] if usable else []
        if inputs[PROTOTXT_SUFFIX] or inputs[CAFFEMODEL_SUFFIX]:
            found.folders[here] = (inputs[PROTOTXT_SUFFIX], inputs[CAFFEMODEL_SUFFIX])
    return found


def pair(found: Discovery, only: Container[Path] | None = None) -> Discovery:
    """Pair the caffemodels of each folder of `found` with `pair_folder` (reading its prototxts),
    or only of the folders holding a caffemodel in `only`; the pairings and notes go into `found`."""
    for prototxts, caffemodels in found.folders.values():
        if only is None or any(caffemodel in only for caffemodel in caffemodels):
            pairings, notes = pair_folder(prototxts, caffemodels)
            found.pairings += pairings
            found.notes += notes
    return found


def _resolved(path: Path, real: RealPaths) -> Path | None:
    """`path` resolved, or None when it cannot be (a symlink loop)."""
    try:
        return real.resolve(path)
    except (OSError, RuntimeError):  # RuntimeError: pathlib's "Symlink loop"
        return None


def _input_file(path: Path, resolved: Path | None, found: Discovery) -> bool:
    """Whether `path` (named like an input) is a regular file; otherwise say why in `found`."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        why = "symlink loop" if resolved is None else "broken link" if path.is_symlink() else err.strerror
        found.unread.append(f"{path}: cannot read ({why})")
        return False
    if not stat.S_ISREG(mode):
        found.notes.append(f"skipped {path}: not a regular file")
        return False
    return True


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
    text = _manifest_text(path)
    try:
        rows = _json_rows(path, text) if path.suffix.lower() == ".json" else _csv_rows(path, text)
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply; a JSON manifest is a flat list of objects") from None
    base = path.parent
    entries = []
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("prototxt", "caffemodel") if not row.get(key)]
        if missing:
            raise UsageError(f"{path}: entry {number} has no {' or '.join(missing)}")
        if any("\0" in (row.get(key) or "") for key in ("prototxt", "caffemodel", "out")):
            raise UsageError(f"{path}: entry {number} has a NUL character in a path")
        out = row.get("out") or None
        entries.append(ManifestEntry(base / row["prototxt"], base / row["caffemodel"], out))
    if not entries:
        raise UsageError(f"{path}: the manifest lists no deployment")
    return entries


def _manifest_text(path: Path) -> str:
    """The manifest's text: a regular file of at most MAX_MANIFEST_BYTES of UTF-8 (a BOM allowed)
    without NUL bytes; anything else is a UsageError."""
    try:
        with open(open_regular(path, "--manifest"), "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except InputError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read the manifest ({err.strerror})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UsageError(f"{path}: the manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB; split it")
    nul = raw.find(0)
    if nul >= 0:
        raise UsageError(f"{path}: has a NUL byte at offset {nul}; a manifest is CSV or JSON text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start})") from None


def _csv_rows(path: Path, text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(line for line in text.splitlines() if line.strip())
    try:
        header = [name.strip() for name in reader.fieldnames or []]
        if "prototxt" not in header or "caffemodel" not in header or set(header) - {"prototxt", "caffemodel", "out"}:
            raise UsageError(f"{path}: the CSV header must be prototxt,caffemodel[,out], not {','.join(header)}")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as err:
        raise UsageError(f"{path}: not a readable CSV manifest (line {reader.line_num}: {err})") from None


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
