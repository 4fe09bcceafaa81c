"""`merge-bn batch`: a fleet converts in parallel and verifies, failures are isolated and reported,
reruns skip finished work, discovery pairs files by the documented rules, manifests, sharding, and
sources are never written."""

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import ROOT

from caffe_bn_merge.batch import command, pool, worklist
from caffe_bn_merge.batch.discovery import Kind, classify_text, discover, pair_folder
from caffe_bn_merge.synthetic.fleet import make_fleet
from caffe_bn_merge.verification.compare import compare_models

FLEET_SIZE = 20
DEPLOY = 'name: "n"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
LEGACY_DEPLOY = (
    'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 8\ninput_dim: 8\nlayer { name: "c" type: "ReLU" }\n'
)
TRAIN = 'layer { name: "data" type: "Data" top: "data" }\nlayer { name: "loss" type: "SoftmaxWithLoss" }\n'
TEST = 'layer { name: "data" type: "ImageData" top: "data" }\nlayer { name: "acc" type: "Accuracy" }\n'
SOLVER = 'net: "train_val.prototxt"\nbase_lr: 0.01\nlr_policy: "step"\n'


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _report(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert report["schema"] == 1
    return report


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("fleet") / "src"
    return root, make_fleet(root, FLEET_SIZE, seed=1)


@pytest.fixture(scope="module")
def converted(fleet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, str]]:
    """The fleet converted once with --jobs 2 --verify: (OUTDIR, report, source digests before)."""
    root, _ = fleet
    before = _digests(root)
    out = tmp_path_factory.mktemp("converted") / "out"
    report = out.parent / "batch.json"
    code = command.main([str(root), "--out", str(out), "--jobs", "2", "--verify", "--report", str(report), "-q"])
    assert code == 1  # the broken deployment
    return out, _report(report), before


def test_fleet_converts_and_the_broken_one_is_reported(fleet, converted) -> None:
    root, deployments = fleet
    out, report, _ = converted
    pairs = [pair for d in deployments for pair in d.pairs]
    assert len(deployments) >= 20 and report["counts"]["total"] == len(pairs)
    broken = [d.broken for d in deployments if d.broken]
    assert len(broken) == 1
    by_caffemodel = {Path(d["caffemodel"]): d for d in report["deployments"]}
    failed = by_caffemodel[broken[0]]
    assert failed["status"] == "failed"
    assert "is the caffemodel from this net?" in failed["reason"], failed["reason"]
    assert report["counts"] == {"converted": len(pairs) - 1, "skipped": 0, "failed": 1, "total": len(pairs)}
    for prototxt, caffemodel in pairs:
        row = by_caffemodel[caffemodel]
        assert Path(row["prototxt"]) == prototxt
        relative = caffemodel.relative_to(root).with_suffix("")
        assert row["outputs"] == [str(out / relative) + ".prototxt", str(out / relative) + ".caffemodel"]
        if caffemodel == broken[0]:
            assert not any(Path(p).exists() for p in row["outputs"])
            continue
        assert row["status"] == "converted" and row["reason"] is None
        assert row["layers_after"] < row["layers_before"] and row["folds"]["forward"] > 0
        assert row["max_verify_error"] <= 1e-4 and row["seconds"] > 0
    notes = "\n".join(report["notes"])
    for deployment in deployments:
        for extra in deployment.extras:
            assert f"skipped {extra}" in notes


