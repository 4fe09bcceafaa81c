"""Issue 9 benchmark: conversion time and peak memory against `cp` and a plain protobuf round trip.

Generates caffemodels (random weights, realistic statistics) for the ResNet-50/101/152 deploys of
../shared/real_nets/prototxt_only (`synth.save_weights_for`), a synthetic ~1 GB net (wide 3x3
convolutions, each followed by BatchNorm + Scale + ReLU, built with `synth.NetBuilder`) and
`vgg_head` (VGG-16's fc6-fc8 after one folded convolution: 504 MB, almost all untouched) into a
temporary folder, then measures, for each model, in the same run and interleaved:

  cp        `cp model.caffemodel copy.caffemodel` (a child process)
  protobuf  a child Python that reads the file, `NetParameter.FromString(data).SerializeToString()`
            and writes the result: what any protobuf-object-based converter pays at least
  floor     a child Python that imports numpy and our schema, parses the prototxt with protobuf's
            `text_format` and copies the caffemodel in the kernel as cp does: what any converter
            written in Python on numpy + protobuf's text format pays before it folds anything
  merge-bn  `python -m caffe_bn_merge --model ... --weights ... --output-model ... --output-weights ... -q`

Each figure is the child's wall time (process start to exit, as a user sees it) and its own peak RSS
(`os.wait4` on that child, so one child's peak never leaks into another's). Start-up is the wall time
of `python -m caffe_bn_merge --help` (next to `python -c pass`, the interpreter alone). The page cache
is not dropped (that needs root, and the machine is shared): every file is read once before timing,
so all figures are warm-cache figures.

    python bench/bench_speed.py [--models resnet50 resnet101 resnet152 synthetic1g vgg_head] [--runs 5]
                                [--json out.json] [--keep DIR] [--profile]
"""

# ruff: noqa: E402  (the repo goes on sys.path before the package is imported)

import argparse
import cProfile
import datetime
import io
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PROTOTXT_ONLY = SHARED / "real_nets" / "prototxt_only"
sys.path.insert(0, str(REPO))
sys.dont_write_bytecode = True  # leave no __pycache__ in the package (others work there)

import numpy as np
from rich.console import Console
from rich.table import Table

from caffe_bn_merge.synthetic.synth import NetBuilder, save_weights_for

MB = 1e6  # sizes and memory are in MB of 10^6 bytes
TARGET_TIME_RATIO = 4.0  # merge-bn wall time / cp wall time
TARGET_RSS_RATIO = 1.2  # merge-bn peak RSS / caffemodel size
TARGET_STARTUP_S = 0.3  # merge-bn --help wall time
SYNTH_WIDTH, SYNTH_KERNEL = 1024, 3  # each synthetic conv holds 1024*1024*3*3 float32 = 37.7 MB
REAL_MODELS = {
    "resnet50": "kaiminghe_ResNet-50-deploy.prototxt",
    "resnet101": "kaiminghe_ResNet-101-deploy.prototxt",
    "resnet152": "kaiminghe_ResNet-152-deploy.prototxt",
}
FOLDING_MODELS = [*REAL_MODELS, "synthetic1g"]  # every host folds: conversion time grows with size
ALL_MODELS = [*FOLDING_MODELS, "vgg_head"]
METHODS = ("cp", "protobuf", "floor", "merge")

PROTOBUF_CHILD = """
import sys, time
start = time.perf_counter()
from caffe_bn_merge.io.proto import NetParameter
with open(sys.argv[1], "rb") as f:
    data = f.read()
out = NetParameter.FromString(data).SerializeToString()
with open(sys.argv[2], "wb") as f:
    f.write(out)
print(time.perf_counter() - start)
"""

FLOOR_CHILD = """
import os, sys
import numpy
from google.protobuf import text_format
from caffe_bn_merge.io.proto import NetParameter
with open(sys.argv[1], encoding="utf-8") as f:
    text_format.Parse(f.read(), NetParameter())
with open(sys.argv[2], "rb") as src, open(sys.argv[3], "wb") as dst:
    left = os.fstat(src.fileno()).st_size
    while left:
        left -= os.copy_file_range(src.fileno(), dst.fileno(), left)
"""


