"""What a person sees from `merge-bn batch`: a table that fits 80, 100 and 120 columns without
splitting a deployment's name mid-word, warnings named by deployment (on the display and in the
report, obeying -q), "1 deployment", and our own earlier outputs skipped with a note."""

import io
import json
import random
import re
from pathlib import Path

import pytest
from harness import altered_sample, copy_sample, run_in_terminal
from rich.console import Console as RichConsole

from caffe_bn_merge.batch import command
from caffe_bn_merge.batch.console import Console
from caffe_bn_merge.batch.discovery import pair_folder
from caffe_bn_merge.batch.pool import ItemResult, Status
from caffe_bn_merge.cli import main as merge_bn

WIDTHS = (80, 100, 120)
SEPARATORS = "/_.-"


def _fleet_results(seed: int) -> list[ItemResult]:
    """Results with long made-up keys of unique words, every status, and folds of every rule."""
    rng = random.Random(seed)
    results = []
    for i in range(8):
        words = [f"k{seed}{i}{j}" + "".join(rng.choices("abcdefxyz", k=rng.randint(1, 12))) for j in range(6)]
        key = "".join(w + rng.choice(SEPARATORS) for w in words[: rng.randint(1, 6)]).rstrip(SEPARATORS)
        status = rng.choice(list(Status))
        folds = {rule: rng.randint(1, 400) for rule in rng.sample(["backward", "forward", "identity", "standalone"], 3)}
        results.append(
            ItemResult(key, "p", "c", [], status, "a reason" if status is Status.FAILED else None,
                       rng.randint(1, 9999), rng.randint(1, 999), folds, rng.random() / 1e5, rng.random() * 100)
        )  # fmt: skip
    return results


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("width", WIDTHS)
def test_batch_table_fits_and_keeps_names_whole(seed: int, width: int) -> None:
    console = Console(quiet=False)
    console.out = RichConsole(width=width, record=True, force_terminal=True, file=io.StringIO())
    results = _fleet_results(seed)
    console.table(results, every=True)
    text = console.out.export_text()
    lines = [line for line in text.splitlines() if not line.startswith("failed: ")]
    assert max(len(line) for line in lines) <= width
    for r in results:
        for word in re.split(f"[{re.escape(SEPARATORS)}]", r.key):
            assert re.search(rf"(?<![a-z0-9]){word}(?![a-z0-9])", text), f"{word} of {r.key} was split"


def _two_deployments(root: Path) -> None:
    """`root/a/net.*`, whose merge warns of a negative variance, and `root/b/net.*`, which does not."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    altered_sample(root / "a", negative_variance=True)
    copy_sample(root / "b")


@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize("quiet", [False, True])
def test_warnings_are_named_per_deployment_and_reported(jobs: str, quiet: bool, tmp_path, capsys) -> None:
    _two_deployments(tmp_path / "src")
    report = tmp_path / "batch.json"
    args = [str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--jobs", jobs, "--report", str(report)]
    assert command.main(args + (["-q"] if quiet else [])) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "negative variance" in line]
    assert warned == [] if quiet else len(warned) == 1 and warned[0].startswith("warning: a/net: BatchNorm")
    deployments = {d["key"]: d for d in json.loads(report.read_text())["deployments"]}
    assert len(deployments["a/net"]["warnings"]) == 1 and deployments["b/net"]["warnings"] == []


def test_one_deployment_is_one(tmp_path, capsys) -> None:
    (tmp_path / "src").mkdir()
    copy_sample(tmp_path / "src")
    assert command.main([str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "1 deployment: 1 converted" in err and "converting" not in err  # no progress bar when piped


def test_our_own_outputs_are_skipped_with_a_note(tmp_path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    model, weights = copy_sample(src)
    assert merge_bn(["--model", str(model), "--weights", str(weights), "-q"]) == 0  # net_merged.* beside
    report = tmp_path / "batch.json"
    assert command.main([str(src), "--out", str(tmp_path / "out"), "--report", str(report)]) == 0
    written = json.loads(report.read_text())
    assert [d["key"] for d in written["deployments"]] == ["net"]
    assert sum("output of an earlier merge" in note for note in written["notes"]) == 2


def test_a_merged_pair_alone_is_skipped_with_a_note(tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    assert merge_bn(["--model", str(model), "--weights", str(weights), "-q"]) == 0
    unmerged = model.read_text()
    model.unlink()
    weights.unlink()
    pair = [tmp_path / "net_merged.prototxt"], [tmp_path / "net_merged.caffemodel"]
    pairings, notes = pair_folder(*pair)
    assert pairings == [] and any("already merged" in note for note in notes)
    pair[0][0].write_text(unmerged)  # a `_merged` name with BatchNorm in it: converted as any other
    assert [p.caffemodel for p in pair_folder(*pair)[0]] == pair[1]


@pytest.mark.parametrize("width", WIDTHS)
def test_batch_on_a_terminal_of_each_width(width: int, tmp_path) -> None:
    _two_deployments(tmp_path / "src" / "a_rather_long_folder_name_for_a_deployment")
    text = run_in_terminal(["batch", "src", "--out", "out", "--jobs", "1"], width, tmp_path)
    assert max(len(line) for line in text.splitlines()) <= width, text
    assert "2 deployments: 2 converted" in text and text.count("negative variance") == 1