def test_a_truncated_caffemodel_is_reported(tmp_path) -> None:
    (deployment,) = make_fleet(tmp_path / "src", 1, seed=2, broken="truncated")
    report = tmp_path / "r.json"
    assert command.main([str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--report", str(report), "-q"]) == 1
    rows = {Path(d["caffemodel"]): d for d in _report(report)["deployments"]}
    assert rows[deployment.broken]["status"] == "failed"
    assert "not a readable caffemodel" in rows[deployment.broken]["reason"]
    assert [r["status"] for c, r in rows.items() if c != deployment.broken] == ["converted"] * (len(rows) - 1)


def test_every_output_verifies(fleet, converted) -> None:
    _, report, _ = converted
    for row in report["deployments"]:
        if row["status"] == "converted":
            errors = compare_models((Path(row["prototxt"]), Path(row["caffemodel"])), tuple(map(Path, row["outputs"])))
            assert max(e.relative for e in errors if e.gating) <= 1e-4, row["outputs"][1]


def test_rerun_with_skip_existing_does_no_work(fleet, converted) -> None:
    root, _ = fleet
    out, first, before = converted
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    report = out.parent / "again.json"
    code = command.main([str(root), "--out", str(out), "--jobs", "2", "--skip-existing", "--report", str(report), "-q"])
    again = _report(report)
    assert code == 1  # the broken one is retried, and fails again
    assert again["counts"]["converted"] == 0
    assert again["counts"]["skipped"] == first["counts"]["converted"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    assert _digests(root) == before  # sources untouched by both runs


def test_sharding_partitions_the_work_list(fleet, tmp_path) -> None:
    root, _ = fleet
    every = [item.key for item in worklist.build_work_list([root], tmp_path / "out").items]
    assert every == sorted(every)
    shards = [
        [item.key for item in worklist.shard(worklist.build_work_list([root], tmp_path).items, i, 3)] for i in (1, 2, 3)
    ]
    assert sorted(key for keys in shards for key in keys) == every and sum(map(len, shards)) == len(every)
    assert shards[1] == every[1::3]
    report = tmp_path / "shard.json"
    assert command.main(
        [str(root), "--out", str(tmp_path / "out"), "--shard", "2/3", "--jobs", "1", "--report", str(report), "-q"]
    ) in (0, 1)
    assert [d["key"] for d in _report(report)["deployments"]] == shards[1]


@pytest.mark.parametrize("shard", ["0/3", "4/3", "2", "a/b"])
def test_bad_shard_is_a_usage_error(tmp_path, shard) -> None:
    with pytest.raises(SystemExit) as exit_info:
        command.main([str(tmp_path), "--out", str(tmp_path / "out"), "--shard", shard])
    assert exit_info.value.code == 2


# --- discovery on tiny folders (empty caffemodels: pairing looks at names and prototxt contents) ---


def _folder(tmp_path: Path, files: dict[str, str]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def _pairs(folder: Path) -> tuple[dict[str, str | None], dict[str, str | None], list[str]]:
    pairings, notes = pair_folder(sorted(folder.glob("*.prototxt")), sorted(folder.glob("*.caffemodel")))
    chosen = {p.caffemodel.name: p.prototxt.name if p.prototxt else None for p in pairings}
    return chosen, {p.caffemodel.name: p.problem for p in pairings}, notes


@pytest.mark.parametrize(
    ("text", "kind", "why"),
    [
        (DEPLOY, Kind.DEPLOY, "input"),
        (LEGACY_DEPLOY, Kind.DEPLOY, "input"),
        ('input: "data"\ninput_shape { dim: 1 dim: 3 }\n', Kind.DEPLOY, "input"),
        (TRAIN, Kind.TRAIN_TEST, "Data"),
        (TEST, Kind.TRAIN_TEST, "ImageData"),
        ('layers { name: "d" type: HDF5_DATA }\n', Kind.TRAIN_TEST, "HDF5_DATA"),
        ('layer { name: "d" type: "AnnotatedData" }\nlayer { type: "MultiBoxLoss" }\n', Kind.TRAIN_TEST, "Annotated"),
        (DEPLOY + 'layer { name: "x" type: "ReLU" include { phase: TRAIN } }\n', Kind.TRAIN_TEST, "phase: TRAIN"),
        (DEPLOY + 'layer { name: "l" type: "EuclideanLoss" }\n', Kind.TRAIN_TEST, "EuclideanLoss"),
        (SOLVER, Kind.SOLVER, "net"),
        ('train_net: "t.prototxt"\n', Kind.SOLVER, "train_net"),
        ('# base_lr: 1\nlayer { name: "c" type: "ReLU" }\n', Kind.UNKNOWN, ""),
    ],
)
def test_prototxts_are_classified_by_content(text, kind, why) -> None:
    found = classify_text(text)
    assert found.kind is kind and why in found.why


def test_same_stem_wins(tmp_path) -> None:
    folder = _folder(
        tmp_path, {"a.prototxt": DEPLOY, "deploy.prototxt": DEPLOY, "a.caffemodel": "", "b.caffemodel": ""}
    )
    chosen, _, _ = _pairs(folder)
    assert chosen == {"a.caffemodel": "a.prototxt", "b.caffemodel": "deploy.prototxt"}  # b: name tie-break


def test_single_deploy_by_content_and_train_test_solver_skipped(tmp_path) -> None:
    files = {"model.prototxt": DEPLOY, "train_val.prototxt": TRAIN, "test.prototxt": TEST, "solver.prototxt": SOLVER}
    files |= {"snap_iter_1000.caffemodel": "", "snap_iter_2000.caffemodel": "", "train_val.caffemodel": ""}
    chosen, problems, notes = _pairs(_folder(tmp_path, files))
    # a same-stem train net is no deploy: train_val.caffemodel falls back to the single deploy prototxt
    assert set(chosen.values()) == {"model.prototxt"} and len(chosen) == 3
    assert not any(problems.values())
    assert len(notes) == 3 and all(n.startswith("skipped ") for n in notes)
    assert any("solver.prototxt: solver" in n for n in notes)
    assert any("train_val.prototxt: train/test net (data layer Data)" in n for n in notes)


def test_ambiguity_is_reported_never_guessed(tmp_path) -> None:
    folder = _folder(tmp_path / "src" / "x", {"a.prototxt": DEPLOY, "b.prototxt": LEGACY_DEPLOY, "m.caffemodel": ""})
    chosen, problems, _ = _pairs(folder)
    assert chosen == {"m.caffemodel": None}
    assert problems["m.caffemodel"].startswith("ambiguous: 2 deploy prototxts beside it (a.prototxt, b.prototxt)")
    report = tmp_path / "r.json"
    assert command.main([str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--report", str(report), "-q"]) == 1
    (row,) = _report(report)["deployments"]
    assert row["status"] == "failed" and row["key"] == "x/m" and "ambiguous" in row["reason"]
    assert row["prototxt"] is None


def test_caffemodel_without_prototxt_is_reported(tmp_path) -> None:
    chosen, problems, _ = _pairs(_folder(tmp_path, {"train.prototxt": TRAIN, "m.caffemodel": ""}))
    assert chosen == {"m.caffemodel": None}
    assert problems["m.caffemodel"].startswith("no deploy prototxt") and "train.prototxt" in problems["m.caffemodel"]


def test_discovery_recurses_and_ignores_outdir(tmp_path) -> None:
    _folder(tmp_path / "a" / "b", {"deploy.prototxt": DEPLOY, "m.caffemodel": ""})
    _folder(tmp_path / "out" / "a" / "b", {"m.prototxt": DEPLOY, "m.caffemodel": ""})
    found = discover(tmp_path, ignore=[tmp_path / "out"])
    assert [(p.caffemodel, p.prototxt) for p in found.pairings] == [
        (tmp_path / "a" / "b" / "m.caffemodel", tmp_path / "a" / "b" / "deploy.prototxt")
    ]


# --- real conversions of small nets: manifest, several SRCs, outputs, exit codes ---


def _sample(folder: Path, name: str, stem: str | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or name
    pair = folder / f"{stem}.prototxt", folder / f"{stem}.caffemodel"
    for source, target in zip((".prototxt", ".caffemodel"), pair, strict=True):
        shutil.copyfile(ROOT / "sample_nets" / f"{name}{source}", target)
    return pair


def test_manifest_csv(tmp_path) -> None:
    models = tmp_path / "models"
    resnet, no_bn = _sample(models / "r", "resnet_mini"), _sample(models, "no_bn")
    manifest = tmp_path / "pairs.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prototxt", "caffemodel", "out"])
        writer.writerow(["models/r/resnet_mini.prototxt", "models/r/resnet_mini.caffemodel", "cust/a.caffemodel"])
        writer.writerow([str(no_bn[0]), "models/no_bn.caffemodel", ""])
    out = tmp_path / "out"
    assert command.main(["--manifest", str(manifest), "--out", str(out), "--jobs", "1", "-q"]) == 0
    assert (out / "cust" / "a.prototxt").is_file() and (out / "cust" / "a.caffemodel").is_file()
    assert (out / "models" / "no_bn.prototxt").is_file() and (out / "models" / "no_bn.caffemodel").is_file()
    assert resnet[1].is_file()


def test_manifest_json_and_skip_of_changed_inputs(tmp_path) -> None:
    _, caffemodel = _sample(tmp_path / "m", "resnet_mini")
    manifest = tmp_path / "lists" / "pairs.json"
    manifest.parent.mkdir()
    manifest.write_text(
        json.dumps([{"prototxt": "../m/resnet_mini.prototxt", "caffemodel": str(caffemodel), "out": "x/y"}])
    )
    out, report = tmp_path / "out", tmp_path / "r.json"
    args = ["--manifest", str(manifest), "--out", str(out), "--skip-existing", "--report", str(report), "-q"]
    assert command.main(args) == 0
    assert _report(report)["deployments"][0]["status"] == "converted"
    assert (out / "x" / "y.caffemodel").is_file()
    assert command.main(args) == 0 and _report(report)["deployments"][0]["status"] == "skipped"
    later = (out / "x" / "y.caffemodel").stat().st_mtime + 10
    os.utime(caffemodel, (later, later))  # a newer input: the outputs are stale
    assert command.main(args) == 0 and _report(report)["deployments"][0]["status"] == "converted"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("prototxt,weights\na,b\n", "header"),
        ("prototxt,caffemodel\n", "lists no deployment"),
        ("prototxt,caffemodel,out\na.prototxt,a.caffemodel,o\nb.prototxt,b.caffemodel,o.prototxt\n", "written by both"),
        ("prototxt,caffemodel,out\na.prototxt,a.caffemodel,../o\n", "inside OUTDIR"),
        ("prototxt,caffemodel,out\na.prototxt,a.caffemodel,a\n", "would overwrite a source"),
    ],
)
def test_bad_manifest_is_a_usage_error(tmp_path, capsys, rows, message) -> None:
    (tmp_path / "pairs.csv").write_text(rows)
    assert command.main(["--manifest", str(tmp_path / "pairs.csv"), "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_several_sources_are_prefixed_and_deduplicated(tmp_path) -> None:
    _sample(tmp_path / "one" / "models" / "a", "no_bn", "m")
    _sample(tmp_path / "two" / "models" / "a", "no_bn", "m")
    sources = [tmp_path / "one" / "models", tmp_path / "two" / "models"]
    out = tmp_path / "out"
    assert command.main([*map(str, sources), "--out", str(out), "--jobs", "2", "-q"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.caffemodel")) == [
        "models-2/a/m.caffemodel",
        "models/a/m.caffemodel",
    ]


def test_sources_are_never_written(tmp_path, capsys) -> None:
    _sample(tmp_path / "p" / "src", "no_bn", "m")
    _sample(tmp_path / "q", "no_bn", "n")
    before = _digests(tmp_path)
    # two SRCs: outputs of the first go to OUTDIR/src/..., which here is the source folder itself
    assert command.main([str(tmp_path / "p" / "src"), str(tmp_path / "q"), "--out", str(tmp_path / "p")]) == 2
    assert "would overwrite a source file" in capsys.readouterr().err
    assert command.main([str(tmp_path / "q"), "--out", str(tmp_path / "q")]) == 2
    assert "OUTDIR is a source folder" in capsys.readouterr().err
    assert _digests(tmp_path) == before
    # OUTDIR inside a SRC is fine: discovery leaves it out, so a rerun finds the same work
    args = [str(tmp_path / "q"), "--out", str(tmp_path / "q" / "merged"), "--report", str(tmp_path / "r.json"), "-q"]
    assert command.main(args) == 0
    assert command.main([*args, "--skip-existing"]) == 0
    assert [d["key"] for d in _report(tmp_path / "r.json")["deployments"]] == ["n"]
    assert sorted(p.name for p in (tmp_path / "q" / "merged").iterdir()) == ["n.caffemodel", "n.prototxt"]


def test_existing_outputs_need_skip_existing_or_force(tmp_path, capsys) -> None:
    _sample(tmp_path / "src", "no_bn", "n")
    args = [str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), "-q"]
    assert command.main(args) == 0
    stamp = (tmp_path / "out" / "n.caffemodel").stat().st_mtime_ns
    assert command.main(args) == 2
    assert "2 output files exist already" in capsys.readouterr().err
    assert (tmp_path / "out" / "n.caffemodel").stat().st_mtime_ns == stamp
    assert command.main([*args, "--force"]) == 0
    assert _report(tmp_path / "r.json")["deployments"][0]["status"] == "converted"


def test_usage_errors(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert command.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "found no caffemodel" in capsys.readouterr().err
    assert command.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert command.main(["--out", str(tmp_path / "out")]) == 2
    (tmp_path / "p.csv").write_text("prototxt,caffemodel\na,b\n")
    assert command.main([str(tmp_path), "--manifest", str(tmp_path / "p.csv"), "--out", str(tmp_path / "out")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        command.main([str(tmp_path), "--out", str(tmp_path / "out"), "--jobs", "0"])
    assert exit_info.value.code == 2


def _items(tmp_path: Path, keys: str) -> list[worklist.WorkItem]:
    """A deployment of the sample net no_bn per key, with its outputs under tmp_path / "out"."""
    out = tmp_path / "out"
    pairs = {key: _sample(tmp_path / "src", "no_bn", key) for key in keys}
    return [worklist.WorkItem(k, *pairs[k], out / f"{k}.prototxt", out / f"{k}.caffemodel") for k in keys]


def _waiting_convert(item: worklist.WorkItem, *more: object) -> pool.ItemResult:
    """convert_item, except that the deployment keyed 'b' first waits (10 s at most) for the file
    'a.received' beside its outputs, and fails when it does not come."""
    flag = item.out_prototxt.with_name("a.received")
    deadline = time.monotonic() + 10
    while item.key == "b" and not flag.exists():
        if time.monotonic() > deadline:
            return pool.item_result(item, pool.Status.FAILED, "a's result never reached the parent")
        time.sleep(0.01)
    return _CONVERT(item, *more)


def test_each_result_arrives_as_its_deployment_ends(tmp_path, monkeypatch) -> None:
    """Results stream back one by one, not per run of deployments: the worker holds 'b' until the
    parent has received 'a', the deployment before it in the same run."""
    items = _items(tmp_path, "abc")
    monkeypatch.setattr(pool, "START_METHOD", "fork")  # so the patched convert_item reaches the workers
    monkeypatch.setattr(pool, "convert_item", _waiting_convert)
    monkeypatch.setattr(pool, "chunks", lambda items, jobs: [list(items)])  # one run of all three

    def received(result: pool.ItemResult) -> None:
        if result.key == "a":
            (tmp_path / "out" / "a.received").touch()

    results = pool.run_items(items, jobs=2, on_result=received)
    assert [(r.key, r.status, r.reason) for r in results] == [(k, pool.Status.CONVERTED, None) for k in "abc"]


def _crash_counting_convert(item: worklist.WorkItem, *more: object) -> pool.ItemResult:
    """convert_item, noting each conversion in '<key>.converted' beside the outputs (a line each);
    the worker process dies on the deployment keyed 'c'."""
    if item.key == "c":
        os._exit(9)
    result = _CONVERT(item, *more)
    with item.out_prototxt.with_name(f"{item.key}.converted").open("a") as log:
        log.write("converted\n")
    return result


def test_a_dying_worker_retries_only_what_it_left_unfinished(tmp_path, monkeypatch) -> None:
    """A worker that dies in the middle of a run: the deployments it had finished stay as they were
    reported (converted once, not again), the one it died on fails, the rest are converted alone."""
    items = _items(tmp_path, "abcde")
    monkeypatch.setattr(pool, "START_METHOD", "fork")
    monkeypatch.setattr(pool, "convert_item", _crash_counting_convert)
    monkeypatch.setattr(pool, "chunks", lambda items, jobs: [list(items)])
    results = {r.key: r for r in pool.run_items(items, jobs=2)}
    assert results.pop("c").reason == "the worker process died converting it (crash in native code?)"
    assert all(r.status is pool.Status.CONVERTED for r in results.values())
    out = tmp_path / "out"
    assert {key: (out / f"{key}.converted").read_text().count("\n") for key in "abde"} == dict.fromkeys("abde", 1)


def _isolating(monkeypatch) -> list[str]:
    """Record the deployments `run_items` retries alone (each in a pool of its own)."""
    alone, real = [], pool._run_pool

    def run_pool(items, jobs, *more, **named):
        if len(items) == 1 and jobs == 1:
            alone.append(items[0].key)
        return real(items, jobs, *more, **named)

    monkeypatch.setattr(pool, "_run_pool", run_pool)
    return alone


def test_a_crash_retries_alone_only_what_was_being_converted(tmp_path, monkeypatch) -> None:
    """After a worker dies, the deployments not started yet go to a fresh pool as usual; only the
    ones being converted then are retried alone (one crash must not turn the rest of a fleet into
    a process per deployment)."""
    items = _items(tmp_path, "abcdefghij")
    monkeypatch.setattr(pool, "START_METHOD", "fork")
    monkeypatch.setattr(pool, "convert_item", _crash_counting_convert)
    monkeypatch.setattr(pool, "chunks", lambda items, jobs: [list(items)])  # one run: 'c' is the only one started
    alone = _isolating(monkeypatch)
    results = {r.key: r for r in pool.run_items(items, jobs=2)}
    assert alone == ["c"]
    assert results.pop("c").reason == "the worker process died converting it (crash in native code?)"
    assert all(r.status is pool.Status.CONVERTED for r in results.values())
    counts = {key: (tmp_path / "out" / f"{key}.converted").read_text().count("\n") for key in results}
    assert counts == dict.fromkeys(results, 1)


WARNINGS = [f"warning {i}: " + "x" * 100 for i in range(1000)]  # a result of ~110 KB pickled: more than a pipe holds


def _large_results_convert(item: worklist.WorkItem, *more: object) -> pool.ItemResult:
    """convert_item with a result too large for the pipe, 20 ms slower; the worker given 'zz' dies
    after 0.5 s, while the other is sending."""
    if item.key == "zz":
        time.sleep(0.5)
        os._exit(9)
    time.sleep(0.02)
    return dataclasses.replace(_CONVERT(item, *more), warnings=WARNINGS)


def test_a_worker_dying_while_another_sends_a_large_result_hangs_nothing(tmp_path, monkeypatch) -> None:
    """The pool ends the other workers when one dies, maybe halfway through a message: the
    parent reads whole messages only and never waits for the rest of one (it did, for ever)."""
    items = _items(tmp_path, [f"k{i:02d}" for i in range(40)] + ["zz"])
    monkeypatch.setattr(pool, "START_METHOD", "fork")
    monkeypatch.setattr(pool, "convert_item", _large_results_convert)
    monkeypatch.setattr(pool, "chunks", lambda items, jobs: [list(items[:-1]), items[-1:]])

    def too_long(signum: int, frame: object) -> None:
        raise TimeoutError("run_items did not return in 60 s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    try:
        outcome = [pool.run_items(items, jobs=2, on_result=lambda result: time.sleep(0.1))]  # a slow console
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    statuses = {r.key: r.status for r in outcome[0]}
    assert statuses.pop("zz") is pool.Status.FAILED
    assert set(statuses.values()) == {pool.Status.CONVERTED}


def _slow_b_crash_c(item: worklist.WorkItem, *more: object) -> pool.ItemResult:
    """_crash_counting_convert, with 'b' slow enough to be under way when the pool breaks."""
    if item.key == "b":
        time.sleep(0.4)
    return _crash_counting_convert(item, *more)


def _ab_then_c(items: list[worklist.WorkItem], jobs: int) -> list[list[worklist.WorkItem]]:
    return [items[:2], items[2:]] if len(items) == 3 else [items]


def test_a_result_sent_after_the_pool_broke_counts_once(tmp_path, monkeypatch) -> None:
    """The pool's thread fails its futures before it ends the live workers, which may still send
    a result meanwhile (here the thread is slowed between futures): that result is taken, once,
    and the deployment is not converted again."""
    real = concurrent.futures.Future.set_exception

    def set_exception(future, error):
        real(future, error)
        time.sleep(0.5)

    monkeypatch.setattr(concurrent.futures.Future, "set_exception", set_exception)
    monkeypatch.setattr(pool, "START_METHOD", "fork")
    monkeypatch.setattr(pool, "convert_item", _slow_b_crash_c)
    monkeypatch.setattr(
        pool, "chunks", lambda items, jobs: [list(items[:2]), items[2:]] if len(items) == 3 else [items]
    )
    reported = []
    pool.run_items(_items(tmp_path, "abc"), jobs=2, on_result=lambda r: reported.append(r.key))
    assert sorted(reported) == ["a", "b", "c"]
    assert (tmp_path / "out" / "b.converted").read_text().count("\n") == 1


def _unpicklable_convert(item: worklist.WorkItem, *more: object) -> pool.ItemResult:
    """convert_item, except that the result of the deployment keyed 'b' cannot be pickled."""
    result = _CONVERT(item, *more)
    return dataclasses.replace(result, quant={"reader": lambda: None}) if item.key == "b" else result


def test_a_result_that_cannot_be_sent_fails_only_its_deployment(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pool, "START_METHOD", "fork")
    monkeypatch.setattr(pool, "convert_item", _unpicklable_convert)
    monkeypatch.setattr(pool, "chunks", lambda items, jobs: [list(items)])
    results = {r.key: r for r in pool.run_items(_items(tmp_path, "abc"), jobs=2)}
    assert results.pop("b").reason.startswith("internal error: its result could not be sent back: ")
    assert all(r.status is pool.Status.CONVERTED for r in results.values())


_CONVERT = pool.convert_item


def test_a_dying_worker_fails_only_its_deployment(tmp_path, monkeypatch) -> None:
    for stem in "abcde":
        _sample(tmp_path / "src", "no_bn", stem)
    monkeypatch.setattr(pool, "START_METHOD", "fork")  # so the patched convert_item reaches the workers
    monkeypatch.setattr(pool, "convert_item", _crash_counting_convert)
    report = tmp_path / "r.json"
    assert (
        command.main(
            [str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--jobs", "2", "--report", str(report), "-q"]
        )
        == 1
    )
    statuses = {d["key"]: (d["status"], d["reason"]) for d in _report(report)["deployments"]}
    assert statuses.pop("c") == ("failed", "the worker process died converting it (crash in native code?)")
    assert set(statuses.values()) == {("converted", None)} and len(statuses) == 4
