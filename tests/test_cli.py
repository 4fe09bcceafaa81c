"""The command line: flags, default names, one-line errors with exit 2, inputs never touched."""

import hashlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from harness import copy_sample

from caffe_bn_merge.cli import build_parser, main


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_help_documents_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
            assert flag in readme, f"README does not document {flag}"


def test_help_needs_no_numpy_and_flavours_agree() -> None:
    code = "import sys; from caffe_bn_merge.cli import build_parser; build_parser(); print('numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    from caffe_bn_merge import cli
    from caffe_bn_merge.rules import bn_variants

    flavours = next(a for a in cli.build_parser()._actions if "--bn-flavour" in a.option_strings).choices
    assert tuple(flavours) == ("auto", *bn_variants.VARIANTS)


def test_default_outputs_sit_beside_the_inputs(tmp_path, capsys) -> None:
    model, weights = copy_sample(tmp_path)
    before = _digest(model, weights)
    assert main(["--model", str(model), "--weights", str(weights)]) == 0
    assert (tmp_path / "net_merged.prototxt").is_file() and (tmp_path / "net_merged.caffemodel").is_file()
    assert _digest(model, weights) == before
    out = capsys.readouterr().out
    assert re.search(r"BatchNorm\s+.\s+10\s+.\s+0 ", out) and "net_merged.caffemodel" in out


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "merge_bn.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_classic_script_converts(tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    done = _run(["--model", model.name, "--weights", weights.name, "-q"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert (tmp_path / "net_merged.caffemodel").is_file()


BAD = {
    "missing model": (["--model", "nope.prototxt", "--weights", "net.caffemodel"], r"nope\.prototxt: no such file"),
    "missing weights": (["--model", "net.prototxt", "--weights", "nope.caffemodel"], r"nope\.caffemodel: no such file"),
    "swapped": (["--model", "net.caffemodel", "--weights", "net.prototxt"], r"pass it as --weights"),
    "prototxt as weights": (["--model", "net.prototxt", "--weights", "net.prototxt"], r"pass it as --model"),
    "other net's weights": (["--model", "net.prototxt", "--weights", "other.caffemodel"], r"same net"),
    "output is an input": (
        ["--model", "net.prototxt", "--weights", "net.caffemodel", "--output-weights", "net.caffemodel"],
        r"equals an input",
    ),
    "output folder missing": (
        ["--model", "net.prototxt", "--weights", "net.caffemodel", "--output-model", "no/dir/x.prototxt"],
        r"does not exist",
    ),
    "merged prototxt, unmerged weights": (
        ["--model", "merged.prototxt", "--weights", "net.caffemodel"],
        r"expects 2 blob\(s\).*caffemodel has 1: an already-merged prototxt with the unmerged caffemodel",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_gets_one_line_and_exit_2(case: str, tmp_path) -> None:
    model, weights = copy_sample(tmp_path)
    (tmp_path / "other.caffemodel").write_bytes((ROOT / "sample_nets" / "no_bn.caffemodel").read_bytes())
    assert (
        main(
            [
                "--model",
                str(model),
                "--weights",
                str(weights),
                "-q",
                "--output-model",
                str(tmp_path / "merged.prototxt"),
                "--output-weights",
                str(tmp_path / "merged.caffemodel"),
            ]
        )
        == 0
    )
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    args, message = BAD[case]
    done = _run(args, tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert re.search(message, lines[0]), lines[0]
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == before  # nothing written, nothing touched


def test_readme_first_command_runs_twice(tmp_path) -> None:
    """The README's first command, after its `pip install .`, as a new user runs it, and again."""
    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("pip install . && merge-bn"))
    args = first.split("&& merge-bn", 1)[1].split()
    (tmp_path / "sample_nets").mkdir()
    for path in (ROOT / "sample_nets").glob("mobilenet_ssd.*"):
        (tmp_path / "sample_nets" / path.name).write_bytes(path.read_bytes())
    for _ in range(2):
        command = [sys.executable, "-m", "caffe_bn_merge", *args]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "sample_nets" / "mobilenet_ssd_merged.caffemodel").is_file()


TEARDOWN = "import atexit, sys; atexit.register(print, 'torn down', file=sys.stderr)"
COMMANDS = {
    "merge": (["--model", "net.prototxt", "--weights", "net.caffemodel"], 0, "net_merged.caffemodel"),
    "error": (["--model", "missing.prototxt", "--weights", "net.caffemodel"], 2, "merge-bn: error: "),
    "batch": (["batch", ".", "--out", "out", "--jobs", "2"], 0, "converted"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_command_ends_without_tearing_down_and_loses_no_output(name, tmp_path) -> None:
    """`merge-bn` (`cli.run`) ends once its work is done and its output flushed, without Python's
    teardown (tens of ms with numpy loaded; an atexit hook does not run): its piped output and
    exit status whole, and the same with standard output or error closed from the start."""
    args, code, shown = COMMANDS[name]
    copy_sample(tmp_path)
    program = f"{TEARDOWN}; from caffe_bn_merge.cli import run; run()"
    done = subprocess.run([sys.executable, "-c", program, *args], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    assert shown in done.stdout + done.stderr and "torn down" not in done.stderr
    for closed in (1, 2):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        for merged in tmp_path.glob("*_merged.*"):
            merged.unlink()
        command = [sys.executable, "-c", program, *args]
        shell = f"{shlex.join(command)} {closed}>&-"
        alone = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True)
        assert alone.returncode == code and "Traceback" not in alone.stdout + alone.stderr, (closed, alone.stderr)


def test_main_called_from_python_returns(tmp_path) -> None:
    """`cli.main`, with arguments or (a wrapper setting `sys.argv`) without, returns its exit code
    to the caller, whose process then ends as usual."""
    copy_sample(tmp_path)
    args = COMMANDS["merge"][0]
    for call in (f"main({args!r})", f"sys.argv[1:] = {args!r}; main()"):
        program = f"{TEARDOWN}; from caffe_bn_merge.cli import main; {call}; print('returned')"
        done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0 and "returned" in done.stdout and "torn down" in done.stderr, call
