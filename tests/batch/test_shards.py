"""Job arrays: `--shard auto` under Slurm and Kubernetes environments partitions the work list, the
shipped examples run as written, `merge-bn batch-report` merges shard reports, and a re-submitted
shard with --skip-existing converts nothing new."""

import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from harness import copy_sample

from caffe_bn_merge.batch import command, discovery, worklist
from caffe_bn_merge.batch.report import merge_reports
from caffe_bn_merge.batch.worklist import auto_shard
from caffe_bn_merge.errors import UsageError

SLURM_SCRIPT, K8S_JOB = ROOT / "examples" / "slurm_array.sh", ROOT / "examples" / "k8s_indexed_job.yaml"
MERGE_BN = [sys.executable, "-m", "caffe_bn_merge"]


# --- the scheduler's environment -> (i, n) -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_slurm_arrays_map_onto_shards(seed) -> None:
    """Every task of an evenly stepped array gets a shard of its own, all n of them."""
    rng = random.Random(seed)
    first, step, tasks = rng.randint(0, 50), rng.randint(1, 4), rng.randint(1, 40)
    seen = []
    for task in range(first, first + step * tasks, step):
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(first)}
        env |= {"SLURM_ARRAY_TASK_COUNT": str(tasks)} | ({"SLURM_ARRAY_TASK_STEP": str(step)} if step > 1 else {})
        index, count = auto_shard(env)
        assert count == tasks
        seen.append(index)
    assert seen == list(range(1, tasks + 1))


@pytest.mark.parametrize("seed", range(10))
def test_kubernetes_indexes_map_onto_shards(seed) -> None:
    count = random.Random(seed).randint(1, 50)
    by_flag = [auto_shard({"JOB_COMPLETION_INDEX": str(i)}, count) for i in range(count)]
    by_env = [auto_shard({"JOB_COMPLETION_INDEX": str(i), "MERGE_BN_SHARD_COUNT": str(count)}) for i in range(count)]
    assert by_flag == by_env == [(i + 1, count) for i in range(count)]


@pytest.mark.parametrize(
    ("env", "count", "message"),
    [
        ({}, None, "neither SLURM_ARRAY_TASK_ID"),
        ({"JOB_COMPLETION_INDEX": "0"}, None, "needs the job's completions"),
        ({"JOB_COMPLETION_INDEX": "4"}, 4, "not below the shard count"),
        ({"JOB_COMPLETION_INDEX": "x"}, 4, "not a whole number"),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0"}, None, "SLURM_ARRAY_TASK_COUNT is not set"),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, None, "evenly"),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, 5, "has 4 tasks"),
    ],
)
def test_an_environment_without_a_shard_is_a_usage_error(env, count, message) -> None:
    with pytest.raises(UsageError, match=message):
        auto_shard(env, count)


# --- the examples, run as written ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small fleet: 11 deployments of two sample nets in nested folders."""
    root = tmp_path_factory.mktemp("shard_fleet") / "models"
    for i in range(11):
        folder = root / f"site_{i % 3}" / f"camera_{i}"
        folder.mkdir(parents=True)
        copy_sample(folder, "no_bn" if i % 2 else "resnet_mini")
    return root


