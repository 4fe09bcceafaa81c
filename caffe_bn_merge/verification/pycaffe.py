"""Running a model on real Caffe (CPU pycaffe, BVLC + SSD layers) in its own interpreter.

pycaffe needs its own Python environment (protobuf 4.21, numpy 1.x, the compiled `_caffe`), made by
`scripts/install_pycaffe.sh`. This module finds that interpreter and runs `_caffe_child.py` in it
through `subprocess`; arrays go both ways as .npy files in a temporary folder (no pickle).
"""

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import VerifyError

ENV_PYTHON = "CAFFE_BN_MERGE_PYCAFFE"  # path to the pycaffe interpreter
ENV_HOME = "CAFFE_BN_MERGE_PYCAFFE_HOME"  # where install_pycaffe.sh put it (venv/, python/caffe)
INSTALL_HINT = "run scripts/install_pycaffe.sh"
CHILD = Path(__file__).with_name("_caffe_child.py")
CHILD_PREFIX = "caffe_child: error: "
_GLOG_FATAL = re.compile(r"^F\d{4,8} [\d:.]+\s+\d+ [^\]]*\] (.*)$")  # glog: F[yyyy]mmdd hh:mm:ss.us tid file:line] msg


def pycaffe_home() -> Path:
    """The folder install_pycaffe.sh installs into."""
    home = os.environ.get(ENV_HOME)
    return Path(home) if home else Path.home() / ".cache" / "caffe-bn-merge" / "pycaffe"


def pycaffe_python() -> Path | None:
    """The interpreter that imports pycaffe: $CAFFE_BN_MERGE_PYCAFFE, else the venv install_pycaffe.sh
    made under pycaffe_home(); None when there is none."""
    explicit = os.environ.get(ENV_PYTHON)
    if explicit:
        path = Path(explicit)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    home = pycaffe_home()
    python = home / "venv" / "bin" / "python"
    if python.is_file() and (home / "python" / "caffe" / "_caffe.so").is_file():
        return python
    return None


def run_caffe(
    model: Path,
    weights: Path,
    inputs: dict[str, np.ndarray],
    outputs: list[tuple[str, str]],
    *,
    timeout: float = 600.0,
) -> list[np.ndarray]:
    """Values of `outputs` ((layer, top) pairs) computed by pycaffe on the CPU, phase TEST, as float64
    arrays in that order: each is `top` right after `layer` ran, even when a later in-place layer
    rewrites the blob. Raises VerifyError (one line) when pycaffe is missing or cannot run the model."""
    model, weights = _existing(model, weights)
    with tempfile.TemporaryDirectory(prefix="caffe-bn-merge-pycaffe-") as tmp:
        folder = Path(tmp)
        request = {
            "model": str(model),
            "weights": str(weights),
            "inputs": _save_inputs(folder, inputs),
            "outputs": [[layer, top] for layer, top in outputs],
            "out_dir": str(folder),
        }
        _call_child(folder, request, model, timeout)
        try:
            return [np.load(folder / f"out{i}.npy", allow_pickle=False) for i in range(len(outputs))]
        except (OSError, ValueError) as err:
            raise VerifyError(f"pycaffe gave no readable result for {model}: {err}") from err


def time_caffe(
    original: tuple[Path, Path],
    merged: tuple[Path, Path],
    inputs: dict[str, np.ndarray],
    rounds: int,
    warmup: int,
    threads: int | None,
    *,
    timeout: float = 3600.0,
) -> tuple[list[float], list[float]]:
    """Seconds per forward pass of each model on pycaffe, `rounds` interleaved rounds after `warmup`
    (timed inside the child process); `threads` pins OpenMP / BLAS threads there."""
    pairs = [_existing(*original), _existing(*merged)]
    with tempfile.TemporaryDirectory(prefix="caffe-bn-merge-pycaffe-") as tmp:
        folder = Path(tmp)
        request = {
            "timing": {"models": [[str(m), str(w)] for m, w in pairs], "rounds": rounds, "warmup": warmup},
            "inputs": _save_inputs(folder, inputs),
            "out_dir": str(folder),
        }
        pinned = {name: str(threads) for name in THREAD_VARIABLES} if threads else {}
        _call_child(folder, request, pairs[0][0], timeout, pinned)
        try:
            times = json.loads((folder / "times.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise VerifyError(f"pycaffe gave no timing for {pairs[0][0]}: {err}") from err
        return [float(t) for t in times[0]], [float(t) for t in times[1]]


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _existing(model: Path, weights: Path) -> tuple[Path, Path]:
    model, weights = Path(model).resolve(), Path(weights).resolve()
    for path in (model, weights):
        if not path.is_file():
            raise VerifyError(f"{path}: no such file")
    return model, weights


def _save_inputs(folder: Path, inputs: dict[str, np.ndarray]) -> list[list[str]]:
    saved = []
    for i, (name, value) in enumerate(inputs.items()):
        path = folder / f"in{i}.npy"
        np.save(path, np.ascontiguousarray(value, dtype=np.float32), allow_pickle=False)
        saved.append([name, str(path)])
    return saved


def _call_child(
    folder: Path, request: dict, model: Path, timeout: float, extra_env: dict[str, str] | None = None
) -> None:
    """Run `_caffe_child.py` on `request` (written to `folder`); raise VerifyError when it fails."""
    python = pycaffe_python()
    if python is None:
        explicit = os.environ.get(ENV_PYTHON)
        where = f"{ENV_PYTHON}={explicit} is not a Python executable" if explicit else "pycaffe is not installed"
        raise VerifyError(f"{where}: {INSTALL_HINT} (or point {ENV_PYTHON} to a Python that imports caffe)")
    (folder / "request.json").write_text(json.dumps(request), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["GLOG_minloglevel"] = "2"  # Caffe's errors and fatal checks only
    env.update(extra_env or {})
    try:
        done = subprocess.run(
            [str(python), "-I", str(CHILD), str(folder / "request.json")],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise VerifyError(f"pycaffe did not finish {model.name} within {timeout:g} s") from err
    except OSError as err:
        raise VerifyError(f"cannot start {python}: {err.strerror}; {INSTALL_HINT}") from err
    if done.returncode != 0:
        raise VerifyError(f"pycaffe could not run {model}: {_failure(done.returncode, done.stderr)}")


def _failure(returncode: int, stderr: str) -> str:
    """The one line that says why the child failed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(CHILD_PREFIX):
            message = line[len(CHILD_PREFIX) :]
            if "cannot import pycaffe" in message:
                message += f"; {INSTALL_HINT}"
            return message
    for line in lines:
        fatal = _GLOG_FATAL.match(line)
        if fatal:
            return f"Caffe: {fatal.group(1)}"
    if returncode < 0:
        return f"killed by signal {-returncode}" + (f" ({lines[-1]})" if lines else "")
    return lines[-1] if lines else f"exit code {returncode}"
