"""The work list of a batch run: every deployment with its outputs and key, sorted; output checks; shards."""

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import UsageError
from ..io.files import RealPaths
from ..io.outputs import file_key
from .discovery import CAFFEMODEL_SUFFIX, PROTOTXT_SUFFIX, Discovery, ManifestEntry, pair, read_manifest, walk


@dataclass(frozen=True)
class WorkItem:
    """One deployment to convert: inputs, outputs and its key (output path relative to OUTDIR,
    without suffix, POSIX). An item with a `problem` is reported as failed and never run."""

    key: str
    prototxt: Path | None
    caffemodel: Path
    out_prototxt: Path
    out_caffemodel: Path
    problem: str | None = None
    net: bytes | None = None  # the prototxt's `io.files.net_digest`, when discovery read it whole


def _item(key: PurePosixPath, outdir: Path, prototxt: Path | None, caffemodel: Path, problem: str | None) -> WorkItem:
    out = outdir.joinpath(*key.parts)
    return WorkItem(
        key.as_posix(),
        prototxt,
        caffemodel,
        out.with_name(out.name + PROTOTXT_SUFFIX),
        out.with_name(out.name + CAFFEMODEL_SUFFIX),
        problem,
    )


def source_prefixes(roots: Sequence[Path]) -> list[str]:
    """The output prefix of each SRC root: none for a single root, else the folder's name, made
    unique with -2, -3... in argument order."""
    if len(roots) == 1:
        return [""]
    prefixes: list[str] = []
    for root in roots:
        name = Path(root).resolve().name or "root"
        candidate, n = name, 1
        while candidate in prefixes:
            n += 1
            candidate = f"{name}-{n}"
        prefixes.append(candidate)
    return prefixes


def plan_discovered(discoveries: Sequence[Discovery], outdir: Path, real: RealPaths | None = None) -> list[WorkItem]:
    """Work items for every caffemodel `walk` listed, mirroring each SRC tree under OUTDIR (prefixed
    by the SRC folder's name when there are several): `<folder>/<caffemodel stem>.{prototxt,caffemodel}`.
    A caffemodel found under several roots is kept once (first root). Sorted by key. Keys depend on
    paths alone: no prototxt is paired yet (`with_pairings` does that for the items kept)."""
    items, seen, real = [], set(), real or RealPaths()
    for found, prefix in zip(discoveries, source_prefixes([d.root for d in discoveries]), strict=True):
        for caffemodel in found.caffemodels:
            resolved = real.resolve(caffemodel)
            if resolved in seen:
                continue
            seen.add(resolved)
            relative = caffemodel.relative_to(found.root).with_suffix("")
            key = PurePosixPath(prefix, *relative.parts) if prefix else PurePosixPath(*relative.parts)
            items.append(_item(key, outdir, None, caffemodel, None))
    return sorted(items, key=lambda item: item.key)


def with_pairings(items: Sequence[WorkItem], discoveries: Sequence[Discovery]) -> list[WorkItem]:
    """`items` (of `plan_discovered`) with their deploy prototxts: only the folders holding one of
    them are paired (their prototxts read), and only their notes kept. Items that pairing leaves
    out (our own earlier outputs, already-merged pairs: each with a note) are dropped."""
    wanted = {item.caffemodel for item in items}
    pairings = {p.caffemodel: p for found in discoveries for p in pair(found, only=wanted).pairings}
    found = [(item, pairings[item.caffemodel]) for item in items if item.caffemodel in pairings]
    return [dataclasses.replace(item, prototxt=p.prototxt, problem=p.problem, net=p.net) for item, p in found]


