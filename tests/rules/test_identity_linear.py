"""Removing identity layers costs time linear in the net's size (up to a log factor), not
quadratic: a chain of 20,000 Dropout layers merges, and the work done for 4N layers stays far
below 16 times the work for N, for chains of every kind (issue 16, item 5)."""

import sys
from collections.abc import Callable

import pytest
from harness import save

from caffe_bn_merge import merge
from caffe_bn_merge.rules import rewrite
from caffe_bn_merge.synthetic.synth import NetBuilder


def _chain(n: int, kind: str) -> NetBuilder:
    """conv -> n identity layers -> ReLU; `kind`: non-in-place Dropouts, in-place ones, both in
    turn, or Dropouts each read by the next and by a final Eltwise (a fan of readers)."""
    b = NetBuilder(f"{kind}{n}", (1, 2, 4, 4), seed=0)
    top = b.conv("data", 2, kernel=1, name="c")
    tops = []
    for i in range(n):
        in_place = kind == "in place" or (kind == "mixed" and i % 2)
        b.unary("Dropout", top, None if in_place else f"d{i}", name=f"drop{i}")
        top = top if in_place else f"d{i}"
        tops.append(top)
    if kind == "fan":
        b.eltwise([top, tops[len(tops) // 2]], name="sum")
    else:
        b.relu(top)
    return b


KINDS = ["not in place", "in place", "mixed", "fan"]


def _work(make: Callable[[], object]) -> tuple[int, int]:
    """Python function calls (generators resumed included) and graph builds while `make` runs."""
    calls = builds = 0
    build = rewrite.build_graph

    def counting_build(net: object) -> object:
        nonlocal builds
        builds += 1
        return build(net)

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    rewrite.build_graph = counting_build
    sys.setprofile(profile)
    try:
        make()
    finally:
        sys.setprofile(None)
        rewrite.build_graph = build
    return calls, builds


@pytest.mark.parametrize("kind", KINDS)
def test_identity_removal_is_not_quadratic(kind: str, tmp_path) -> None:
    counted = {}
    for n in (250, 1000):
        files = save(_chain(n, kind), tmp_path)
        result = None

        def run(files=files) -> None:
            nonlocal result
            result = merge(*files, write=False)

        counted[n] = _work(run)
        assert {f"drop{i}" for i in range(n)} <= result.plan.removed
    (calls, builds), (calls4, builds4) = counted[250], counted[1000]
    assert calls4 < 7 * calls, counted  # quadratic would be 16x
    assert builds4 <= builds + 4, counted  # rounds grow like log N at most


def test_twenty_thousand_dropouts_merge(tmp_path) -> None:
    files = save(_chain(20_000, "not in place"), tmp_path)
    result = merge(*files, write=False)
    assert len(result.plan.removed) == 20_000
