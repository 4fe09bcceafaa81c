"""The NetCache: converting many caffemodels of a few architectures in one process, each prototxt
parsed once, gives the bytes that a fresh process gives for each, whatever the order."""

import math
import multiprocessing
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from caffe_bn_merge.batch import pool, worklist
from caffe_bn_merge.batch.discovery import discover
from caffe_bn_merge.io.files import net_digest
from caffe_bn_merge.pipeline import NetCache, merge
from caffe_bn_merge.synthetic.fleet import make_fleet

FRESH = "import sys; from caffe_bn_merge.pipeline import merge; merge(*sys.argv[1:5])"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """(prototxt, caffemodel) pairs of a small fleet: several architectures, each with several weights."""
    root = tmp_path_factory.mktemp("cache_fleet")
    make_fleet(root, 6, seed=3, broken=None)
    found = discover(root)
    return [(p.prototxt, p.caffemodel) for p in found.pairings]


def _fresh(prototxt: Path, caffemodel: Path, out: Path) -> tuple[bytes, bytes]:
    """The merged pair as a new process writes it."""
    outputs = (out.with_suffix(".prototxt"), out.with_suffix(".caffemodel"))
    command = [sys.executable, "-c", FRESH, str(prototxt), str(caffemodel), *map(str, outputs)]
    subprocess.run(command, check=True, cwd=ROOT)
    return outputs[0].read_bytes(), outputs[1].read_bytes()


@pytest.mark.parametrize("seed", range(3))
def test_a_shared_cache_gives_the_bytes_of_fresh_processes(pairs, tmp_path, seed) -> None:
    """Each order of the same deployments through one NetCache: every output equals a fresh
    process's, the cached nets are never changed, and each distinct prototxt text is parsed once."""
    order = random.Random(seed).sample(pairs, len(pairs))
    cache = NetCache()
    cached = {}
    for i, (prototxt, caffemodel) in enumerate(order):
        outputs = (tmp_path / f"{i}.prototxt", tmp_path / f"{i}.caffemodel")
        merge(prototxt, caffemodel, *outputs, cache=cache)
        cached[(prototxt, caffemodel)] = tuple(p.read_bytes() for p in outputs)
    texts = {prototxt.read_bytes() for prototxt, _ in pairs}
    assert (cache.misses, cache.hits) == (len(texts), len(pairs) - len(texts))
    assert cache.hits >= 2
    for entry in cache._nets.values():  # nothing a merge did changed what is kept
        net = entry.net_text.net
        assert net == type(net).FromString(net.SerializeToString())
    for i, (prototxt, caffemodel) in enumerate(random.Random(seed).sample(pairs, 3)):
        assert cached[(prototxt, caffemodel)] == _fresh(prototxt, caffemodel, tmp_path / f"fresh_{i}")


def test_cached_nets_are_not_changed_by_merges(pairs, tmp_path) -> None:
    """The kept net serialises to the same bytes before and after merges that fold its layers."""
    cache = NetCache()
    first = pairs[0][0]
    merge(*pairs[0], write=False, cache=cache)
    (entry,) = cache._nets.values()
    net_text = entry.net_text
    before = net_text.net.SerializeToString()
    for prototxt, caffemodel in pairs:
        if prototxt.read_bytes() == first.read_bytes():
            merge(prototxt, caffemodel, tmp_path / "m.prototxt", tmp_path / "m.caffemodel", overwrite=True, cache=cache)
    assert net_text.net.SerializeToString() == before


def test_the_cache_is_bounded(pairs) -> None:
    cache = NetCache(size=1)
    for prototxt, caffemodel in pairs:
        merge(prototxt, caffemodel, write=False, cache=cache)
    assert len(cache._nets) == 1


def test_batch_rows_say_where_the_time_went(pairs, tmp_path) -> None:
    """A run of the fleet in this process: every converted row has its read / plan / write seconds,
    and every deployment after the first of an architecture read its net from the cache."""
    items = [
        worklist.WorkItem(f"d{i}", p, c, tmp_path / f"d{i}.prototxt", tmp_path / f"d{i}.caffemodel")
        for i, (p, c) in enumerate(pairs)
    ]
    results = pool.run_items(items, jobs=1)
    seen = set()
    for result, (prototxt, _) in zip(results, pairs, strict=True):
        assert result.status is pool.Status.CONVERTED
        assert all(s is not None and 0 <= s <= result.seconds for s in (result.read_seconds, result.plan_seconds))
        assert result.write_seconds is not None
        text = prototxt.read_bytes()
        assert result.net_cached == (text in seen)
        seen.add(text)


