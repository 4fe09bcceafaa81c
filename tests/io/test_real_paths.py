"""`io.files.RealPaths` resolves every path as `os.path.realpath` and `Path.resolve` do, on random
trees of folders, files and symbolic links (to files and folders, relative and absolute, dangling,
looping, through `..`), with one instance for all the paths of a tree, as batch discovery uses it;
and strings spelled with `//`, `/.` and a trailing `/` as `os.path.realpath` takes them."""

import os
import random
from pathlib import Path

import pytest

from caffe_bn_merge.io.files import RealPaths

VARIANTS = 40


def _tree(root: Path, rng: random.Random) -> list[Path]:
    """Folders, files and links of random kinds under `root`; every name made."""
    folders, names = [root], []
    for i in range(rng.randint(3, 8)):
        folder = rng.choice(folders) / f"d{i}"
        folder.mkdir()
        folders.append(folder)
    for i in range(rng.randint(3, 10)):
        path = rng.choice(folders) / f"f{i}.caffemodel"
        path.write_bytes(b"")
        names.append(path)
    for i in range(rng.randint(4, 12)):
        link = rng.choice(folders) / f"l{i}"
        kind = rng.choice(["file", "folder", "dangling", "self", "chain", "up"])
        if kind == "file" and names:
            target = rng.choice(names)
        elif kind == "folder":
            target = rng.choice(folders)
        elif kind == "dangling":
            target = link.parent / "missing" / "x"
        elif kind == "self":
            target = link
        elif kind == "chain":  # to another link (a loop when the links point at each other)
            target = link.parent / f"l{rng.randint(0, 11)}"
        else:
            target = Path("..", *([".."] * rng.randint(0, 2)), rng.choice(folders).name)
        relative = kind == "up" or rng.random() < 0.5
        link.symlink_to(os.path.relpath(target, link.parent) if relative and kind != "up" else target)
        names.append(link)
    return folders + names


def _queries(made: list[Path], rng: random.Random) -> list[Path]:
    """Paths to resolve: what was made, names below it (existing or not, through links), `..`."""
    queries = []
    for path in made:
        queries += [path, path / "new.caffemodel", path / "f0.caffemodel", path / ".." / path.name]
        queries.append(path / rng.choice(["d1", "l0", "l3", "missing"]) / "out.prototxt")
    return queries


def _resolved(path: Path) -> Path | str:
    try:
        return path.resolve()
    except RuntimeError:
        return "symlink loop"


@pytest.mark.parametrize("seed", range(VARIANTS))
def test_real_paths_resolve_as_the_standard_library(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch):
    rng = random.Random(seed)
    made = _tree(tmp_path, rng)
    queries = _queries(made, rng)
    monkeypatch.chdir(tmp_path)  # relative paths too
    queries += [Path(os.path.relpath(q, tmp_path)) for q in queries[::3]]
    rng.shuffle(queries)
    real = RealPaths()  # one for the whole tree: its folders are looked up once
    for query in queries:
        assert real.realpath(query) == os.path.realpath(query), query
        try:
            got: Path | str = real.resolve(query)
        except RuntimeError:
            got = "symlink loop"
        assert got == _resolved(query), query
    for text in _spellings(queries, rng):  # strings keep what Path tidies away
        assert real.realpath(text) == os.path.realpath(text), text


def _spellings(queries: list[Path], rng: random.Random) -> list[str]:
    """Each query as a string with a doubled separator, a trailing `/` or `/.`, or `./` inside."""
    texts = []
    for query in map(str, queries):
        cut = rng.choice([i for i, c in enumerate(query) if c == "/"] or [0])
        texts += [query[:cut] + "/" + query[cut:], query + "/", query + "/.", query[:cut] + "/." + query[cut:]]
    return texts


def test_the_variants_reach_links_and_loops(tmp_path: Path):
    """The trees above do what they are for: paths through links, and loops."""
    through_links = loops = 0
    for seed in range(VARIANTS):
        root = tmp_path / str(seed)
        root.mkdir()
        rng = random.Random(seed)
        for query in _queries(_tree(root, rng), rng):
            through_links += os.path.realpath(query) != os.path.abspath(query)
            loops += _resolved(query) == "symlink loop"
    assert through_links > 500 and loops > 100, (through_links, loops)  # 1262 and 384 when written