def _environment(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION", "MERGE_BN"))}
    return env | {"PYTHONPATH": str(ROOT)} | variables


def _slurm_tasks(tmp_path: Path, fleet: Path, first: int, tasks: int, only: list[int] | None = None) -> Path:
    """Run examples/slurm_array.sh as the tasks of `sbatch --array=first-(first+tasks-1)` would."""
    reports = tmp_path / "reports"
    for task in only if only is not None else range(first, first + tasks):
        env = _environment(
            SLURM_ARRAY_TASK_ID=str(task),
            SLURM_ARRAY_TASK_MIN=str(first),
            SLURM_ARRAY_TASK_MAX=str(first + tasks - 1),
            SLURM_ARRAY_TASK_COUNT=str(tasks),
            SLURM_CPUS_PER_TASK="1",
            FLEET=str(fleet),
            OUT=str(tmp_path / "merged"),
            REPORTS=str(reports),
            MERGE_BN=shlex.join(MERGE_BN),
        )
        subprocess.run(["bash", str(SLURM_SCRIPT)], env=env, check=True, cwd=tmp_path)
    return reports


def _k8s_command() -> list[str]:
    """The container command of examples/k8s_indexed_job.yaml (a JSON-style flow list), and the
    job's completions, which --shard-count must equal."""
    text = K8S_JOB.read_text()
    completions = int(re.search(r"^\s*completions:\s*(\d+)\s*$", text, re.MULTILINE).group(1))
    argv = json.loads(re.search(r"^\s*command:\s*(\[.*\])\s*$", text, re.MULTILINE).group(1))
    assert argv[argv.index("--shard-count") + 1] == str(completions)
    assert re.search(rf"^\s*parallelism:\s*{completions}\s*$", text, re.MULTILINE)
    return argv


def _k8s_pods(tmp_path: Path, fleet: Path, only: list[int] | None = None) -> Path:
    """Run the Indexed Job's container command as its pods would, /fleet mapped to `tmp_path`."""
    argv = _k8s_command()
    count = int(argv[argv.index("--shard-count") + 1])
    (tmp_path / "models").exists() or (tmp_path / "models").symlink_to(fleet, target_is_directory=True)
    for index in only if only is not None else range(count):
        env = _environment(JOB_COMPLETION_INDEX=str(index))
        args = [re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], arg) for arg in argv[1:]]
        args = [arg.replace("/fleet", str(tmp_path)) for arg in args]
        assert argv[0] == "merge-bn"
        subprocess.run([*MERGE_BN, *args], env=env, check=True)
    return tmp_path


def _merged(tmp_path: Path, reports: list[Path]) -> tuple[int, dict]:
    out = tmp_path / "fleet.json"
    code = subprocess.run([*MERGE_BN, "batch-report", *map(str, reports), "-o", str(out), "-q"], env=_environment())
    return code.returncode, json.loads(out.read_text())


def _single_run(tmp_path: Path, fleet: Path) -> dict:
    report = tmp_path / "single.json"
    args = [str(fleet), "--out", str(tmp_path / "single"), "--jobs", "1", "--report", str(report), "-q"]
    assert command.main(args) == 0
    return json.loads(report.read_text())


def _check_partition(merged: dict, single: dict, shard_reports: list[dict]) -> None:
    """Every deployment converted once across the shards; the merged report counts as one run."""
    keys = [d["key"] for r in shard_reports for d in r["deployments"]]
    assert sorted(keys) == [d["key"] for d in single["deployments"]]  # each exactly once
    assert merged["counts"] == single["counts"] and merged["shards"]["missing"] == []
    assert merged["work_list"] == single["work_list"] == len(keys)


@pytest.mark.parametrize("first", [0, 1, 5])
def test_the_slurm_example_partitions_the_fleet_and_resumes(tmp_path, fleet, first) -> None:
    tasks = 4
    reports = _slurm_tasks(tmp_path, fleet, first, tasks)
    files = sorted(reports.glob("shard-*.json"))
    assert len(files) == tasks
    code, merged = _merged(tmp_path, files)
    assert code == 0
    _check_partition(merged, _single_run(tmp_path, fleet), [json.loads(f.read_text()) for f in files])
    again = first + random.Random(first).randrange(tasks)
    _slurm_tasks(tmp_path, fleet, first, tasks, only=[again])  # re-submitted: nothing new to do
    resumed = json.loads((reports / f"shard-{again}.json").read_text())
    assert resumed["counts"]["converted"] == 0 and resumed["counts"]["skipped"] == resumed["counts"]["total"] > 0


def test_the_kubernetes_example_partitions_the_fleet(tmp_path, fleet) -> None:
    root = _k8s_pods(tmp_path, fleet)
    files = sorted(root.glob("merge-bn-shard-*.json"))
    assert len(files) == int(_k8s_command()[_k8s_command().index("--shard-count") + 1])
    code, merged = _merged(tmp_path, files)
    assert code == 0
    _check_partition(merged, _single_run(tmp_path, fleet), [json.loads(f.read_text()) for f in files])


def test_missing_shards_are_named_and_fail_the_merge(tmp_path, fleet) -> None:
    reports = _slurm_tasks(tmp_path, fleet, 0, 5, only=[0, 2, 3])
    code, merged = _merged(tmp_path, sorted(reports.glob("*.json")))
    assert code == 1 and merged["shards"] == {"count": 5, "missing": [2, 5]}


# --- merging reports -----------------------------------------------------------------------------------