def test_warm_workers_reuse_their_parsed_nets(pairs, tmp_path) -> None:
    """With two worker processes, each parses an architecture at most once: of the deployments of
    an architecture, all but at most two come from a worker's cache."""
    repeated = pairs * 3
    items = [
        worklist.WorkItem(f"d{i}", p, c, tmp_path / f"d{i}.prototxt", tmp_path / f"d{i}.caffemodel")
        for i, (p, c) in enumerate(repeated)
    ]
    results = pool.run_items(items, jobs=2)
    assert all(r.status is pool.Status.CONVERTED for r in results)
    texts = [p.read_bytes() for p, _ in repeated]
    parsed = [text for text, r in zip(texts, results, strict=True) if not r.net_cached]
    assert all(parsed.count(text) <= 2 for text in set(texts))
    assert sum(r.net_cached for r in results) >= len(texts) - 2 * len(set(texts)) > 0


@pytest.mark.parametrize("jobs", [2, 3])
def test_all_workers_start_at_once(jobs) -> None:
    """`pool.start_workers` launches its `jobs` processes before any work is given (they load while
    the deployments are found), not one per task as work arrives."""
    before = set(multiprocessing.active_children())
    with pool.start_workers(jobs, pool.Settings()):
        assert len(set(multiprocessing.active_children()) - before) == jobs


def test_runs_of_one_net_cover_the_work_list(pairs, tmp_path) -> None:
    """`pool.chunks`: every deployment in exactly one run, each run of one prototxt's bytes (two
    files with the same bytes together) and at most CHUNK long (shorter for little work), the
    longest first; a prototxt that cannot be read is a net of its own."""
    copy = tmp_path / "copy.prototxt"
    copy.write_bytes(pairs[0][0].read_bytes())
    missing = tmp_path / "missing.prototxt"
    inputs = [*pairs * 7, (copy, pairs[0][1]), (missing, pairs[0][1])]
    items = [
        worklist.WorkItem(f"d{i}", p, c, tmp_path / f"d{i}.prototxt", tmp_path / f"d{i}.caffemodel")
        for i, (p, c) in enumerate(inputs)
    ]
    runs = pool.chunks(items, jobs=1)
    assert sorted(item.key for run in runs for item in run) == sorted(item.key for item in items)
    assert [len(run) for run in runs] == sorted((len(run) for run in runs), reverse=True)
    assert all(0 < len(run) <= min(pool.CHUNK, math.ceil(len(items) / 4)) for run in runs)
    assert max(len(run) for run in pool.chunks(items * 20, jobs=2)) == pool.CHUNK
    for run in runs:
        assert len({item.prototxt.read_bytes() if item.prototxt.exists() else None for item in run}) == 1
    (alone,) = [run for run in runs if run[0].prototxt == missing]
    assert len(alone) == 1
    assert any(copy in {item.prototxt for item in run} and len({i.prototxt for i in run}) > 1 for run in runs)


def test_discovery_tells_the_runs_which_net_each_deployment_is(tmp_path, monkeypatch) -> None:
    """Discovered deployments carry their prototxt's digest (read once, when classified): equal
    for equal bytes, and the runs are made from it without reading any prototxt again."""
    make_fleet(tmp_path / "fleet", 9, seed=5, broken=None)
    items = worklist.build_work_list([tmp_path / "fleet"], tmp_path / "out").items
    assert all(item.net == net_digest(item.prototxt.read_bytes()) for item in items)
    monkeypatch.setattr(pool, "_net_key", lambda item: pytest.fail("a prototxt read again"))
    runs = pool.chunks(items, jobs=2)
    assert sorted(i.key for run in runs for i in run) == sorted(i.key for i in items)
    assert all(len({i.prototxt.read_bytes() for i in run}) == 1 for run in runs)
    assert len({run[0].net for run in runs}) == len({i.net for i in items}) > 1


def test_batch_rows_say_which_merges_were_replayed(pairs, tmp_path) -> None:
    """Each caffemodel after the first of its net and layout in a process is replayed."""
    items = [
        worklist.WorkItem(f"d{i}", p, c, tmp_path / f"d{i}.prototxt", tmp_path / f"d{i}.caffemodel")
        for i, (p, c) in enumerate(pairs * 2)
    ]
    results = pool.run_items(items, jobs=1)
    firsts = {p.read_bytes() for p, _ in pairs}
    assert sum(not r.replayed for r in results) == len(firsts)
    assert all(r.replayed for r in results[len(pairs) :])
