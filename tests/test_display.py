"""What a person sees from `merge-bn`: tables that fit 80, 100 and 120 columns and piped output,
names never split mid-word, warnings once (and in the report), messages that tell the truth, the
progress bar, and defaults a user expects."""

import io
import json
import random
import re

import pytest
from conftest import ROOT
from harness import altered_sample, copy_sample, run_in_terminal
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from caffe_bn_merge import display, merge
from caffe_bn_merge.cli import main
from caffe_bn_merge.fitting import fold_name
from caffe_bn_merge.report import decisions, why
from caffe_bn_merge.rules.reasons import Reason

WIDTHS = (80, 100, 120)
SEPARATORS = "/_.:-"


# --- names folded only after a separator --------------------------------------------------------


@given(
    st.lists(st.text("abcxyz019", min_size=1, max_size=12), min_size=1, max_size=8),
    st.lists(st.sampled_from(SEPARATORS), min_size=8, max_size=8),
    st.integers(4, 40),
)
def test_names_fold_only_after_separators(words: list[str], separators: list[str], width: int) -> None:
    name = "".join(w + s for w, s in zip(words, separators, strict=False)).rstrip(SEPARATORS)
    lines = fold_name(name, width).split("\n")
    assert "".join(lines) == name
    assert all(len(line) <= width for line in lines)
    if max(len(w) + 1 for w in words) <= width:  # every piece fits: breaks only after a separator
        assert all(line[-1] in SEPARATORS for line in lines[:-1])
    assert len(lines) == 1 or len(name) > width  # a name that fits is never broken


# --- tables at 80, 100, 120 columns and piped ---------------------------------------------------


def _long_names(seed: int) -> dict[str, str]:
    """resnet_mini's BatchNorm / Scale layers renamed to long names made of unique words."""
    rng = random.Random(seed)
    layers = [f"{host}/{kind}" for host in ("conv1", "res2a", "res2b", "res3a", "res3b", "res3_proj", "res4a",
              "res4b", "res4_proj", "fc") for kind in ("bn", "scale")]  # fmt: skip
    words = iter(f"w{seed}{i}{''.join(rng.choices('abcdefgh', k=rng.randint(2, 14)))}" for i in range(10**6))
    return {old: rng.choice(SEPARATORS).join(next(words) for _ in range(rng.randint(1, 5))) for old in layers}


def _recording(width: int) -> Console:
    return Console(width=width, record=True, force_terminal=True, file=io.StringIO())


def _check_fits(text: str, width: int, names: list[str]) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, "\n".join(line for line in lines if len(line) > width)
    for header in (line for line in lines if line.startswith("┃")):
        assert all(cell.strip() for cell in header.strip("┃").split("┃")), f"a column has no header: {header}"
    for name in names:  # each word of each name appears whole: no name is split mid-word
        for word in re.split(f"[{re.escape(SEPARATORS)}]", name):
            assert re.search(rf"(?<![a-z0-9]){word}(?![a-z0-9])", text), f"{word} of {name} was split"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("width", WIDTHS)
def test_tables_fit_the_terminal_and_never_split_a_name(seed: int, width: int, tmp_path) -> None:
    rename = _long_names(seed)
    model, weights = altered_sample(tmp_path, rename, negative_variance=seed % 2 == 1, batch_stats=seed == 2)
    result = merge(model, weights, write=False)
    console = _recording(width)
    display.show_result(console, result, None, everything=True, dry_run=True)
    _check_fits(console.export_text(), width, [d.layer for d in decisions(result)])


def test_every_decision_says_why() -> None:
    for name in ("mobilenet_ssd", "resnet_mini", "deconv_seg", "no_bn"):
        sample = ROOT / "sample_nets" / name
        result = merge(sample.with_suffix(".prototxt"), sample.with_suffix(".caffemodel"), write=False)
        assert all(why(d) for d in decisions(result)), name