def plan_manifest(entries: Sequence[ManifestEntry], manifest: Path, outdir: Path) -> list[WorkItem]:
    """Work items for manifest entries. The key is `out` (a path relative to OUTDIR, a .prototxt or
    .caffemodel suffix dropped), else the caffemodel's path relative to the manifest's folder
    without suffix, else (caffemodel outside that folder) its stem. Sorted by key."""
    base = Path(manifest).parent.resolve()
    items = []
    for entry in entries:
        if entry.out:
            key = PurePosixPath(entry.out.replace("\\", "/"))
            if key.suffix.lower() in (PROTOTXT_SUFFIX, CAFFEMODEL_SUFFIX):
                key = key.with_suffix("")
            if key.is_absolute() or ".." in key.parts or not key.name:
                raise UsageError(f"{manifest}: out '{entry.out}' must be a relative path inside OUTDIR")
        else:
            try:
                key = PurePosixPath(*entry.caffemodel.resolve().relative_to(base).with_suffix("").parts)
            except ValueError:
                key = PurePosixPath(entry.caffemodel.stem)
        items.append(_item(key, outdir, entry.prototxt, entry.caffemodel, None))
    return sorted(items, key=lambda item: item.key)


def check_outputs(
    items: Sequence[WorkItem], protected: Iterable[Path] = (), real: RealPaths | None = None
) -> set[tuple[object, ...]]:
    """Refuse (UsageError) two items writing the same file, and any output that is an input of
    an item or one of the `protected` source files (the same file by device and inode when it
    exists: hard links and bind mounts too), or that exists and is not a regular file; return the
    `file_key`s of those sources and of the outputs: what no other file of the run may be."""
    real = real or RealPaths()
    sources = {file_key(p, real) for p in protected}
    for item in items:
        sources.update(file_key(p, real) for p in (item.prototxt, item.caffemodel) if p is not None)
    writers: dict[tuple[object, ...], str] = {}
    for item in items:
        for out in (item.out_prototxt, item.out_caffemodel):
            key = file_key(out, real)
            if key in sources:
                raise UsageError(f"{out}: would overwrite a source file; choose an OUTDIR outside the sources")
            if key in writers:
                raise UsageError(f"{out}: written by both '{writers[key]}' and '{item.key}'; give distinct out names")
            if key[0] == "file" and not out.is_file():
                raise UsageError(f"{out}: exists and is not a regular file; refusing to replace it, even with --force")
            writers[key] = item.key
    return sources | writers.keys()


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` with 1 <= i <= n, as (i, n); raises ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"shard '{text}' is not of the form i/n (e.g. 2/8)")
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count:
        raise ValueError(f"shard '{text}': need 1 <= i <= n")
    return index, count


SHARD_COUNT_VARIABLE = "MERGE_BN_SHARD_COUNT"  # the shard count of a Kubernetes Indexed Job, if not --shard-count


def auto_shard(env: Mapping[str, str], count: int | None = None) -> tuple[int, int]:
    """(i, n) of this task of a job array, from the scheduler's environment: Slurm's
    SLURM_ARRAY_TASK_ID / _MIN / _STEP / _COUNT, else a Kubernetes Indexed Job's JOB_COMPLETION_INDEX
    (from 0) with `count` (--shard-count) or MERGE_BN_SHARD_COUNT. Raises UsageError."""
    if "SLURM_ARRAY_TASK_ID" in env:
        task, first = _whole(env, "SLURM_ARRAY_TASK_ID"), _whole(env, "SLURM_ARRAY_TASK_MIN")
        step = _whole(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        tasks = _whole(env, "SLURM_ARRAY_TASK_COUNT")
        if count is not None and count != tasks:
            raise UsageError(f"--shard-count {count} but the Slurm array has {tasks} tasks")
        position, off_step = divmod(task - first, max(step, 1))
        if off_step or not 0 <= position < tasks:
            raise UsageError(
                f"Slurm array task {task} is not one of {tasks} evenly spaced tasks from {first} (step {step}); "
                "use an array like --array=0-N-1, or --shard i/n"
            )
        return position + 1, tasks
    if "JOB_COMPLETION_INDEX" in env:
        index = _whole(env, "JOB_COMPLETION_INDEX")
        if count is None and SHARD_COUNT_VARIABLE in env:
            count = _whole(env, SHARD_COUNT_VARIABLE)
        if count is None:
            raise UsageError(
                f"--shard auto in a Kubernetes Indexed Job needs the job's completions as --shard-count "
                f"or {SHARD_COUNT_VARIABLE}"
            )
        if not 0 <= index < count:
            raise UsageError(f"JOB_COMPLETION_INDEX {index} is not below the shard count {count}")
        return index + 1, count
    raise UsageError("--shard auto: neither SLURM_ARRAY_TASK_ID (Slurm) nor JOB_COMPLETION_INDEX (Kubernetes) is set")


def _whole(env: Mapping[str, str], name: str) -> int:
    """The whole number in env[name]; UsageError when unset or not a number."""
    if name not in env:
        raise UsageError(f"--shard auto: {name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"--shard auto: {name}={env[name]!r} is not a whole number") from None


def shard(items: Sequence[WorkItem], index: int, count: int) -> list[WorkItem]:
    """Shard `index` of `count` (1-based) of the sorted work list: positions p with p % count == index - 1."""
    return [item for position, item in enumerate(items) if position % count == index - 1]


def is_up_to_date(item: WorkItem) -> bool:
    """Both outputs exist and are newer than both inputs (outputs are written by renaming a complete
    temporary file, so an existing output is complete)."""
    try:
        inputs = max(p.stat().st_mtime_ns for p in (item.prototxt, item.caffemodel) if p is not None)
        outputs = min(p.stat().st_mtime_ns for p in (item.out_prototxt, item.out_caffemodel))
    except (OSError, ValueError):
        return False
    return item.prototxt is not None and outputs > inputs


@dataclass
class WorkList:
    """The sorted work list (of one shard) and the notes made while building it."""

    items: list[WorkItem]  # this shard's (all when not sharded)
    notes: list[str]
    unread: list[str] = field(default_factory=list)  # folders and inputs discovery could not read
    total: int = 0  # items in the whole work list, of all shards
    taken: set[tuple[object, ...]] = field(default_factory=set)  # `check_outputs`: sources and outputs, of all shards


def build_work_list(
    sources: Sequence[Path], outdir: Path, manifest: Path | None = None, part: tuple[int, int] | None = None
) -> WorkList:
    """Discover (or read the manifest), plan outputs and check them for the whole fleet; keep shard
    `part` (i, n) of it, if given, pairing only its caffemodels with their prototxts. Raises UsageError."""
    outdir, real = Path(outdir), RealPaths()  # one for every path of the work list: each folder resolved once
    try:
        resolved_out = outdir.resolve()
    except RuntimeError:  # pathlib's "Symlink loop"
        raise UsageError(f"{outdir}: OUTDIR cannot be reached (a symlink loop); choose another --out") from None
    if manifest is not None:
        if sources:
            raise UsageError("give SRC folders or --manifest, not both")
        every = plan_manifest(read_manifest(manifest), manifest, outdir)
        taken = check_outputs(every, {Path(manifest).resolve()} | _inputs(every, real), real)
        return WorkList(shard(every, *part) if part else every, [], total=len(every), taken=taken)
    if not sources:
        raise UsageError("no SRC folder given (or --manifest)")
    for source in sources:
        if not Path(source).is_dir():
            raise UsageError(f"{source}: not a folder")
        if Path(source).resolve() == resolved_out:
            raise UsageError(f"{source}: OUTDIR is a source folder; choose another --out")
    roots = list(dict.fromkeys(Path(s) for s in sources))
    discoveries = [walk(root, [outdir], real) for root in roots]
    every = plan_discovered(discoveries, outdir, real)
    unread = [line for d in discoveries for line in d.unread]
    if not every:
        also = f" ({len(unread)} not read, e.g. {unread[0]})" if unread else ""
        raise UsageError(f"found no caffemodel under {', '.join(map(str, roots))}{also}")
    taken = check_outputs(every, set().union(*(d.files for d in discoveries)), real)
    items = with_pairings(shard(every, *part) if part else every, discoveries)
    notes = [note for d in discoveries for note in d.notes]
    return WorkList(items, notes, unread, len(every), taken)


def _inputs(items: Iterable[WorkItem], real: RealPaths) -> set[Path]:
    return {real.resolve(p) for item in items for p in (item.prototxt, item.caffemodel) if p is not None}
