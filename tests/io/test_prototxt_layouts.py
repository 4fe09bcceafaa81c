"""Every layout protobuf's text format reads merges alike: real nets re-formatted at random (one line,
CRLF, tabs, random indents, comments between any two tokens and at the end, a byte order mark,
`layer: {`, `layer{`, `layer <...>`, top-level fields after or between the layers, strings in single
quotes with escapes) merge to exactly the NetParameter and byte-identical caffemodel of the
canonical layout, keep every comment but those inside removed layers, and take memory linear in the
text (a one-line net of 5,000 layers)."""

import json
import os
import random
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from google.protobuf import text_format
from harness import REAL_NETS as REAL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffe_bn_merge import merge
from caffe_bn_merge.io import proto
from caffe_bn_merge.io.prototxt import layer_blocks, splice
from caffe_bn_merge.io.upgrade import V1_TYPES
from caffe_bn_merge.synthetic.synth import NetBuilder

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted(ROOT.glob("sample_nets/*.prototxt"))
NETS = [*(f"sample:{p.stem}" for p in SAMPLES), *(f"real:{name}" for name in REAL), "odd_names", "v1"]
EXAMPLES = 12  # layouts per net

# The canonical text's tokens: strings, punctuation, and words (names, numbers, enum values).
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[{}:]|[^\s{}:"]+')
_WORDLIKE = re.compile(r"[\w.+-]")
_COMMENT_CHARS = "ab {}<>#'\"\\:layer;\t"


@dataclass(frozen=True)
class Layout:
    """How to re-format one net's canonical text."""

    seed: int
    one_line: bool
    crlf: bool
    bom: bool
    comments: float  # the chance of a comment between two tokens (multi-line layouts)
    end_comment: bool
    move_fields: bool  # put top-level fields other than layers between and after the layers


layouts = st.builds(
    Layout,
    seed=st.integers(0, 2**32 - 1),
    one_line=st.booleans(),
    crlf=st.booleans(),
    bom=st.booleans(),
    comments=st.sampled_from([0.0, 0.05, 0.3]),
    end_comment=st.booleans(),
    move_fields=st.booleans(),
)


@dataclass
class Formatted:
    """A re-formatted net: its text, and each comment's marker with the layer it sits in (or None)."""

    text: str
    comments: dict[str, str | None]


def reformat(net: object, layout: Layout) -> Formatted:
    """The net in `layout`: the canonical text's tokens re-emitted with random separators."""
    rng = random.Random(layout.seed)
    items = _top_level_items(_TOKEN.findall(text_format.MessageToString(net)))
    if layout.move_fields:
        items = _interleave(
            rng,
            [i for i in items if i[0] in ("layer", "layers")],
            [i for i in items if i[0] not in ("layer", "layers")],
        )
    names = iter([layer.name for layer in net.layer] + [layer.name for layer in net.layers])
    newline = "\r\n" if layout.crlf else "\n"
    out, comments = ["\ufeff" if layout.bom else ""], {}
    for item in items:
        owner = next(names) if item[0] in ("layer", "layers") else None
        tokens = _restyle(rng, item)
        for k, token in enumerate(tokens, 1):
            out.append(token)
            out.append(_separator(rng, layout, newline, comments, owner if k < len(tokens) else None))
    if layout.end_comment:
        out.append(_comment(rng, comments, None) + rng.choice(["", newline]))
    return Formatted(_join(out), comments)


def _top_level_items(tokens: list[str]) -> list[list[str]]:
    """Tokens grouped into top-level fields (`name: value` or `name { ... }`)."""
    items, depth = [], 0
    for token in tokens:
        if depth == 0 and token not in (":", "{") and (not items or items[-1][-1] != ":"):
            items.append([])
        items[-1].append(token)
        depth += {"{": 1, "}": -1}.get(token, 0)
    return items


def _interleave(rng: random.Random, first: list, second: list) -> list:
    """The two lists merged in a random order that keeps each one's own order."""
    slots = [0] * len(first) + [1] * len(second)
    rng.shuffle(slots)
    sources = [iter(first), iter(second)]
    return [next(sources[slot]) for slot in slots]


def _restyle(rng: random.Random, item: list[str]) -> list[str]:
    """One field's tokens: `:` added before some `{`, some `{ }` as `< >`, strings re-quoted."""
    out, closers = [], []
    for token in item:
        if token == "{":
            if rng.random() < 0.3:
                out.append(":")
            closers.append(rng.choice("}>"))
            out.append("{" if closers[-1] == "}" else "<")
        elif token == "}":
            out.append(closers.pop())
        else:
            out.append(_requote(rng, token) if token.startswith('"') else token)
    return out


def _requote(rng: random.Random, token: str) -> str:
    """A string literal in single or double quotes, some plain characters as octal or hex escapes."""
    quote = rng.choice("'\"")
    pieces = re.findall(r"\\[0-7]{1,3}|\\x[0-9a-fA-F]{1,2}|\\.|.", token[1:-1])
    pieces = [_escape(rng, piece) if len(piece) == 1 and piece.isascii() else piece for piece in pieces]
    return quote + "".join(pieces) + quote  # the canonical text escapes both quotes


def _escape(rng: random.Random, char: str) -> str:
    roll = rng.random()
    return f"\\{ord(char):03o}" if roll < 0.1 else f"\\x{ord(char):02x}" if roll < 0.2 else char


def _separator(
    rng: random.Random, layout: Layout, newline: str, comments: dict[str, str | None], owner: str | None
) -> str:
    """Blanks (maybe none) between two tokens, in multi-line layouts maybe line ends and a comment."""
    blank = rng.choice(["", " ", "  ", "\t", " \t "])
    if layout.one_line:
        return blank
    if rng.random() < layout.comments:
        blank += _comment(rng, comments, owner) + newline
    if rng.random() < 0.3:
        blank += newline + rng.choice(["", "  ", "\t", "    ", " \t"])
    return blank


def _comment(rng: random.Random, comments: dict[str, str | None], owner: str | None) -> str:
    marker = f"@c{len(comments)}@"
    comments[marker] = owner
    noise = "".join(rng.choice(_COMMENT_CHARS) for _ in range(rng.randrange(12)))
    return f"#{noise}{marker}{noise}"


def _join(out: list[str]) -> str:
    """The pieces joined, with a blank where two word-like tokens would otherwise run together."""
    text = [" "]
    for piece in filter(None, out):
        if _WORDLIKE.match(piece[0]) and _WORDLIKE.match(text[-1][-1]):
            text.append(" ")
        text.append(piece)
    return "".join(text[1:])


# --- the nets -------------------------------------------------------------------------------------


@pytest.fixture(params=NETS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A net's prototxt (canonical text) and caffemodel."""
    kind, _, name = request.param.partition(":")
    if kind == "sample":
        model = ROOT / "sample_nets" / f"{name}.prototxt"
        return model, model.with_suffix(".caffemodel")
    if kind == "real":
        folder = request.getfixturevalue("real_nets")
        return folder / REAL[name][0], folder / REAL[name][1]
    folder = tmp_path_factory.mktemp(kind)
    return (_odd_names if kind == "odd_names" else _v1)(folder)


def _odd_names(folder: Path) -> tuple[Path, Path]:
    """A net whose layer and blob names hold braces, quotes, `#`, backslashes and non-ASCII."""
    b = NetBuilder('odd "net" {#}', (1, 3, 8, 8), seed=3)
    x = "data"
    for i, odd in enumerate(["a{b}#c", "q'\"\\", "ü layer { <x> }", "#}"]):
        x = b.conv(x, 4, name=f"conv {odd} {i}")
        x = b.scale(b.bn(x, name=f"bn {odd} {i}", top=f"t {odd}"), name=f"sc {odd}")
        x = b.relu(x)
    b.save(folder / "odd.prototxt", folder / "odd.caffemodel")
    return folder / "odd.prototxt", folder / "odd.caffemodel"


def _v1(folder: Path) -> tuple[Path, Path]:
    """The BN-free sample net in V1 form (`layers { type: CONVOLUTION }`, `input` + `input_dim`)."""
    sample = ROOT / "sample_nets" / "no_bn.prototxt"
    net = text_format.Parse(sample.read_text(), proto.NetParameter())
    v1 = proto.NetParameter(name=net.name, input=["data"], input_dim=net.layer[0].input_param.shape[0].dim)
    enum = {new: old for old, new in V1_TYPES.items()}
    for layer in net.layer[1:]:
        old = v1.layers.add(name=layer.name, bottom=layer.bottom, top=layer.top)
        old.type = proto.V1LayerParameter.LayerType.Value(enum[layer.type])
        for field, value in layer.ListFields():
            if field.name.endswith("_param"):
                getattr(old, field.name).CopyFrom(value)
    (folder / "v1.prototxt").write_text(text_format.MessageToString(v1))
    return folder / "v1.prototxt", sample.with_suffix(".caffemodel")


def _merged(model_text: str, weights: Path) -> tuple[object, bytes, frozenset[str], str]:
    """Merge `model_text` + `weights`: the output net as parsed, the output caffemodel, the removed
    layers and the output text."""
    with tempfile.TemporaryDirectory() as folder:
        model, out = Path(folder) / "in.prototxt", Path(folder) / "out"
        model.write_bytes(model_text.encode("utf-8"))
        result = merge(model, weights, out.with_suffix(".prototxt"), out.with_suffix(".caffemodel"))
        text = out.with_suffix(".prototxt").read_bytes().decode("utf-8")
        assert not text.startswith("\ufeff")
        parsed = text_format.Parse(text, proto.NetParameter())
        return parsed, out.with_suffix(".caffemodel").read_bytes(), frozenset(result.plan.removed), text


_canonical = cache(_merged)


# --- the properties -------------------------------------------------------------------------------


@given(layout=layouts)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_layout_merges_like_the_canonical_one(pair: tuple[Path, Path], layout: Layout) -> None:
    model, weights = pair
    net = text_format.Parse(model.read_text(), proto.NetParameter())
    canonical = _canonical(text_format.MessageToString(net), weights)
    formatted = reformat(net, layout)
    merged_net, merged_weights, removed, text = _merged(formatted.text, weights)
    assert merged_net == canonical[0]
    assert merged_weights == canonical[1]
    for marker, owner in formatted.comments.items():
        assert (marker in text) != (owner in removed), (marker, owner)
    if layout.one_line:
        assert "\n" not in text.removesuffix("\n")
    elif layout.crlf:
        assert "\n" not in text.replace("\r\n", "")  # changed layers written with the file's line ends


def test_one_line_net_of_5000_layers_is_split_once_in_bounded_memory(tmp_path: Path) -> None:
    """What `MessageToString(net, as_one_line=True)` writes, no line end: each layer block found
    once (the output holds each kept layer once, on one line) and peak memory far from quadratic."""
    b = NetBuilder("long", (1, 2, 4, 4), seed=0)
    x = "data"
    for _ in range(1250):
        x = b.relu(b.scale(b.bn(b.conv(x, 2, kernel=1))))
    b.save(tmp_path / "canonical.prototxt", tmp_path / "long.caffemodel")
    model = tmp_path / "long.prototxt"
    model.write_text(text_format.MessageToString(b.net, as_one_line=True))
    out = tmp_path / "merged"
    run = subprocess.run(
        [sys.executable, "-c", _MERGE_AND_MEASURE, str(model), str(tmp_path / "long.caffemodel"), str(out)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    peak_mb = json.loads(run.stdout)["peak_kb"] / 1024
    text = out.with_suffix(".prototxt").read_text()
    merged = text_format.Parse(text, proto.NetParameter())
    assert [layer.type for layer in merged.layer] == ["Input", *["Convolution", "ReLU"] * 1250]
    assert "\n" not in text and len(text) < 0.6 * len(model.read_text())  # 4 layers become 2
    assert peak_mb < 400, f"peak RSS {peak_mb:.0f} MB"


_MERGE_AND_MEASURE = """
import json, re, sys
from pathlib import Path
from caffe_bn_merge import merge
model, weights, out = map(Path, sys.argv[1:])
merge(model, weights, out.with_suffix(".prototxt"), out.with_suffix(".caffemodel"))
status = Path("/proc/self/status").read_text()  # VmHWM: this program's peak (ru_maxrss outlives exec)
print(json.dumps({"peak_kb": int(re.search(r"VmHWM:\\s*(\\d+) kB", status).group(1))}))
"""


@pytest.mark.parametrize(
    ("text", "removed", "expected"),
    [
        ("a: 1\n  layer { B }\r\nlayer { C }\n", "B", "a: 1\nlayer { C }\n"),  # its whole line
        ("layer { A } layer { B }  layer { C }", "B", "layer { A } layer { C }"),  # no doubled blanks
        ("  layer { A }\tlayer { B }\n", "A", "  layer { B }\n"),
        ("a: 1 layer { B }  \nlayer { C }", "B", "a: 1\nlayer { C }"),
        ("layer { A } layer { B }  # on B's line\n", "B", "layer { A } # on B's line\n"),
        ("layer # about B\n { B } layer { C }", "B", "layer { C }"),
        ("layer { A }\nlayer { B } # last", "B", "layer { A }\n# last"),
    ],
)
def test_a_removed_block_leaves_its_neighbours_tidy(text: str, removed: str, expected: str) -> None:
    blocks = layer_blocks(text)
    kept = [None if f"{{ {removed} }}" not in text[b.start : b.end] else "" for b in blocks]
    assert splice(text, blocks, kept) == expected


def _tabs_crlf(net: object) -> str:
    return text_format.MessageToString(net).replace("  ", "\t").replace("\n", "\r\n")


def _one_line(net: object) -> str:
    return text_format.MessageToString(net, as_one_line=True)


@pytest.mark.parametrize("write", [_tabs_crlf, _one_line])
@pytest.mark.parametrize("model", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_changed_layers_are_written_in_the_files_style(model: Path, write) -> None:
    """Merging a net written in one style gives the canonical merge written in that style."""
    net = text_format.Parse(model.read_text(), proto.NetParameter())
    merged = _merged(write(net), model.with_suffix(".caffemodel"))
    assert merged[3] == write(merged[0])