def _report(index: int, count: int, keys: list[str], work_list: int, failed: tuple[str, ...] = ()) -> dict:
    """A shard report as read_report returns it, converting `keys` (failing those in `failed`)."""
    rows = [{"key": k, "status": "converted", "reason": None} for k in keys]
    rows = [row | ({"status": "failed", "reason": "x"} if row["key"] in failed else {}) for row in rows]
    return {"schema": 1, "shard": [index, count], "work_list": work_list, "seconds": 1.0, "deployments": rows}


@pytest.mark.parametrize("seed", range(10))
def test_merged_counts_are_the_sum_of_the_shards(seed) -> None:
    rng = random.Random(seed)
    count, keys = rng.randint(1, 8), [f"k{i:03d}" for i in range(rng.randint(0, 60))]
    failed = tuple(rng.sample(keys, min(3, len(keys))))
    present = sorted(rng.sample(range(1, count + 1), rng.randint(1, count)))
    reports = {f"s{i}": _report(i, count, keys[i - 1 :: count], len(keys), failed) for i in present}
    merged = merge_reports(reports)
    expected = [k for i in present for k in keys[i - 1 :: count]]
    assert [d["key"] for d in merged["deployments"]] == sorted(expected)
    assert merged["counts"]["total"] == len(expected)
    assert merged["counts"]["failed"] == len([k for k in expected if k in failed]) == len(merged["failures"])
    assert merged["shards"]["missing"] == [i for i in range(1, count + 1) if i not in present]


@pytest.mark.parametrize(
    ("reports", "message"),
    [
        ({"a": _report(1, 2, [], 4), "b": _report(1, 2, [], 4)}, "given twice"),
        ({"a": _report(1, 2, [], 4), "b": _report(2, 3, [], 4)}, "not of one job array"),
        ({"a": _report(1, 2, [], 4), "b": _report(2, 2, [], 5)}, "not of one job array"),
    ],
)
def test_reports_of_different_runs_do_not_merge(reports, message) -> None:
    with pytest.raises(UsageError, match=message):
        merge_reports(reports)


@pytest.mark.parametrize(
    "content",
    [b"", b"\xff\xfe", b"[" * 100_000, b'{"schema": 1}', b'{"schema": 1, "deployments": [], "shard": [3, 2]}'],
)
def test_a_bad_report_is_one_line(tmp_path, capsys, content) -> None:
    (tmp_path / "bad.json").write_bytes(content)
    code = command.report_main([str(tmp_path / "bad.json"), "-o", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_a_shard_reads_only_its_own_prototxts(tmp_path, monkeypatch, count) -> None:
    """Each shard's work list is its part of the whole one, paired alike, and only the prototxts
    beside its own caffemodels are read."""
    rng = random.Random(count)
    for i in range(15):
        folder = tmp_path / "src" / f"g{rng.randint(0, 3)}" / f"d{i}"
        folder.mkdir(parents=True)
        copy_sample(folder, "no_bn")
        if rng.random() < 0.3:
            (folder / "solver.prototxt").write_text('net: "train.prototxt"\nbase_lr: 0.1\n')
    whole = worklist.build_work_list([tmp_path / "src"], tmp_path / "out")
    read: list[Path] = []
    classify = discovery.classify_prototxt
    monkeypatch.setattr(discovery, "classify_prototxt", lambda path: read.append(path) or classify(path))
    for index in range(1, count + 1):
        read.clear()
        part = worklist.build_work_list([tmp_path / "src"], tmp_path / "out", part=(index, count))
        assert part.items == worklist.shard(whole.items, index, count) and part.total == len(whole.items)
        assert {p.parent for p in read} == {item.caffemodel.parent for item in part.items}


def test_what_a_shard_could_not_read_fails_the_merge(tmp_path, capsys) -> None:
    reports = []
    for index, unread in ((1, ["/m/a.caffemodel: cannot read (symlink loop)"]), (2, [])):
        report = _report(index, 2, [f"k{index}"], 2) | {"unread": unread}
        reports.append(tmp_path / f"shard-{index}.json")
        reports[-1].write_text(json.dumps(report))
    assert command.report_main([*map(str, reports), "-o", str(tmp_path / "fleet.json"), "-q"]) == 1
    assert "not read: /m/a.caffemodel: cannot read (symlink loop)" in capsys.readouterr().err
    assert json.loads((tmp_path / "fleet.json").read_text())["counts"]["converted"] == 2
