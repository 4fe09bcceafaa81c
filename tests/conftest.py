import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = ROOT.parent / "shared"
REAL_NETS = SHARED / "real_nets"


@pytest.fixture
def real_nets() -> Path:
    """`../shared/real_nets`; skipped only outside CI when the folder is missing."""
    if not REAL_NETS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{REAL_NETS} is missing in CI")
        pytest.skip("../shared/real_nets is not beside the repo")
    return REAL_NETS


@pytest.fixture
def pycaffe() -> Path:
    """The pycaffe environment's python; skipped when absent, except in CI, where it must be built."""
    from caffe_bn_merge.verification.pycaffe import pycaffe_python

    python = pycaffe_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("pycaffe is not installed in CI: run scripts/install_pycaffe.sh first")
        pytest.skip("pycaffe is not installed (scripts/install_pycaffe.sh)")
    return python