@dataclass
class Sample:
    """One child process: wall time and its own peak resident set size."""

    wall_s: float
    peak_rss: int  # bytes


@dataclass
class ModelFigures:
    name: str
    prototxt: str
    size: int  # caffemodel bytes
    layers: int
    generated_s: float | None  # None: reused from --keep
    written_s: float | None  # synthetic only: time spent in our writer (NetBuilder.save)
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {m: [] for m in METHODS})

    def wall(self, method: str) -> float:
        return statistics.median(s.wall_s for s in self.samples[method])

    def rss(self, method: str) -> float:
        return statistics.median(s.peak_rss for s in self.samples[method])

    @property
    def mb(self) -> float:
        return self.size / MB


LAUNCHER = """
import json, os, subprocess, sys, tempfile, time
for line in sys.stdin:
    cmd = json.loads(line)
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-2000:].decode("utf-8", "replace")
    print(json.dumps({"wall_s": wall, "maxrss_kib": usage.ru_maxrss, "code": code, "stderr": tail}), flush=True)
"""


class Launcher:
    """A small stdlib-only Python that starts every measured command, times it and reaps it with
    `os.wait4`, which gives that child's own rusage. Why not start them from here: Linux charges a
    child with the peak RSS of the process that started it (exec records the old address space's
    high-water mark in the child's ru_maxrss; vfork or fork alike), and this process grows to GBs
    generating the synthetic model, so every child would report that peak."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=cwd, text=True
        )

    def run(self, cmd: list[str]) -> Sample:
        """Run `cmd` to completion: its wall time and its own peak RSS."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the launcher process died")
        done = json.loads(line)
        if done["code"] != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {done['code']}: {done['stderr']}")
        return Sample(done["wall_s"], done["maxrss_kib"] * 1024)  # ru_maxrss is in KiB on Linux

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def child_env(work: Path) -> dict[str, str]:
    """The children import the package from the repo, with byte-code cached as an installed package
    has it: written by the untimed warm-up runs into `work` (so the repo gets no __pycache__), for
    numpy and protobuf too. PYTHONDONTWRITEBYTECODE is dropped: with it set, every child would
    compile every module it imports again (+0.1 s for our package alone, more for numpy)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def warm(path: Path) -> None:
    """Read a file once so that every timed run finds it in the page cache."""
    with path.open("rb", buffering=0) as handle:
        while handle.read(1 << 24):
            pass


# --- models ----------------------------------------------------------------------------------------


def synthetic_net(target_mb: float) -> NetBuilder:
    """Wide 3x3 convolutions (no bias) + BatchNorm + Scale + ReLU, enough of them for `target_mb`."""
    per_conv = SYNTH_WIDTH * SYNTH_WIDTH * SYNTH_KERNEL**2 * 4
    builder = NetBuilder("synthetic_wide", (1, SYNTH_WIDTH, 14, 14), seed=0)
    top = "data"
    for i in range(math.ceil(target_mb * MB / per_conv)):
        top = builder.conv(top, SYNTH_WIDTH, SYNTH_KERNEL, bias=False, name=f"conv{i}")
        builder.bn(top, name=f"bn{i}")
        builder.scale(top, name=f"scale{i}")
        builder.relu(top)
    return builder


def vgg_head_net() -> NetBuilder:
    """VGG-16's classifier (fc6-fc8, 504 MB, no BatchNorm) after one folded 3x3 convolution: a
    model whose bytes are almost all untouched (copied file to file, never read into memory)."""
    builder = NetBuilder("vgg_head", (1, 512, 7, 7), seed=0)
    top = builder.conv("data", 512, 3, name="conv5_3")
    builder.scale(builder.bn(top, name="bn5_3"), name="scale5_3")
    top = builder.relu(top)
    for name, width in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        top = builder.ip(top, width, name=name)
    return builder


SYNTHETIC = {"synthetic1g": synthetic_net, "vgg_head": lambda target_mb: vgg_head_net()}
Prepared = tuple[Path, Path, float | None, float | None]  # prototxt, caffemodel, generation s, writing s


def prepare(name: str, folder: Path, synthetic_mb: float, console: Console) -> Prepared:
    """(prototxt, caffemodel, generation s, of which writing s) of `name`, made in `folder` unless there."""
    if name in REAL_MODELS:
        prototxt, caffemodel = PROTOTXT_ONLY / REAL_MODELS[name], folder / f"{name}.caffemodel"
    else:
        prototxt, caffemodel = folder / f"{name}.prototxt", folder / f"{name}.caffemodel"
    if caffemodel.is_file() and prototxt.is_file():
        console.print(f"{name}: reusing {caffemodel}")
        return prototxt, caffemodel, None, None
    with console.status(f"{name}: generating weights"):
        start = time.perf_counter()
        written = None
        if name in REAL_MODELS:
            save_weights_for(prototxt, caffemodel, seed=0)
        else:
            builder = SYNTHETIC[name](synthetic_mb)
            write_start = time.perf_counter()
            builder.save(prototxt, caffemodel)
            written = time.perf_counter() - write_start
            del builder
        generated = time.perf_counter() - start
    console.print(
        f"{name}: generated {caffemodel.stat().st_size / MB:.0f} MB in {generated:.1f} s"
        + (f" (of which {written:.1f} s writing it with emit.write_new_weights)" if written is not None else "")
    )
    return prototxt, caffemodel, generated, written


def layer_count(prototxt: Path) -> int:
    from caffe_bn_merge.io.read import read_net

    net = read_net(prototxt)
    return len(net.layer) or len(net.layers)


# --- measuring -------------------------------------------------------------------------------------


def commands(prototxt: Path, caffemodel: Path, out: Path) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "cp": ["cp", str(caffemodel), str(out / "copy.caffemodel")],
        "protobuf": [python, "-c", PROTOBUF_CHILD, str(caffemodel), str(out / "protobuf.caffemodel")],
        "floor": [python, "-c", FLOOR_CHILD, str(prototxt), str(caffemodel), str(out / "floor.caffemodel")],
        "merge": [
            python,
            "-m",
            "caffe_bn_merge",
            "--model",
            str(prototxt),
            "--weights",
            str(caffemodel),
            "--output-model",
            str(out / "merged.prototxt"),
            "--output-weights",
            str(out / "merged.caffemodel"),
            "-q",
        ],
    }


def clear(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def out_dir(work: Path) -> Path:
    """The (emptied) folder every command writes to; cleared after each run."""
    out = work / "out"
    out.mkdir(exist_ok=True)
    clear(out)
    return out


def measure_model(
    launcher: Launcher, figures: ModelFigures, prototxt: Path, caffemodel: Path, work: Path, runs: int
) -> None:
    """`runs` rounds of cp, protobuf, floor, merge-bn (interleaved, outputs deleted between runs)."""
    out = out_dir(work)
    warm(caffemodel)
    warm(prototxt)
    for _ in range(runs):
        for method, cmd in commands(prototxt, caffemodel, out).items():
            figures.samples[method].append(launcher.run(cmd))
            clear(out)


STARTUP = {  # label -> the command's arguments after the Python executable
    "merge-bn --help": ["-m", "caffe_bn_merge", "--help"],
    "python -c pass": ["-c", "pass"],
}
TINY = REPO / "sample_nets" / "no_bn"  # a net of a few KB: what a conversion costs besides the bytes


def measure_startup(launcher: Launcher, work: Path, runs: int) -> dict[str, list[float]]:
    """Wall times of --help, of the bare interpreter and of a conversion of a tiny net."""
    cmds = {label: [sys.executable, *argv] for label, argv in STARTUP.items()}
    out = out_dir(work)
    if TINY.with_suffix(".prototxt").is_file():
        tiny = commands(TINY.with_suffix(".prototxt"), TINY.with_suffix(".caffemodel"), out)["merge"]
        cmds["merge-bn on a tiny net"] = tiny
    for cmd in cmds.values():
        launcher.run(cmd)  # compile byte-code, load shared libraries
        clear(out)
    times: dict[str, list[float]] = {label: [] for label in cmds}
    for _ in range(runs):
        for label, cmd in cmds.items():
            times[label].append(launcher.run(cmd).wall_s)
            clear(out)
    return times


def profile(prototxt: Path, caffemodel: Path, work: Path, top: int) -> str:
    """cProfile of one in-process conversion: the `top` functions by cumulative time."""
    from caffe_bn_merge import merge

    out = out_dir(work)
    merge(prototxt, caffemodel, out / "warm.prototxt", out / "warm.caffemodel")  # imports, page cache
    clear(out)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(merge, prototxt, caffemodel, out / "merged.prototxt", out / "merged.caffemodel")
    wall = time.perf_counter() - start
    clear(out)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    return f"in-process merge() of {caffemodel.name}: {wall:.2f} s under cProfile\n{text.getvalue()}"


# --- output ----------------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[red]✗[/]"


def render(
    console: Console, models: list[ModelFigures], startup: dict[str, list[float]], runs: int, load_start: float
) -> None:
    table = Table(title=f"Issue 9: conversion vs cp and protobuf round trip (median of {runs} runs, warm cache)")
    for header in ("model", "size\nMB", "cp\ns", "protobuf\ns (peak MB)", "floor\ns (/cp)", "merge-bn\ns (peak MB)"):
        table.add_column(header, justify="left" if header == "model" else "right", no_wrap=header == "model")
    targets = f"merge/cp\n≤ {TARGET_TIME_RATIO:g}", f"RSS/size\n≤ {TARGET_RSS_RATIO:g}"
    for header in (*targets, "ms/MB\nmerge | protobuf"):
        table.add_column(header, justify="right")
    for m in models:
        time_ratio, rss_ratio = m.wall("merge") / m.wall("cp"), m.rss("merge") / m.size
        table.add_row(
            m.name,
            f"{m.mb:.0f}",
            f"{m.wall('cp'):.3f}",
            f"{m.wall('protobuf'):.2f} ({m.rss('protobuf') / MB:.0f})",
            f"{m.wall('floor'):.2f} ({m.wall('floor') / m.wall('cp'):.1f})",
            f"{m.wall('merge'):.2f} ({m.rss('merge') / MB:.0f})",
            f"{time_ratio:.1f} {mark(time_ratio <= TARGET_TIME_RATIO)}",
            f"{rss_ratio:.2f} {mark(rss_ratio <= TARGET_RSS_RATIO)}",
            f"{m.wall('merge') / m.mb * 1e3:.1f} | {m.wall('protobuf') / m.mb * 1e3:.1f}",
        )
    console.print(table)
    help_s, bare_s = (statistics.median(startup[k]) for k in STARTUP)
    tiny = startup.get("merge-bn on a tiny net")
    console.print(
        f"start-up: merge-bn --help {help_s:.3f} s {mark(help_s < TARGET_STARTUP_S)} (target < {TARGET_STARTUP_S} s; "
        f"python -c pass alone: {bare_s:.3f} s"
        + (f"; merge-bn on a {TINY.name} net of a few KB: {statistics.median(tiny):.3f} s" if tiny else "")
        + f"; median of {len(startup['python -c pass'])})"
    )
    folding = [m for m in models if m.name in FOLDING_MODELS]  # vgg_head is mostly copying: not on the line
    if len(folding) >= 2:
        sizes = np.array([m.mb for m in folding])
        for method, label in (("merge", "merge-bn"), ("protobuf", "protobuf")):
            walls = np.array([m.wall(method) for m in folding])
            slope, intercept = np.polyfit(sizes, walls, 1)
            worst = np.max(np.abs(walls - (intercept + slope * sizes)) / walls)
            console.print(
                f"{label} time ≈ {intercept:.2f} s + {slope * 1e3:.2f} ms/MB * size "
                f"(least squares over {len(folding)} models; largest deviation from the line {worst:.0%})"
            )
    console.print(
        "Wall times are whole child processes (Python start-up included for protobuf and merge-bn); peak RSS is "
        "each child's own (wait4). Page cache not dropped (shared machine, no root): each file was read once "
        "before timing. Machine: "
        f"{os.cpu_count()} CPUs, {machine()['memory_gb']} GB, shared with other work, so expect noise; "
        f"1-min load average at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f}."
    )


def machine() -> dict[str, object]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")
    return {
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def measure_all(
    launcher: Launcher, prepared: dict[str, Prepared], work: Path, runs: int, console: Console
) -> tuple[dict[str, list[float]], list[ModelFigures]]:
    """Start-up figures, then every model's runs."""
    with console.status("start-up"):
        startup = measure_startup(launcher, work, max(10, 2 * runs))
    first_prototxt, first_model = next(iter(prepared.values()))[:2]
    launcher.run(commands(first_prototxt, first_model, out_dir(work))["merge"])  # untimed warm-up
    models = []
    for name, (prototxt, caffemodel, generated, written) in prepared.items():
        figures = ModelFigures(
            name, str(prototxt), caffemodel.stat().st_size, layer_count(prototxt), generated, written
        )
        with console.status(f"{name}: {runs} runs of cp, protobuf, floor, merge-bn"):
            measure_model(launcher, figures, prototxt, caffemodel, work, runs)
        models.append(figures)
    return startup, models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=ALL_MODELS, help="subset to measure")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command per model (default 5)")
    parser.add_argument("--json", type=Path, help="save every number (every run included) to this file")
    parser.add_argument(
        "--keep",
        type=Path,
        help="generate the models here and keep them; files already there are reused (delete them to regenerate)",
    )
    parser.add_argument("--synthetic-mb", type=float, default=1000, help="size of the synthetic model (default 1000)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one in-process ResNet-152 conversion")
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)
    if args.runs < 5:
        console.print(f"[yellow]--runs {args.runs}: issue 9 asks for the median of at least 5[/]")
    wanted = [m for m in ALL_MODELS if m in args.models]
    if any(m in REAL_MODELS for m in wanted) and not PROTOTXT_ONLY.is_dir():
        parser.error(f"{PROTOTXT_ONLY} not found (the ResNet deploys are read from there)")
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as scratch:
        work = Path(scratch)
        launcher = Launcher(child_env(work), work)  # started while this process is still small
        try:
            folder = args.keep or work
            folder.mkdir(parents=True, exist_ok=True)
            prepared = {name: prepare(name, folder, args.synthetic_mb, console) for name in wanted}
            generation_s = time.perf_counter() - started
            startup, models = measure_all(launcher, prepared, work, args.runs, console)
        finally:
            launcher.close()
        measured_s = time.perf_counter() - started - generation_s
        profiled = None
        if args.profile:
            target = "resnet152" if "resnet152" in prepared else wanted[-1]
            with console.status(f"profiling {target}"):
                profiled = profile(*prepared[target][:2], work, 25)
    render(console, models, startup, args.runs, load_start)
    console.print(f"generation {generation_s:.0f} s, measurement {measured_s:.0f} s")
    if profiled:
        console.print(profiled, markup=False, highlight=False)
    if args.json:
        payload = {
            "benchmark": "bench_speed (issue 9)",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(),
            "load_average_1min_start": load_start,
            "runs": args.runs,
            "page_cache": "not dropped; each file read once before timing",
            "generation_s": generation_s,
            "measurement_s": measured_s,
            "startup_s": startup,
            "targets": {"time_ratio": TARGET_TIME_RATIO, "rss_ratio": TARGET_RSS_RATIO, "startup_s": TARGET_STARTUP_S},
            "models": [
                {
                    **asdict(m),
                    "size_mb": m.mb,
                    "median_wall_s": {k: m.wall(k) for k in METHODS},
                    "median_peak_rss_mb": {k: m.rss(k) / MB for k in METHODS},
                    "merge_over_cp": m.wall("merge") / m.wall("cp"),
                    "floor_over_cp": m.wall("floor") / m.wall("cp"),
                    "merge_rss_over_size": m.rss("merge") / m.size,
                    "protobuf_rss_over_size": m.rss("protobuf") / m.size,
                }
                for m in models
            ],
            "profile": profiled,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        console.print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