@pytest.mark.parametrize("columns", [None, "80", "120"])
def test_piped_output_fits_and_never_breaks_a_path(columns: str | None, tmp_path, capsys, monkeypatch) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    out = tmp_path / "a folder with spaces and a rather long name" / "and another long folder name"
    out.mkdir(parents=True)
    model, weights = altered_sample(tmp_path, _long_names(7))
    assert (
        main(["--model", str(model), "--weights", str(weights), "--output-model", str(out / "x y.prototxt"), "-v"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    wrote = f"wrote {out / 'x y.prototxt'} and {out / 'x y.caffemodel'}"
    assert wrote in lines
    _check_fits("\n".join(line for line in lines if line != wrote), int(columns or 100), list(_long_names(7).values()))


@pytest.mark.parametrize("width", WIDTHS)
def test_a_terminal_of_each_width(width: int, tmp_path) -> None:
    rename = _long_names(width)
    model, weights = altered_sample(tmp_path, rename, negative_variance=True)
    text = run_in_terminal(["--model", model.name, "--weights", weights.name, "-v"], width, tmp_path)
    _check_fits(text, width, list(rename.values()))
    assert text.count("negative variance") == 1


# --- warnings: once, on the display, in the report, obeying -q ----------------------------------


@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["-q"], ["-v"]])
def test_a_warning_is_shown_once_and_reported(extra: list[str], tmp_path, capsys) -> None:
    model, weights = altered_sample(tmp_path, negative_variance=True)
    report = tmp_path / "report.json"
    assert main(["--model", str(model), "--weights", str(weights), "--report", str(report), *extra]) == 0
    err = capsys.readouterr().err
    assert err.count("negative variance") == (0 if "-q" in extra else 1)
    warnings = json.loads(report.read_text())["warnings"]
    assert len(warnings) == 1 and "negative variance" in warnings[0]


def test_live_log_shows_each_message_once_and_keeps_warnings_when_quiet() -> None:
    console = _recording(80)
    import logging

    for quiet in (False, True):
        with display.live_log(console, verbose=False, quiet=quiet) as shown:
            log = logging.getLogger("caffe_bn_merge.rules.norms")
            for _ in range(3):
                log.warning("twice %s", quiet)
            log.info("a step")
        assert shown.warnings == [f"twice {quiet}"]
    assert console.export_text().splitlines() == ["warning: twice False"]


# --- messages that tell the truth ---------------------------------------------------------------


def test_batch_statistics_are_named_and_assume_global_stats_folds_them_loudly(tmp_path, capsys) -> None:
    model, weights = altered_sample(tmp_path, batch_stats=True)
    report = tmp_path / "r.json"
    assert main(["--model", str(model), "--weights", str(weights), "--report", str(report)]) == 0
    captured = capsys.readouterr()
    assert "10 BatchNorm layers use batch statistics at inference" in captured.out
    assert "nothing to fold" not in captured.out and json.loads(report.read_text())["assume_global_stats"] is False
    args = ["--model", str(model), "--weights", str(weights), "--report", str(report), "--assume-global-stats"]
    assert main([*args, "--force"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("changes what Caffe computes") == 1
    written = json.loads(report.read_text())
    assert written["assume_global_stats"] is True and "changes what Caffe computes" in written["warnings"][0]
    assert written["layers"]["after"].get("BatchNorm", 0) == 0
    # folded with the stored averages: the same caffemodel as the net that says use_global_stats: true
    plain = tmp_path / "plain"
    plain.mkdir()
    altered_sample(plain)
    assert main(["--model", str(plain / "net.prototxt"), "--weights", str(plain / "net.caffemodel"), "-q"]) == 0
    assert (plain / "net_merged.caffemodel").read_bytes() == (tmp_path / "net_merged.caffemodel").read_bytes()


def test_batch_statistics_refusal_is_lifted_only_on_request(tmp_path) -> None:
    model, weights = altered_sample(tmp_path, batch_stats=True)
    kept = merge(model, weights, write=False).plan.kept
    assert {k.type for k in kept if any(r.reason is Reason.BATCH_STATS for r in k.refusals)} == {"BatchNorm"}
    from caffe_bn_merge import MergeOptions

    assert not merge(model, weights, write=False, options=MergeOptions(assume_global_stats=True)).plan.kept


def test_dry_run_says_nothing_was_written(tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    assert main(["--model", str(model), "--weights", str(weights), "--dry-run"]) == 0
    assert "dry run: nothing written" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.caffemodel", "net.prototxt"]


def test_verbose_step_log_follows_the_net(tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path, "mobilenet_ssd")
    assert main(["--model", str(model), "--weights", str(weights), "-v", "--dry-run"]) == 0
    rules = ("identity: ", "forward: ", "backward: ", "standalone: ")
    logged = [
        line.split(": ")[1].split(" ")[0] for line in capsys.readouterr().err.splitlines() if line.startswith(rules)
    ]
    order = list(merge(model, weights, write=False).plan.types)
    assert len(logged) > 10 and logged == sorted(logged, key=order.index)


# --- defaults -----------------------------------------------------------------------------------


def test_output_weights_go_beside_output_model(tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    (tmp_path / "out").mkdir()
    assert (
        main(["--model", str(model), "--weights", str(weights), "--output-model", str(tmp_path / "out/x.prototxt")])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.caffemodel", "x.prototxt"]
    assert (
        main(["--model", str(model), "--weights", str(weights), "--output-weights", str(tmp_path / "out/y.caffemodel")])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "x.caffemodel",
        "x.prototxt",
        "y.caffemodel",
        "y.prototxt",
    ]


def test_existing_output_message_says_what_force_does(tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    args = ["--model", str(model), "--weights", str(weights), "-q"]
    assert main(args) == 0 and main(args) == 2
    assert "--force to replace it" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


# --- progress -----------------------------------------------------------------------------------


def test_progress_hears_every_byte_written(tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    heard: list[tuple[int, int]] = []
    merge(model, weights, on_progress=lambda done, total: heard.append((done, total)))
    done = [d for d, _ in heard]
    assert done == sorted(done) and heard[-1] == (weights.stat().st_size, weights.stat().st_size)


def test_progress_bar_on_a_terminal_only(monkeypatch) -> None:
    monkeypatch.setattr(display, "SHOW_AFTER", 0.0)
    piped = Console(file=io.StringIO(), width=80)
    with display.StepProgress(piped) as progress:
        progress.step("writing")
        progress.advance(5_000_000, 10_000_000)
    assert progress.bar is None and piped.file.getvalue() == ""
    console = _recording(80)
    with display.StepProgress(console) as progress:
        progress._timer.join()  # shown (SHOW_AFTER is 0 here)
        progress.step("writing")
        progress.advance(5_000_000, 10_000_000)
        progress.bar.refresh()
    assert progress._shown
    shown = console.export_text()
    assert "writing ..." in shown and "5/10 MB" in shown


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("columns", ["80", "120"])
def test_quant_output_never_splits_a_name(seed: int, columns: str, tmp_path, capsys, monkeypatch) -> None:
    """--quant piped: its table fits and folds layer names only after separators, and its notes
    keep names whole (the table cut names mid-word; the notes were wrapped at 80 columns)."""
    from caffe_bn_merge.synthetic.synth import NetBuilder

    monkeypatch.setenv("COLUMNS", columns)
    words = list(_long_names(seed).values())
    host, norm = words[0], f"{words[1]}/bn"
    b = NetBuilder("q", (1, 3, 8, 8), seed=seed)
    top = b.conv("data", 8, name=host)
    b.bn(top, name=norm)
    b.blobs[norm][1][seed] = 0.0  # a tiny variance: flagged, with notes naming both layers
    model, weights = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    b.save(model, weights)
    assert main(["--model", str(model), "--weights", str(weights), "--quant", "-v", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    notes = [line for line in lines if line.startswith(f"{host}:")]
    assert notes and all(norm in line for line in notes), notes
    _check_fits("\n".join(line for line in lines if line not in notes), int(columns), [host])
